"""The path of a synchronous step's data on each node and between nodes (docs/architecture.md).

On Ray, unless ``--data-plane ray`` or ``--compress``: every server shard serves the workers of its own
node through shared memory (``parallel.shm``) and workers on other nodes through TCP links that carry
the gradient up and the parameters down in chunks at the same time (``parallel.link``). A node with
several workers whose shards are not all on it gets a reducer (``parallel.reducer``), to which its
workers hand their gradients through shared memory and which sends the shards one sum per step; a
node with one worker has no such hop (its worker's links go straight to the shards). The reducers hold
nothing from one step to the next: after any failure, or when workers are placed anew, they are placed
again for where the workers now run.

Compressed steps stay per worker (their error feedback is per worker and in the checkpoints, which a
per-node sum would tie to where the workers ran): no plane and no reducer; top-k payloads go over
the links (whole, sparse both ways), from a worker on a shard's own node too; fp16 over Ray calls.
"""
from __future__ import annotations

from ..parallel.reducer import NodeReducer


LINK_CHUNK_BYTES = 64 << 10


def link_chunk(size: int) -> int:
    """Floats per chunk on a link to a shard of ``size`` floats: at least 8 chunks (so that the two
    directions overlap for most of a step), none under 64 kB (a chunk's cost beyond its bytes is a
    header and a thread's wake-up)."""
    return max(LINK_CHUNK_BYTES // 4, -(-size // 8))


class DataPlane:
    """The planes and reducers of one fleet. ``fleet``: a ``train.fleet.Fleet``, or anything with what
    this reads of one (``backend``, ``plan.config``, ``servers``, ``bounds``, ``shard_bounds``, ``world``,
    ``call_servers``, ``call_workers``, ``started``, ``log``; ``scripts/simulate_scaling.py`` has one)."""

    def __init__(self, fleet):
        self.fleet = fleet
        self.kind = "ray" if fleet.backend.name == "ray" else None   # "shm" once the shards serve planes
        self.reducers = []   # the reducer actors
        self.offers = {}     # node id -> the plane name of its reducer

    def open(self) -> None:
        """The shards' planes, then the reducers; a host that cannot give shared memory is said in one
        line, and Ray carries its steps."""
        f, c = self.fleet, self.fleet.plan.config
        if f.backend.name != "ray" or c.data_plane != "shm":
            return
        if f.plan.mode.uses_links(c.compress):
            f.call_servers("open_link", link_chunk(f.bounds[0][1] - f.bounds[0][0]))   # top-k: whole, sparse
        if c.compress != "none":
            return   # compressed payloads are per worker: no shared plane, no node's sum
        why = [w for w in f.call_servers("open_plane") if w]
        self.kind = "ray" if why else "shm"
        if why:
            f.log(f"shared memory unavailable ({why[0]}); the steps' data goes over the shards' TCP links")
        self.place()

    def place(self) -> None:
        """A reducer on each node with workers whose shards are not all on it (old ones closed)."""
        self.close()
        f = self.fleet
        if self.kind != "shm" or not f.servers or not f.plan.mode.reducers:
            return   # async: a worker's updates go to a shard on its node through its plane, else over Ray
        try:
            shard_nodes = {offer[0] for offer in f.call_servers("plane")}
        except Exception as e:   # a dead shard: the recovery restarts the shards, and they place anew
            if not f.backend.is_failure(e):
                raise
            return
        ranks_by_node = {}
        for rank, node in enumerate(f.call_workers("node")):
            ranks_by_node.setdefault(node, []).append(rank)
        size = f.bounds[-1][1]
        for node, ranks in sorted(ranks_by_node.items()):
            if shard_nodes != {node} and len(ranks) > 1:   # one worker: its own links (no hop)
                self.reducers.append(f.backend.create(
                    NodeReducer, ranks, f.world, size, f.servers, f.shard_bounds, f.plan.config.step_timeout,
                    inline_bytes=f.backend.inline_bytes, cpus=0, node=node))
        for offer in f.started(self.reducers, "plane", "reducers"):
            if offer[1] is None:
                f.log(f"shared memory unavailable on node {offer[0][:8]} ({offer[2]}); its workers' "
                      "steps go through Ray")
            else:
                self.offers[offer[0]] = offer[1]

    def abort(self, reason: str) -> None:
        """Release the workers waiting in a reducer for a step that will not complete."""
        for r in self.reducers:
            self.fleet.backend.call(r, "abort", reason)

    def messages(self) -> int:
        """Gradient messages the shards received (sync: per step, one per node with a reducer, one per
        worker on a shard's node)."""
        return sum(s["messages"] for s in self.fleet.call_servers("stats"))

    def close(self) -> None:
        for r in self.reducers:
            self.fleet.backend.kill(r)
        self.reducers, self.offers = [], {}

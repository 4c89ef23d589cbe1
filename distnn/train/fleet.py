"""The processes of one run: ``world`` gradient workers and K parameter-server shards behind a
backend (``parallel.backends``). The fleet starts them, calls them, replaces dead ones and closes
them; if starting fails half-way, what was started is closed.

Shard k owns the contiguous slice ``bounds[k]`` of the flat parameter vector; a worker's gradient
travels as the K matching slices.
"""
from __future__ import annotations

import numpy as np

from ..parallel import GradientWorker, ParameterServer, affinity
from ..parallel.backends import NotReady
from .errors import PlacementTimeout, TrainingError
from .fetching import bring_shards
from .fleet_state import FleetState
from .planes import DataPlane


def shard_bounds(size: int, k: int) -> list[tuple[int, int]]:
    """K contiguous, nearly equal slices of range(size)."""
    edges = np.linspace(0, size, k + 1).astype(int)
    return [(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:])]


def not_placed(backend, what: str, positions, timeout: float, threads: int) -> str:
    """The line of processes Ray did not place in time: what they need and what the nodes have."""
    needs = f"{threads} CPU(s)" if what == "workers" else "its node"
    nodes = ", ".join(f"{addr} {cpus} CPUs" for addr, cpus in backend.node_cpus())
    return (f"{what} {positions} not started within {timeout:g} s: each needs {needs} on one node, and the "
            f"cluster's nodes have {nodes} (some taken by other jobs or by this run's own processes); use fewer "
            f"workers or --threads, add nodes, or wait longer with --start-timeout")


def unanswered(positions, futures, timeout: float) -> str:
    """The line of calls that a running process did not answer in time."""
    return (f"calls {positions} of {len(futures) if isinstance(futures, list) else 1} unanswered after "
            f"{timeout:g} s: a worker or server is stuck (its log: /tmp/ray/session_latest/logs); raise "
            "--step-timeout if the work takes longer")


class Fleet(FleetState):
    def __init__(self, backend, plan, owns_backend=False, convolutions: dict | None = None, log=print):
        """Start the ``plan.world`` workers of a ``setup.RunPlan`` and read their data. ``owns_backend``:
        ``close`` shuts the backend down too; ``convolutions``: the run's algorithm of each conv layer
        (``setup.kernel_choices``), given to every worker and every replacement; ``log``: where a
        one-line notice goes."""
        self.backend, self.plan, self.owns_backend, self.log = backend, plan, owns_backend, log
        self.convolutions = convolutions
        self.spec, self.data, self.world, self.local = plan.spec, plan.data, plan.world, plan.local
        self.threads, self.compress = plan.config.threads, plan.config.compress
        # compressed sync steps: the shards reply with the step's (sparse) mean, applied by each worker
        self.reply_updates = plan.mode.shards_reply_updates(self.compress)
        self.workers, self.servers, self.bounds = [], [], []
        self.cores = {}     # rank -> (machine, cores) where that worker computes (``pin_workers``)
        self.fetched = []   # the shard transfers to workers' machines (``fetching.bring_shards``)
        self.pending = []   # futures of sync steps handed out and not yet collected
        self.plane = DataPlane(self)   # the path of a sync step's data on each node
        self.dead_before = set(backend.dead_nodes())   # nodes dead before this fleet started
        try:
            for rank in range(self.world):
                self.workers.append(self._new_worker(rank))
            self.started(self.workers, "ping", "workers")
            self.pin_workers(range(self.world))
            batches = self.read_data(self.workers)
            if min(batches) != plan.length.steps_per_epoch:   # the plan and the workers read one manifest
                raise RuntimeError(f"workers read {batches} batches per epoch; the plan counted "
                                   f"{plan.length.steps_per_epoch}")
        except BaseException:
            self.close()
            raise

    def started(self, handles, method, what):
        """``method`` on each of ``handles`` (new processes), waited for up to the plan's
        ``start_timeout``: a process that Ray could not place by then stops the run with one line
        naming it, what it needs and what the nodes have. New workers of a local SGD run are then
        given its spec (once they run: no call waits on a process that may never be placed)."""
        timeout = self.plan.config.start_timeout
        try:
            values = self.backend.get([self.backend.call(h, method) for h in handles], timeout=timeout)
        except NotReady as e:
            raise PlacementTimeout(not_placed(self.backend, what, e.positions, timeout, self.threads)) from None
        if what == "workers" and self.local is not None:
            self.get([self.backend.call(h, "set_local", self.local) for h in handles])
        if what == "workers" and self.reply_updates:
            self.get([self.backend.call(h, "follow_updates", self.plan.optimizer, self.plan.schedule)
                      for h in handles])
        return values

    def pin_workers(self, ranks) -> None:
        """The compute thread of each worker of ``ranks`` on cores of its own, where its machine has
        them free (``parallel.affinity``; worker processes only; DISTNN_PIN=0 leaves them alone)."""
        if not self.backend.processes or not affinity.enabled():
            return
        ranks = list(ranks)
        places = self.get([self.backend.call(self.workers[r], "cpu_place") for r in ranks])
        taken = {}
        for r, (machine, cores) in self.cores.items():
            if r not in ranks:
                taken.setdefault(machine, set()).update(cores)
        chosen = affinity.assign(places, self.threads, taken)
        pinned = [(r, machine, cores) for r, (machine, _), cores in zip(ranks, places, chosen) if cores]
        self.get([self.backend.call(self.workers[r], "pin", cores) for r, _, cores in pinned])
        self.cores.update({r: (machine, cores) for r, machine, cores in pinned})

    def read_data(self, handles) -> list[int]:
        """New workers read their data, the shards their machines lack fetched first (``fetching``):
        as long as its size takes. Returns their batches per epoch."""
        fetched = bring_shards(self, handles)
        if fetched:
            self.fetched.append(fetched)
        return self.get([self.backend.call(h, "ready") for h in handles])

    def _new_worker(self, rank):
        return self.backend.create(GradientWorker, self.spec, self.data, rank, self.world, self.threads,
                                   self.compress, self.convolutions, cpus=self.threads)

    def start_servers(self, params: np.ndarray, decay_mask: np.ndarray) -> None:
        """The plan's ``servers`` shards, each given its slice of ``params`` (P,) and of ``decay_mask``
        (P,); with local SGD they average the workers' parameter moves."""
        self.bounds = shard_bounds(params.size, self.plan.config.servers)
        self._mask = decay_mask
        self.servers = [self._new_server(i, params[lo:hi]) for i, (lo, hi) in enumerate(self.bounds)]
        self.started(self.servers, "stats", "servers")
        self.plane.open()

    def _new_server(self, k, params):
        lo, hi = self.bounds[k]
        return self.backend.create(ParameterServer, params, self.plan.optimizer, self.plan.schedule,
                                   self._mask[lo:hi], world=self.world, average=self.local is not None,
                                   reply_updates=self.reply_updates, cpus=0)

    @property
    def data_plane(self) -> str | None:
        """"shm" (shared memory on each node), "ray" (Ray calls) or None (one process)."""
        return self.plane.kind

    @property
    def shard_bounds(self):
        """The bounds workers cut their gradients at (None for one shard: no cut)."""
        return self.bounds if len(self.servers) > 1 else None

    # -- calls ------------------------------------------------------------------------------------
    def get(self, futures):
        """The values of calls on running processes, waited for up to the plan's ``step_timeout``: a
        process that hangs without dying stops the run with one line instead of a wait for ever."""
        timeout = self.plan.config.step_timeout
        try:
            return self.backend.get(futures, timeout=timeout)
        except NotReady as e:
            raise TrainingError(unanswered(e.positions, futures, timeout)) from None

    def call_workers(self, method, *args):
        """``method(*args)`` on every worker; their results in rank order."""
        return self.get([self.backend.call(w, method, *args) for w in self.workers])

    def call_servers(self, method, *args):
        return self.get([self.backend.call(s, method, *args) for s in self.servers])

    def sync_steps(self, first: int, n: int) -> list:
        """``n`` synchronous steps from ``first``: one future per worker of its list of step metrics."""
        futures = self.backend.sync_steps(self.workers, self.servers, first, n, self.shard_bounds,
                                          self.plane.offers or None)
        self.pending.extend(futures)
        return futures

    def collect(self, futures) -> list:
        """The values of ``sync_steps``; on a failure the shards drop the step they were collecting
        (releasing workers that wait in it) and every step handed out is waited for and dropped (so no
        abandoned step reports its own error), then the error is raised."""
        try:
            values = self.get(futures)
        except Exception as e:
            for s in self.servers:
                self.backend.call(s, "abort", self.backend.describe(e))
            self.plane.abort(self.backend.describe(e))
            self.backend.discard(self.pending)
            self.pending = []
            raise
        self.pending = [f for f in self.pending if all(f is not g for g in futures)]
        return values

    # -- failures and the end ---------------------------------------------------------------------
    def lost(self) -> tuple[list[int], list[int]]:
        """Ranks of the workers and indices of the shards whose processes are gone."""
        alive = self.backend.alive
        return ([r for r, w in enumerate(self.workers) if not alive(w)],
                [k for k, s in enumerate(self.servers) if not alive(s)])

    def replace_workers(self) -> None:
        """Fresh replicas of every rank, survivors too: one may already be running a chunk queued
        before a failure, which would push gradients of a step that is no longer next."""
        for r, w in enumerate(self.workers):
            self.backend.kill(w)
            self.workers[r] = self._new_worker(r)
        self.started(self.workers, "ping", "workers")
        self.cores = {}
        self.pin_workers(range(self.world))
        self.read_data(self.workers)
        self.plane.place()

    def replace_worker(self, rank: int, buffers: np.ndarray | None = None) -> None:
        """A fresh replica of one rank (its process died), given ``buffers`` (batch-norm statistics)."""
        self.backend.kill(self.workers[rank])
        self.workers[rank] = self._new_worker(rank)
        self.started([self.workers[rank]], "ping", "workers")
        self.cores.pop(rank, None)
        self.pin_workers([rank])
        self.read_data([self.workers[rank]])
        if buffers is not None and buffers.size:
            self.get(self.backend.call(self.workers[rank], "set_buffers", buffers))

    def restart_servers(self, states: list[dict]) -> None:
        """New shard processes holding ``states`` (``ParameterServer.state()`` of each)."""
        for k, (s, state) in enumerate(zip(self.servers, states)):
            self.backend.kill(s)
            self.servers[k] = self._new_server(k, state["params"])
        self.started(self.servers, "stats", "servers")
        self.plane.open()
        self.load_server_states(states)

    def close(self) -> None:
        self.plane.close()
        for handle in self.workers + self.servers:
            self.backend.kill(handle)
        self.workers, self.servers = [], []
        if self.owns_backend:
            self.backend.shutdown()

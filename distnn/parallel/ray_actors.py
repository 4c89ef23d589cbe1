"""The Ray side of the worker and the server: thin subclasses that add only what crossing processes
needs. Imported by RayBackend, never by the rest of distnn.

In synchronous mode the workers drive the steps themselves: a worker computes its gradient, pushes it
to each server shard and blocks in that call until the shard has all the step's gradients and has
applied their mean; every worker's push then returns the new parameters. Each step is one worker ->
server -> worker round trip with no driver in between; the driver only hands out chunks of steps and
reads back metrics.

How the parameters travel depends on their size. Up to ``inline_bytes`` (1 MB when the cluster passes
objects that large inside call messages) each reply carries a copy: measured on lenet5 (244 kB), this
cut the wait per step from 6.2 to 3.6 ms against one object-store put that every worker then fetches,
because a fetch asks the owner (the server) and the store, costing CPU in three processes on a
machine whose cores the workers need. Larger vectors are put into the object store once per step and
every reply carries the same reference: for cifar_convnet (4.4 MB) that was 1-6% faster than copies
in every reply (three A/B pairs), as copying megabytes per worker outweighs the fetch.
"""
from __future__ import annotations

import os
import time

import numpy as np
import ray

from .._memory import tune_allocator
from . import affinity
from .reducer import NodeReducer
from .server import ParameterServer, StepAbandoned
from .shm import Plane
from .link import LinkServer
from .ray_paths import ShardPaths, fetch, fetch_parts
from .simulate import SimulatedWorker
from .worker import GradientWorker


def _own_process() -> None:
    """What an actor's process sets up for itself first: the allocator's thresholds, and its threads
    at its raylet's priority (``affinity.match_parent_priority``)."""
    tune_allocator()
    affinity.match_parent_priority()


def node_address() -> str:
    """This node's address as Ray knows it (the one other nodes reach it by)."""
    if ray.is_initialized():
        return ray.util.get_node_ip_address()
    return os.environ.get("DISTNN_LINK_HOST", "127.0.0.1")


class ProcessInfo:
    """What the driver asks of any actor's process."""

    def pid(self) -> int:
        return os.getpid()

    def cpu_seconds(self) -> float:
        """CPU time of this process, Ray's own threads included (what it costs its machine)."""
        return time.process_time()

    def node(self) -> str:
        """The id of the Ray node this process runs on."""
        return ray.get_runtime_context().get_node_id()

    def cpu_place(self) -> tuple:
        """(machine, the cores this process may use): ``affinity.place``."""
        return affinity.place()

    def pin(self, cores) -> tuple:
        """Run the thread that runs this actor's methods on ``cores``; the cores it now runs on."""
        affinity.pin(cores)
        return tuple(sorted(os.sched_getaffinity(0)))


class ServerActor(ProcessInfo, ParameterServer):
    """Adds what crossing processes needs: publishing large vectors through the object store, and
    copies made under the lock (Ray serialises a return value after the method has returned, while
    pushes of the next step may already run in other threads)."""

    def __init__(self, *args, inline_bytes: int = 0, **kwargs):
        _own_process()
        self._inline_bytes = inline_bytes
        self._plane = self._link = None
        super().__init__(*args, **kwargs)

    def open_plane(self) -> str | None:
        """Serve the workers on this node through shared memory (``shm.Plane``); None, or why not."""
        with self._step_done:
            self._plane, why = Plane.open(self, self.world, self.params.size)
            if self._plane is not None:
                self._published = self._publish()
            return why

    def plane(self):
        """(node id, plane name) where this shard serves its node's workers through shared memory."""
        return None if self._plane is None else (ray.get_runtime_context().get_node_id(), self._plane.name)

    def open_link(self, chunk: int) -> None:
        """Serve workers on other nodes through TCP links (``parallel.link``), in chunks of ``chunk``
        floats."""
        if self._link is None:
            self.cut(chunk)
            self._link = LinkServer(self, node_address(), chunk)

    def link(self):
        """(node id, (host, port, secret)) where workers on other nodes reach this shard, or None."""
        return None if self._link is None else (ray.get_runtime_context().get_node_id(), self._link.offer())

    def _publish(self):
        if self._plane is not None:   # written once per step where the node's workers read it (others: Ray)
            return self._plane.publish([self.params])
        return self._copy_out()

    def _copy_out(self):
        return self.params.copy() if self.params.nbytes <= self._inline_bytes else ray.put(self.params)

    def push(self, rank: int, grad, step: int) -> list:
        return [super().push(rank, grad, step)]  # a list, so that a reference is passed on, not resolved

    def push_chunks(self, ranks, step: int, *chunks) -> tuple:
        """``push`` of a gradient (a node's sum) given as chunks, returning the parameters as chunks of
        the same sizes: each small enough to travel inside the call messages (``ReducerActor``)."""
        params = super().push(ranks, np.concatenate(chunks) if len(chunks) > 1 else chunks[0], step)
        if not isinstance(params, np.ndarray):
            params = ray.get(params)
        edges = np.cumsum([0] + [c.size for c in chunks])
        parts = tuple(params[a:b] for a, b in zip(edges[:-1], edges[1:]))
        return parts if len(parts) > 1 else parts[0]

    def published(self) -> list:
        return [super().published()]

    def push_async(self, *args, **kwargs) -> tuple:
        params, version = super().push_async(*args, **kwargs)
        return [params], version   # a list, so that a reference is passed on, not resolved

    def snapshot(self) -> tuple:
        params, version = super().snapshot()
        return [params], version

    def get(self):
        with self._step_done:
            return self.params.copy()


class WorkerActor(ProcessInfo, GradientWorker):
    def __init__(self, *args, **kwargs):
        _own_process()
        super().__init__(*args, **kwargs)
        self._reset_connections()

    def _reset_connections(self) -> None:
        self.paths = ShardPaths(self.rank)   # the clients that reach the shards, kept between runs
        self._async_pushes = 0     # async pushes through a plane so far (their slots alternate)

    def run_sync(self, servers: list, first_step: int, steps: int, bounds=None, reducers=None) -> list:
        """Run ``steps`` synchronous steps from ``first_step`` against the shard actors ``servers``
        over this worker's transport (``ShardPaths.transport``); returns their metrics."""
        transport = self.paths.transport(servers, bounds, reducers or {})
        if self.next_step != first_step:  # a new start, a resume or a recovery
            self.receive(fetch([s.published.remote() for s in servers]))
            if self.follows:
                self.follow(ray.get([s.state.remote() for s in servers]))
        return self.drive(transport, first_step, steps, bounds)

    def run_async(self, servers: list, count: int, epoch: int, batch: int, bound=None, bounds=None,
                  pipelined=False) -> int:
        """``count`` asynchronous updates from batch ``batch`` of ``epoch``, each pushed straight to
        the shard actors ``servers`` (shard 0 keeps the metrics), ``pipelined`` or not
        (``async_updates``). Returns ``count``."""
        planes = self.paths.planes(servers)

        def push(grads, seen, metrics, ahead):
            # a plane's slots alternate from push to push, across rounds too: the parameters this worker
            # computes from next are in the other reply slot (a pipelined worker has two pushes in flight)
            slot, self._async_pushes = self._async_pushes % 2, self._async_pushes + 1
            refs = [None if p else s.push_async.remote(self.rank, g, seen, metrics if k == 0 else None, bound, ahead)
                    for k, (s, g, p) in enumerate(zip(servers, grads, planes))]
            for k, (p, g) in enumerate(zip(planes, grads)):
                if p is not None:
                    p.send_async(g, slot, seen, metrics if k == 0 else None, bound, ahead)

            def reply():
                answers = [p.receive_async(slot) if p is not None else ray.get(r) for p, r in zip(planes, refs)]
                return fetch_parts([[a[0]] if p is not None else a[0] for p, a in zip(planes, answers)]), answers[0][1]
            return reply

        if self.params is None:   # a new process: from the shards' current parameters
            replies = ray.get([s.snapshot.remote() for s in servers])
            self.receive(fetch_parts([r[0] for r in replies]), replies[0][1])
        # the round's first batch (and with pipelining its second) is computed before any reply
        ray.get(servers[0].turn.remote(self.rank, bound, 1 if pipelined and count > 1 else 0))
        for _ in self.async_updates(push, count, epoch, batch, bounds, pipelined):
            pass
        return count


class ReducerActor(ProcessInfo, NodeReducer):
    """A node's reducer (``parallel.reducer``): serves the node's workers ``ranks`` through a plane
    and forwards each step's sum to the shard actors ``servers`` (slices ``bounds``; None: one shard),
    waiting up to ``timeout`` seconds for them.

    The sum and the parameters cross nodes in chunks of under ``inline_bytes`` (the size of object
    the cluster passes inside call messages): a 0.25 MB vector that way took 1.50-1.66 ms per round
    trip between two emulated nodes against 7.3-9.5 ms as one object, which goes through the object
    stores (4.4 MB: 24-26 ms either way; ``scripts/ab_node_messages.py``)."""

    def __init__(self, ranks, world: int, size: int, servers: list, bounds=None, timeout: float = 600.0,
                 inline_bytes: int = 100 * 1024):
        _own_process()
        super().__init__(ranks, self._forward)
        self._servers, self._cuts, self._timeout = servers, bounds or [(0, size)], timeout
        self._chunk = max(1024, (inline_bytes - 4096) // 4)   # floats per chunk, under the limit with its header
        self._plane, self._why = Plane.open(self, world, size)
        if self._plane is not None:
            self.publish = self._plane.publish

    def plane(self):
        """(node id, plane name), or (node id, None, why this host cannot give one)."""
        node = ray.get_runtime_context().get_node_id()
        return (node, self._plane.name) if self._plane is not None else (node, None, self._why)

    def _forward(self, ranks, total, step):
        refs = []
        for s, (lo, hi) in zip(self._servers, self._cuts):
            chunks = [total[a:min(a + self._chunk, hi)] for a in range(lo, hi, self._chunk)]
            out = s.push_chunks.options(num_returns=len(chunks)).remote(ranks, step, *chunks)
            refs += out if len(chunks) > 1 else [out]
        try:
            parts = ray.get(refs, timeout=self._timeout)
        except ray.exceptions.RayTaskError as e:
            if isinstance(e.cause, StepAbandoned):   # another worker failed: the driver recovers
                raise StepAbandoned(str(e.cause)) from None
            raise
        return parts


class SimulatedWorkerActor(SimulatedWorker, WorkerActor):
    """A SimulatedWorker that drives sync steps as WorkerActor does."""

    def __init__(self, *args, **kwargs):
        SimulatedWorker.__init__(self, *args, **kwargs)
        self._reset_connections()


ACTORS = {GradientWorker: WorkerActor, ParameterServer: ServerActor, SimulatedWorker: SimulatedWorkerActor,
          NodeReducer: ReducerActor}

"""How a synchronous step's data travels between one worker and the server shards.

A transport is what ``GradientWorker.run_steps`` talks to, and the only thing that differs between
backends: ``send(parts, step)`` hands over the worker's gradient of ``step`` as the K parts the shards
own (slices of the flat vector; K = 1 for one shard) and returns without waiting; ``receive(step)``
waits until every shard has applied the step and returns the K parameter parts after it. The sums stay
in rank order on every path (``ParameterServer.contribute``), so every path gives the same parameters.

    worker.run_steps ──send──> transport ──> shard k: give (the last gradient of a step applies the mean)
                     <─receive─          <── shard k: take (the parameters published after the step)

The paths, one class each:

- ``InProcess``: the shards are objects of this process (the local backend; threads in the tests).
- ``RayCall`` (``ray_actors``): one actor call per shard; the reply brings the parameters.
- ``SharedMemory``: a shard on the worker's node, through its plane (``parallel.shm``).
- ``ThroughReducer``: the whole gradient to the node's reducer, through its plane; it sends the shards
  one sum per node and step (``parallel.reducer``).
- ``PerShard``: each shard by its own path (a plane where the shard is on this node, else Ray).

``send`` never blocks on the other workers, so one thread can drive every worker of a process in turn:
the local backend sends every worker's gradient of a step before any of them receives.
"""
from __future__ import annotations


class Transport:
    """The interface: ``send`` a step's gradient parts, ``receive`` the parameter parts after it."""

    def send(self, parts: list, step: int) -> None:
        raise NotImplementedError

    def receive(self, step: int) -> list:
        raise NotImplementedError


class InProcess(Transport):
    """Worker ``rank``'s path to shard objects of this process (``ParameterServer``)."""

    def __init__(self, rank: int, servers: list):
        self.rank, self.servers = rank, servers

    def send(self, parts, step):
        for server, part in zip(self.servers, parts):
            server.give(self.rank, part, step)

    def receive(self, step):
        return [server.take(step) for server in self.servers]


class SharedMemory(Transport):
    """One shard on this worker's node, through its plane (``shm.PlaneClient``). The parameters
    received are a view of the shared memory, valid until this worker's next ``send``."""

    def __init__(self, client):
        self.client = client

    def send(self, parts, step):
        self.client.send(parts, step)

    def receive(self, step):
        return [self.client.receive(step)]


class ThroughReducer(Transport):
    """The whole gradient to this node's reducer through its plane; the parameters come back whole
    and are cut at the shards' ``bounds`` (None: one shard)."""

    def __init__(self, client, bounds=None):
        self.client, self.cuts = client, bounds or [(0, None)]

    def send(self, parts, step):
        self.client.send(parts, step)

    def receive(self, step):
        params = self.client.receive(step)
        return [params[lo:hi] for lo, hi in self.cuts]


class PerShard(Transport):
    """Shard k's part by ``paths[k]`` (each a transport of one part). Calls that go out over the
    network are started before parts are copied into shared memory."""

    def __init__(self, paths: list):
        self.paths = paths
        self._order = sorted(range(len(paths)), key=lambda k: isinstance(paths[k], SharedMemory))

    def send(self, parts, step):
        for k in self._order:
            self.paths[k].send([parts[k]], step)

    def receive(self, step):
        return [p.receive(step)[0] for p in self.paths]

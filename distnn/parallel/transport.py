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
- ``RayCall`` (``ray_paths``): one actor call per shard; the reply brings the parameters.
- ``SharedMemory``: a shard on the worker's node, through its plane (``parallel.shm``).
- ``OverLink``: a shard on another machine, through a TCP link carrying chunks both ways at once
  (``parallel.link``).
- ``ThroughReducer``: the whole gradient to the node's reducer, through its plane; it sends the shards
  one sum per node and step (``parallel.reducer``).
- ``PerShard``: each shard by its own path (a plane where the shard is on this node, else Ray).

``send`` never blocks on the other workers, so one thread can drive every worker of a process in turn:
the local backend sends every worker's gradient of a step before any of them receives.

``FinalSuffix`` lets a streaming transport start during backward: the flat vector holds the last
layers' parameters at its end, and backward completes their gradients first.
"""
from __future__ import annotations

import numpy as np


class Transport:
    """The interface: ``send`` a step's gradient parts, ``receive`` the parameter parts after it.
    A transport that ``streams`` also takes ``ready(grads, lo, step)`` during backward: the flat
    gradient's elements from ``lo`` on are final and may leave before ``send``."""

    streams = False

    def send(self, parts: list, step: int) -> None:
        raise NotImplementedError

    def ready(self, grads, lo: int, step: int) -> None:
        pass

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


class OverLink(Transport):
    """One shard on another machine, through a TCP link (``link.LinkClient``): the gradient goes up in
    chunks while the updated chunks come down. The parameters received are the client's buffer,
    valid until this worker's next ``send``."""

    streams = True

    def __init__(self, client):
        self.client = client

    def ready(self, grads, lo, step):
        self.client.send_from(grads, lo, step)

    def send(self, parts, step):
        self.client.send(parts[0], step)

    def receive(self, step):
        return [self.client.receive(step)]


class PerShard(Transport):
    """Shard k's part by ``paths[k]`` (each a transport of one part). Calls that go out over the
    network are started before parts are copied into shared memory."""

    def __init__(self, paths: list, bounds=None):
        self.paths, self.bounds = paths, bounds
        self._order = sorted(range(len(paths)), key=lambda k: isinstance(paths[k], SharedMemory))
        self.streams = any(p.streams for p in paths)

    def ready(self, grads, lo, step):
        for path, (a, b) in zip(self.paths, self.bounds or [(0, grads.size)]):
            if path.streams and lo < b:
                path.ready(grads[a:b], max(lo - a, 0), step)

    def send(self, parts, step):
        for k in self._order:
            self.paths[k].send([parts[k]], step)

    def receive(self, step):
        return [p.receive(step)[0] for p in self.paths]


class FinalSuffix:
    """Which end of a model's flat gradient is final during backward. ``start(transport, grads, step)``
    returns autograd's ``on_final`` hook for one backward: each time the final part at the end of
    the flat vector grows, it calls ``transport.ready(grads, lo, step)``."""

    def __init__(self, model):
        params = model.parameters()
        self.index = {id(p): i for i, p in enumerate(params)}
        self.starts = np.cumsum([0] + [p.data.size for p in params])[:-1].tolist()

    def start(self, transport, grads, step):
        done = [False] * len(self.starts)
        edge = [len(done)]   # parameters from this index on are final

        def on_final(leaf):
            i = self.index.get(id(leaf))
            if i is None:
                return
            done[i] = True
            moved = False
            while edge[0] > 0 and done[edge[0] - 1]:
                edge[0] -= 1
                moved = True
            if moved:
                transport.ready(grads, self.starts[edge[0]] if edge[0] < len(done) else grads.size, step)
        return on_final

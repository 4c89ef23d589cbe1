"""How a worker actor reaches the server shard actors on Ray: the clients it keeps from one run of
steps to the next and the transport (``parallel.transport``) each run of sync steps goes over.
Imported by ``ray_actors`` only.

On a node whose aggregator is a reducer, the whole gradient goes to it through shared memory.
Elsewhere, per shard: its plane where it serves one on this node, else its link where it serves one
(on another node, or on this one: top-k's shards have no plane), else a Ray call.
"""
from __future__ import annotations

import ray

from .link import LinkClient
from .shm import PlaneClient
from .transport import OverLink, PerShard, SharedMemory, ThroughReducer, Transport


class ShardPaths:
    """Worker ``rank``'s ways to the shards: each shard actor's (plane, link) offers, asked once per
    actor; a client per plane and per link, kept while they are offered and closed once they are not."""

    def __init__(self, rank: int):
        self.rank = rank
        self.offers = {}        # shard actor -> its (plane, link) offers
        self.plane_clients = {}  # plane name -> PlaneClient
        self.link_clients = {}   # a shard's link offer -> LinkClient

    def transport(self, servers: list, bounds, reducers: dict) -> Transport:
        """The path of this worker's step data to the shard actors ``servers`` (slices ``bounds``).
        ``reducers``: {node id: plane name} of the nodes whose aggregator is a ``ReducerActor``."""
        name = reducers.get(ray.get_runtime_context().get_node_id())
        if name is not None:
            return ThroughReducer(self.connect([name])[0], bounds)
        offers = self.offers_of(servers)
        planes = self._planes(offers)
        links = self.links([None if plane else link for plane, (_, link) in zip(planes, offers)])
        return PerShard([SharedMemory(p) if p else OverLink(c) if c else RayCall(self.rank, s)
                         for s, p, c in zip(servers, planes, links)], bounds)

    def offers_of(self, servers: list) -> list:
        """Each shard actor's (plane, link) offers (``ServerActor.plane``, ``.link``), asked once per
        actor: a shard opens both when it starts, and a restarted shard is a new actor. (Asked at every
        run of steps, the two calls cost the steps 1-10 ms each time over a shaped 1 Gbit/s link.)"""
        new = [s for s in dict.fromkeys(servers) if s not in self.offers]
        if new:
            answers = iter(ray.get([method.remote() for s in new for method in (s.plane, s.link)]))
            for s in new:
                self.offers[s] = (next(answers), next(answers))
        self.offers = {s: self.offers[s] for s in servers}   # shards replaced: forgotten
        return [self.offers[s] for s in servers]

    def planes(self, servers: list) -> list:
        """A client of each shard's plane on this node (None: the shard has none here)."""
        return self._planes(self.offers_of(servers))

    def _planes(self, offers: list) -> list:
        here = ray.get_runtime_context().get_node_id()
        return self.connect([plane[1] if plane is not None and plane[0] == here else None for plane, _ in offers])

    def connect(self, names: list) -> list:
        """A client of each named plane (None stays None); planes no longer named are closed."""
        return _keep(self.plane_clients, names, lambda name: PlaneClient(name, self.rank))

    def links(self, offers: list) -> list:
        """A client of each shard's link whose offer is given (None: none wanted, or a shard without
        links); links no longer offered are closed. A shard on this node is reached by its link too:
        a Ray call to it took 1.6 ms (median) from the end of a top-k worker's compute to the shard."""
        keys = [None if o is None else o[1] for o in offers]
        return _keep(self.link_clients, keys, lambda key: LinkClient(key, self.rank))


def _keep(kept: dict, keys: list, make) -> list:
    """``kept[key]`` for each key (None stays None), made where missing; clients whose key is no
    longer given are closed and dropped."""
    for key in keys:
        if key is not None and key not in kept:
            kept[key] = make(key)
    for key in [k for k in kept if k not in keys]:
        kept.pop(key).close()
    return [None if k is None else kept[k] for k in keys]


class RayCall(Transport):
    """One shard actor, by a call (``ServerActor.push``) whose reply brings its parameter part."""

    def __init__(self, rank: int, server):
        self.rank, self.server, self._reply = rank, server, None

    def send(self, parts, step):
        self._reply = self.server.push.remote(self.rank, parts[0], step)

    def receive(self, step):
        reply, self._reply = self._reply, None
        return fetch([reply])


def fetch_parts(wrapped: list) -> list:
    """Parameter parts from the shards' one-element lists (an array, or an object-store reference; or a
    compressed change of them)."""
    return [ray.get(p) if isinstance(p, ray.ObjectRef) else p for p in (w[0] for w in wrapped)]


def fetch(replies: list) -> list:
    """``fetch_parts`` of the shards' replies ``replies`` (object references)."""
    return fetch_parts(ray.get(replies))

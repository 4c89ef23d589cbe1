"""The step's data between the processes of one node: shared memory, with a socket to wake the other side.

A server shard opens a ``Plane``: one anonymous shared-memory file (``memfd``) holding a gradient slot
per worker rank and the parameters the shard publishes after each step, and a Unix socket in Linux's
abstract namespace (a name, no file). A worker on the same node connects, says its rank and receives
the memory's file descriptor over the socket (``SCM_RIGHTS``); from then on a step is: the worker
writes its gradient into its slot and sends a 48-byte header (kind, step, and for asynchronous
updates its slot, staleness bound and how many bytes of metrics follow); the shard's thread for that
worker, blocked in ``recv``, wakes, hands the slot to ``ParameterServer.push`` (the sum in rank order,
exactly as for a gradient that came over Ray) and once the step's update is applied and published into
the shared parameters, answers with the step number (or -1: the step was abandoned). The worker, blocked
in its own ``recv``, wakes and reads the parameters from the shared memory.

Asynchronous updates use the same plane: a worker has two gradient slots and two reply slots (a
pipelined worker has two pushes in flight); its message says which slot, the update it computed at,
its staleness bound, whether it computes again, and (to shard 0) its step metrics; the shard's thread
calls ``ParameterServer.push_async`` and, under the shard's lock, copies the parameters after that
update into the worker's reply slot, then answers with their update count. A connection's messages are
handled one at a time, in order, so a worker's second push waits behind its first (as its staleness
bound would have it wait anyway).

Nothing spins: both sides block in the kernel. Nothing leaks: the memory and the socket have no name
in any file system and vanish with the last process that holds them, however it ends. Only processes
of the same user are served (the peer's credentials, ``SO_PEERCRED``). A peer that dies
shows as an empty ``recv`` on the other side (``PeerLost``). Where memfd or the abstract namespace is
missing, ``Plane.open`` says why and the step's data goes through Ray as before.
"""
from __future__ import annotations

import json
import mmap
import os
import socket
import struct
import sys
import uuid

import numpy as np

from .._io import recv_exactly, serve_connections
from .server import StepAbandoned

_STEP = 8   # bytes of a step number on the socket (little-endian, signed)
_HEADER = struct.Struct("<6q")   # a message: kind (0 sync, 1 async), step or seen, ahead, bound, slot, metrics bytes
_NONE = -1                       # ahead or bound not given


def _layout(memory, world: int, size: int):
    """The plane's memory as (gradient slots (world, 2, size), reply slots (world, 2, size), the
    published parameters (size,)). Pages no process touches take no memory."""
    whole = np.frombuffer(memory, np.float32, (4 * world + 1) * size)
    return (whole[:2 * world * size].reshape(world, 2, size),
            whole[2 * world * size:4 * world * size].reshape(world, 2, size), whole[4 * world * size:])


def _plane_bytes(world: int, size: int) -> int:
    return max((4 * world + 1) * size * 4, 1)


class PeerLost(ConnectionError):
    """The process at the other end of a plane is gone (a failure, as a dead actor is)."""


def _recv_exact(sock, n: int) -> bytes:
    try:
        return recv_exactly(sock, n)
    except OSError as e:   # ConnectionError included
        raise PeerLost(f"the other end of the shared-memory plane is gone ({e})") from None


def _encode(step: int) -> bytes:
    return int(step).to_bytes(_STEP, "little", signed=True)


def _decode(data: bytes) -> int:
    return int.from_bytes(data, "little", signed=True)


class Plane:
    """A server shard's side: gradient and reply slots for ``world`` workers of ``size`` float32 each,
    the published parameters (``size``), and a thread per connected worker calling ``server.push``
    (``server.push_async`` with ``server.reply_into`` for asynchronous updates)."""

    def __init__(self, server, world: int, size: int):
        self.server, self.world, self.size = server, world, size
        self.fd = os.memfd_create("distnn-plane", os.MFD_CLOEXEC)
        os.ftruncate(self.fd, _plane_bytes(world, size))
        self.memory = mmap.mmap(self.fd, _plane_bytes(world, size))
        self.slots, self.replies, self.published = _layout(self.memory, world, size)
        self.name = f"distnn-{os.getpid()}-{uuid.uuid4().hex[:12]}"
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind("\0" + self.name)
        self.listener.listen(world + 4)
        serve_connections(self.listener, self._serve, "plane-worker")

    @classmethod
    def open(cls, server, world: int, size: int):
        """(the plane, None), or (None, why not) where this host cannot give one."""
        try:
            return cls(server, world, size), None
        except (OSError, AttributeError) as e:
            return None, f"{type(e).__name__}: {e}"

    def _serve(self, conn) -> None:
        """One worker's connection: its rank, the memory's descriptor, then its steps."""
        rank = None
        try:
            _, uid, _ = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
            if uid != os.getuid():   # the memory is this user's processes' only (an abstract name has no mode)
                return
            rank = _decode(_recv_exact(conn, _STEP))
            socket.send_fds(conn, [_encode(self.world), _encode(self.size)], [self.fd])
            while True:
                kind, step, ahead, bound, slot, n = _HEADER.unpack(_recv_exact(conn, _HEADER.size))
                metrics = json.loads(_recv_exact(conn, n)) if n else None
                try:
                    if kind == 0:
                        self.server.push(rank, self.slots[rank, 0], step)
                        conn.sendall(_encode(step))
                    else:
                        _, version = self.server.reply_into(self.replies[rank, slot], self.server.push_async, rank,
                                                            self.slots[rank, slot], step, metrics,
                                                            None if bound == _NONE else bound,
                                                            None if ahead == _NONE else ahead)
                        conn.sendall(_encode(version))
                except StepAbandoned:
                    conn.sendall(_encode(-1))
        except (PeerLost, OSError):
            pass   # the worker is gone (its replacement connects anew)
        except Exception as e:   # noqa: BLE001 - the step failed here (a reducer's shards unanswered):
            # the worker sees its connection close (PeerLost), a failure the driver recovers from
            print(f"plane {self.name}: worker {rank}'s step failed: {e!r}", file=sys.stderr)
        finally:
            conn.close()

    def publish(self, parts: list) -> np.ndarray:
        """Write the parameters after a step, given as contiguous parts (P,) in all, where every worker on
        the node reads them."""
        np.concatenate(parts, out=self.published)
        return self.published

    def close(self) -> None:
        self.listener.close()


class PlaneClient:
    """A worker's side of one shard's plane: ``send`` a gradient part of a step, then ``receive`` the
    published parameters (a view of the shared memory, valid until this worker's next ``send``)."""

    def __init__(self, name: str, rank: int, timeout: float = 60.0):
        self.name, self.rank = name, rank
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        try:
            self.sock.connect("\0" + name)
            self.sock.sendall(_encode(rank))
            msg, fds, _, _ = socket.recv_fds(self.sock, 2 * _STEP, 1)
        except (ConnectionError, OSError) as e:
            self.sock.close()
            raise PeerLost(f"plane {name}: cannot connect ({e})") from None
        if len(msg) != 2 * _STEP or len(fds) != 1:
            raise PeerLost(f"plane {name}: no shared memory received")
        world, size = _decode(msg[:_STEP]), _decode(msg[_STEP:])
        self.memory = mmap.mmap(fds[0], _plane_bytes(world, size))
        os.close(fds[0])
        slots, replies, self.published = _layout(self.memory, world, size)
        self.slots, self.replies = slots[rank], replies[rank]
        self.sock.settimeout(None)   # a step waits for the slowest worker; the driver holds the deadline

    def _send(self, header: tuple, metrics=None) -> None:
        extra = b"" if metrics is None else json.dumps(metrics).encode()
        try:
            self.sock.sendall(_HEADER.pack(*header, len(extra)) + extra)
        except (ConnectionError, OSError) as e:
            raise PeerLost(f"the server shard of plane {self.name} is gone ({e})") from None

    def send(self, parts: list, step: int) -> None:
        """A gradient of ``step`` given as contiguous parts (one, or the K slices of the shards)."""
        np.concatenate(parts, out=self.slots[0])
        self._send((0, step, _NONE, _NONE, 0))

    def receive(self, step: int) -> np.ndarray:
        answer = _decode(_recv_exact(self.sock, _STEP))
        if answer != step:
            raise StepAbandoned(f"step {step} abandoned (shared-memory plane {self.name})")
        return self.published

    def send_async(self, grad: np.ndarray, slot: int, seen: int, metrics=None, bound=None, ahead=None) -> None:
        """An asynchronous update's gradient part through slot ``slot`` (0 or 1; its reply comes back in
        the reply slot of that number): see ``ParameterServer.push_async`` for the rest."""
        self.slots[slot][...] = grad
        self._send((1, seen, _NONE if ahead is None else ahead, _NONE if bound is None else bound, slot), metrics)

    def receive_async(self, slot: int) -> tuple:
        """(the parameters after the update sent through ``slot``, a view valid until that slot is used
        again; their update count). Raises StepAbandoned where the shard refused it."""
        version = _decode(_recv_exact(self.sock, _STEP))
        if version < 0:
            raise StepAbandoned(f"update refused (shared-memory plane {self.name}): the run is recovering")
        return self.replies[slot], version

    def close(self) -> None:
        self.sock.close()
        try:
            self.memory.close()
        except BufferError:   # a view of it is still held (the parameters): unmapped when it goes
            pass

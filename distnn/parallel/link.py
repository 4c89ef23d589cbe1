"""The step's data between machines: one TCP connection from a worker to a server shard on another
node, carrying the gradient up and the parameters down in chunks at the same time.

The shard listens on its node's address (``LinkServer``); Ray tells the workers where, with a secret
that a connection must present first (the port is reachable from the network; Ray's own calls are
authenticated, so the secret travels only over them). A step's gradient goes up as chunks, each a
16-byte header (step, chunk index) and the chunk's float32 values, in any order (the last layers'
gradients first when they leave during backward). The shard applies a chunk as soon as every worker's
part of it is in (``ParameterServer.give_chunk``) and sends its new parameters straight back, with the
same header, while the rest of the gradient is still coming up: both directions of the link are busy
together, and a step costs about one direction's time plus a chunk, not both directions one after
the other. A step that is abandoned (another worker failed) is answered with chunk index -1.

Each side reads and writes in threads of its own (the socket calls release the GIL): the worker's
thread only queues chunks (``send``) and later waits for the last parameters (``receive``). A top-k
step is one message each way, and the shard's thread that reads it sends the reply (``_answer_sparse``).
"""
from __future__ import annotations

import hmac
import queue
import secrets
import socket
import struct
import sys
import threading

import numpy as np

from .._io import recv_into_exactly, serve_connections
from . import affinity
from .compress import Sparse, Update
from .server import StepAbandoned
from .shm import PeerLost

_HEAD = struct.Struct("<2q")     # step, chunk index (-1: the step was abandoned; _SPARSE: see below)
_SPARSE = -2   # a whole top-k gradient (up) or the step's sparse mean (down): count k, k int32, k float32
_COUNT = struct.Struct("<q")
_HELLO = struct.Struct("<16s2q")  # secret, first rank, number of ranks
_SIZES = struct.Struct("<2q")    # the shard's size and chunk length, in floats


def _recv_into(sock, view: memoryview) -> None:
    try:
        recv_into_exactly(sock, view)
    except OSError as e:   # ConnectionError included
        raise PeerLost(f"the link's other end is gone ({e})") from None


def _recv(sock, n: int) -> bytes:
    buf = bytearray(n)
    _recv_into(sock, memoryview(buf))
    return bytes(buf)


def _send(sock, *parts) -> None:
    """``parts`` (bytes, arrays) in one system call where the socket takes them whole: one train of
    packets, not one per part."""
    views = [memoryview(p).cast("B") for p in parts]
    while views:
        sent = sock.sendmsg(views)
        while views and sent >= views[0].nbytes:
            sent -= views[0].nbytes
            views.pop(0)
        if views:
            views[0] = views[0][sent:]


def _send_sparse(sock, step: int, payload: Sparse) -> None:
    _send(sock, _HEAD.pack(step, _SPARSE) + _COUNT.pack(payload.index.size),
          np.ascontiguousarray(payload.index, np.int32), np.ascontiguousarray(payload.values, np.float32))


def _recv_sparse(sock, size: int) -> Sparse:
    (k,) = _COUNT.unpack(_recv(sock, _COUNT.size))
    index, values = np.empty(k, np.int32), np.empty(k, np.float32)
    _recv_into(sock, memoryview(index).cast("B"))
    _recv_into(sock, memoryview(values).cast("B"))
    return Sparse(index, values, size)


# A step's chunks are short bursts with pauses between them, which BBR paces by its model of the
# path: through a 1 Gbit/s link shaped by tbf (the emulated machines), BBR, this host's default, held
# a chunk for 25-87 ms at a time, 12-20 times an epoch, with no packet dropped or retransmitted; with
# cubic or reno no step waited more than 15 ms (docs/benchmarks.md). The first of these the host allows.
CONGESTION_CONTROL = (b"cubic", b"reno")


def _tune(sock) -> None:
    """No Nagle delay, and a loss-based congestion control (``CONGESTION_CONTROL``) where the host
    allows one (else its default)."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    option = getattr(socket, "TCP_CONGESTION", None)   # Linux only
    for name in CONGESTION_CONTROL if option is not None else ():
        try:
            sock.setsockopt(socket.IPPROTO_TCP, option, name)
            return
        except OSError:   # not built into this kernel, or not allowed for this user
            continue


class LinkServer:
    """A shard's side: listens on ``host``; a reader and a writer thread per connected worker."""

    def __init__(self, server, host: str, chunk: int):
        self.server, self.chunk = server, chunk
        self.secret = secrets.token_bytes(16)
        self.listener = socket.create_server((host, 0), backlog=64)
        self.address = (host, self.listener.getsockname()[1])
        self.closed = False
        serve_connections(self.listener, self._serve, "link-reader")

    def offer(self) -> tuple:
        """(host, port, secret): what a worker needs to connect."""
        return (*self.address, self.secret)

    def _serve(self, conn) -> None:
        steps = queue.Queue()   # the reader tells the writer each chunked step it has begun
        try:
            _tune(conn)
            conn.settimeout(30.0)
            secret, first, count = _HELLO.unpack(_recv(conn, _HELLO.size))
            if not hmac.compare_digest(secret, self.secret):
                return
            conn.settimeout(None)   # a step waits for the slowest worker; the driver holds the deadline
            rank = first if count == 1 else tuple(range(first, first + count))
            generation = self.server.generation   # a recovery after this makes the connection stale
            conn.sendall(_SIZES.pack(self.server.params.size, self.chunk))
            threading.Thread(target=self._write, args=(conn, steps), name="link-writer", daemon=True).start()
            self._read(conn, rank, steps, generation)
        except (PeerLost, OSError):
            pass   # the worker is gone (its replacement connects anew)
        except Exception as e:   # noqa: BLE001 - this connection's step failed; the worker sees it close
            print(f"link {self.address}: a worker's step failed: {e!r}", file=sys.stderr)
        finally:
            steps.put(None)
            conn.close()

    def _read(self, conn, rank, steps, generation: int) -> None:
        chunks = self.server.chunks
        buf = np.empty(self.server.params.size, np.float32)
        current = None
        while True:
            step, i = _HEAD.unpack(_recv(conn, _HEAD.size))
            if i == _SPARSE:
                grad = _recv_sparse(conn, self.server.params.size)
            else:
                lo, hi = chunks[i]
                _recv_into(conn, memoryview(buf[lo:hi]).cast("B"))
            if generation != self.server.generation:
                return   # a worker of before a recovery: what it still sends belongs to no step
            if i == _SPARSE:
                self._answer_sparse(conn, rank, grad, step)
                continue
            if step != current:
                current = step
                steps.put(step)
            try:
                self.server.give_chunk(rank, i, buf[lo:hi], step)
            except StepAbandoned:
                pass   # the writer answers -1

    def _answer_sparse(self, conn, rank, grad: Sparse, step: int) -> None:
        """A top-k gradient: give it, wait for the step's sparse mean and send it back, all in the
        reading thread (a hand-off to the writer thread cost a wake-up: 6% of a top-k epoch)."""
        try:
            self.server.give(rank, grad, step)
            mean = self.server.take(step).mean
        except StepAbandoned:
            conn.sendall(_HEAD.pack(step, -1))
            return
        _send_sparse(conn, step, mean)

    def _write(self, conn, steps) -> None:
        params, chunks = self.server.params, self.server.chunks
        try:
            while (step := steps.get()) is not None:
                sent = set()
                try:
                    while len(sent) < len(chunks):
                        ready = self.server.applied_chunks(step, sent, lambda: self.closed or steps.qsize())
                        if not ready:
                            return   # the connection closed (the reader said so) or the shard did
                        for i in ready:
                            lo, hi = chunks[i]
                            _send(conn, _HEAD.pack(step, i), params[lo:hi])
                            sent.add(i)
                except StepAbandoned:
                    conn.sendall(_HEAD.pack(step, -1))
        except OSError:
            pass

    def close(self) -> None:
        self.closed = True
        self.listener.close()


class LinkClient:
    """A worker's side of one shard's link: ``send`` a step's gradient (queued, sent by a thread of
    its own), ``receive`` the parameters after it (filled in by another thread as chunks come back)."""

    def __init__(self, offer: tuple, rank, timeout: float = 60.0):
        host, port, secret = offer
        ranks = (rank,) if isinstance(rank, int) else tuple(rank)
        try:
            self.sock = socket.create_connection((host, port), timeout=timeout)
            _tune(self.sock)
            self.sock.sendall(_HELLO.pack(secret, ranks[0], len(ranks)))
            size, chunk = _SIZES.unpack(_recv(self.sock, _SIZES.size))
        except (ConnectionError, OSError) as e:
            raise PeerLost(f"link to {host}:{port}: cannot connect ({e})") from None
        self.sock.settimeout(None)
        self.where = f"{host}:{port}"
        self.chunks = [(lo, min(lo + chunk, size)) for lo in range(0, size, chunk)] if chunk else [(0, size)]
        self.params = np.empty(size, np.float32)
        self._out = queue.Queue()
        self._got = threading.Condition()
        self._received, self._step, self._error, self._queued, self._update = 0, None, None, set(), None
        threading.Thread(target=self._send_loop, name="link-send", daemon=True).start()
        threading.Thread(target=self._receive_loop, name="link-receive", daemon=True).start()

    def send_from(self, grad: np.ndarray, lo: int, step: int) -> None:
        """Queue the chunks of ``grad`` (the shard's slice) of ``step`` that lie wholly at or after
        ``lo`` and are not queued yet (backward has completed them), last first."""
        self._begin(step)
        for i in reversed(range(len(self.chunks))):
            if self.chunks[i][0] >= lo and i not in self._queued:
                self._queued.add(i)
                self._out.put((step, i, grad[self.chunks[i][0]:self.chunks[i][1]]))

    def send(self, grad, step: int) -> None:
        """Queue every chunk of ``grad`` (the shard's slice) of ``step`` not queued yet, last first; a
        top-k gradient (``Sparse``) goes whole, and the reply is then the step's sparse mean."""
        if isinstance(grad, Sparse):
            self._begin(step)
            self._out.put((step, _SPARSE, grad))
        else:
            self.send_from(grad, 0, step)

    def _begin(self, step: int) -> None:
        with self._got:
            if self._step != step:
                self._step, self._received, self._queued = step, 0, set()

    def receive(self, step: int) -> np.ndarray:
        """The shard's parameters after ``step`` (this client's buffer, valid until its next step)."""
        with self._got:
            self._got.wait_for(lambda: self._received == len(self.chunks) or self._error is not None)
            if self._error is not None:
                raise self._error
            update, self._update = self._update, None
            return self.params if update is None else update

    def _send_loop(self) -> None:
        affinity.release()   # started by the worker's compute thread, which may be pinned to its core
        try:
            while (item := self._out.get()) is not None:
                step, i, part = item
                if i == _SPARSE:
                    _send_sparse(self.sock, step, part)
                else:
                    _send(self.sock, _HEAD.pack(step, i), part)
        except OSError as e:
            self._fail(PeerLost(f"the server shard at {self.where} is gone ({e})"))

    def _receive_loop(self) -> None:
        affinity.release()
        try:
            while True:
                step, i = _HEAD.unpack(_recv(self.sock, _HEAD.size))
                if i == _SPARSE:
                    update = Update(_recv_sparse(self.sock, self.params.size), step)
                    with self._got:
                        self._update, self._received = update, len(self.chunks)
                        self._got.notify_all()
                    continue
                if i < 0:
                    self._fail(StepAbandoned(f"step {step} abandoned (link to {self.where})"), keep=True)
                    continue
                lo, hi = self.chunks[i]
                _recv_into(self.sock, memoryview(self.params[lo:hi]).cast("B"))
                with self._got:
                    self._received += 1
                    self._got.notify_all()
        except PeerLost as e:
            self._fail(e)

    def _fail(self, error, keep: bool = False) -> None:
        with self._got:
            if self._error is None or not keep:
                self._error = error
            self._got.notify_all()

    def close(self) -> None:
        self._out.put(None)
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()

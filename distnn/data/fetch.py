"""Shards that travel: a machine that lacks the shards a worker reads gets exactly those from one that
has them, verified against the manifest and renamed into a cache on that machine.

The cache of a dataset is ``<cache_dir>/datasets/<name>-<digest>`` (``_io.cache_dir``: under
``DISTNN_CACHE_DIR``), ``digest`` being the first 16 hex digits of the manifest's SHA-256: two datasets,
or two preparations of one, never mix. A shard is looked for at the run's path first, then in the cache;
either copy counts only if its SHA-256 is the manifest's. A fetch writes under a temporary name and
renames once the whole file has the manifest's checksum; a lock file per shard makes the workers of one
machine (and two runs sharing a cache) fetch it once.

The bytes travel over TCP, as the step's data between machines does (``parallel/link.py``): Ray
places a ``ShardSource`` on the machine that has the files and carries its offer (address, port and
a secret) to the workers, which stream each file straight from the source's page cache (``sendfile``).
Ray's own object transfer, measured on two emulated machines with a 1 Gbit/s link, moved 4-16 MB
chunks at 84-90 MB/s once warm and 28-36 MB/s on a run's first transfer. Plain Python with no Ray.
"""
from __future__ import annotations

import fcntl
import hashlib
import hmac
import os
import secrets
import socket
import struct
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from .._io import atomic_path, atomic_write_text, cache_dir, recv_exactly, serve_connections
from .errors import DataError
from .formats import file_digest

CHUNK = 4 << 20   # bytes per sendfile call: the progress counter moves by this much
_REQUEST = struct.Struct("<16sH")   # secret, length of the file name that follows
_SIZE = struct.Struct("<q")
STREAMS = 2   # files fetched at once: one's checks and writes overlap the other's bytes on the wire


def manifest_digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def cache_folder(name: str, manifest_text: str) -> Path:
    """Where this machine keeps the fetched shards of the dataset whose manifest is ``manifest_text``."""
    return cache_dir() / "datasets" / f"{name}-{manifest_digest(manifest_text)[:16]}"


class ShardSource:
    """Serves the shards of the prepared dataset folder ``path`` over TCP (``open``). Each file is
    checked against the manifest (``entries``: file -> its manifest entry) before its first byte
    leaves, so a machine never receives a copy that the manifest does not describe."""

    def __init__(self, path, entries: dict):
        self.path, self.entries = Path(path), entries
        self._checked, self._checking, self._lock = {}, {}, threading.Lock()
        self.served = 0   # bytes sent so far: the progress the driver shows
        self.listener = None

    def check(self, file: str) -> int:
        """The size in bytes of ``file``, after checking it against the manifest."""
        if file not in self.entries:
            raise DataError(f"{self.path}: {file!r} is not a shard of this dataset's manifest")
        with self._lock:
            checking = self._checking.setdefault(file, threading.Lock())
        with checking:   # one check per file; other files' checks and sends go on meanwhile
            if file not in self._checked:
                path = self.path / file
                if not path.is_file():
                    raise DataError(f"{path}: shard missing on the machine that serves it too; prepare the "
                                    "dataset again with --force")
                if file_digest(path) != self.entries[file]["sha256"]:
                    raise DataError(f"{path}: checksum differs from the manifest on the machine that serves it "
                                    "too; prepare the dataset again with --force")
                self._checked[file] = path.stat().st_size
            return self._checked[file]

    def open(self, host: str, timeout: float = 60.0, files=()) -> tuple:
        """Listen on ``host`` (the address other machines reach this one at); returns the offer (host,
        port, secret) a ``Stream`` connects with. A connection silent for ``timeout`` s is dropped.
        ``files``: those to be asked for, checked from now on in a thread of their own, so that one
        file's check overlaps another's sending."""
        self.secret, self.timeout = secrets.token_bytes(16), timeout
        self.listener = socket.create_server((host, 0), backlog=64)
        serve_connections(self.listener, self._serve, "shards-send")
        threading.Thread(target=self._check_all, args=(list(files),), name="shards-check", daemon=True).start()
        return (host, self.listener.getsockname()[1], self.secret)

    def _check_all(self, files) -> None:
        for file in files:
            try:
                self.check(file)
            except DataError:
                pass   # said to the worker that asks for it

    def progress(self) -> int:
        """Bytes sent so far (counted as each chunk of up to ``CHUNK`` leaves)."""
        return self.served

    def close(self) -> None:
        if self.listener is not None:
            self.listener.close()

    def _serve(self, conn) -> None:
        """One request: the secret and a file name in; its size and bytes out, or -1 and why not."""
        with conn:
            try:
                conn.settimeout(self.timeout)
                secret, length = _REQUEST.unpack(recv_exactly(conn, _REQUEST.size))
                if not hmac.compare_digest(secret, self.secret):
                    return
                file = recv_exactly(conn, length).decode()
                try:
                    size = self.check(file)
                except DataError as e:
                    why = str(e).encode()
                    conn.sendall(_SIZE.pack(-1) + _SIZE.pack(len(why)) + why)
                    return
                conn.sendall(_SIZE.pack(size))
                self._send_file(conn, self.path / file, size)
            except (OSError, ConnectionError):
                pass   # the fetching worker is gone; it fails on its side

    def _send_file(self, conn, path: Path, size: int) -> None:
        with open(path, "rb") as f:
            for offset in range(0, size, CHUNK):
                n = min(CHUNK, size - offset)
                with self._lock:   # counted as it leaves: a worker never holds bytes not counted yet
                    self.served += n
                sent = conn.sendfile(f, offset, n)   # straight from the page cache, no copy in Python
                if sent != n:
                    raise ConnectionError(f"sent {sent} of {n} bytes")


class Stream:
    """A worker's side of a ``ShardSource``: ``offer`` from its ``open``; every wait ``timeout`` s."""

    def __init__(self, offer: tuple, timeout: float):
        (self.host, self.port, self.secret), self.timeout = offer, timeout

    def file(self, name: str):
        """(size, blocks): the size of shard ``name`` and an iterator of its bytes in order."""
        conn = socket.create_connection((self.host, self.port), timeout=self.timeout)
        try:
            encoded = name.encode()
            conn.sendall(_REQUEST.pack(self.secret, len(encoded)) + encoded)
            (size,) = _SIZE.unpack(recv_exactly(conn, _SIZE.size))
            if size < 0:
                (length,) = _SIZE.unpack(recv_exactly(conn, _SIZE.size))
                raise DataError(recv_exactly(conn, length).decode())
        except BaseException:
            conn.close()
            raise
        return size, self._blocks(conn, size)

    @staticmethod
    def _blocks(conn, size: int):
        buf = memoryview(bytearray(1 << 20))
        with conn:
            left = size
            while left:
                n = conn.recv_into(buf, min(left, len(buf)))
                if n == 0:
                    raise ConnectionError(f"the machine serving the shards closed after {size - left} of {size} bytes")
                left -= n
                yield buf[:n]


class LocalShards:
    """The shards ``files`` of ``dataset`` (a ``ShardedDataset``) as found on this machine: at the run's
    path or in the dataset's cache folder. What is found goes into ``dataset.found``, from which the
    dataset then reads without checking again."""

    def __init__(self, dataset, files):
        self.path, self.entries, self.files = dataset.path, dataset.entries(), sorted(set(files))
        self.cache = cache_folder(dataset.name, dataset.manifest_text)
        self.manifest_text = dataset.manifest_text
        self.found = dataset.found

    def locate(self) -> list[str]:
        """Find each file's copy that matches the manifest; the files found nowhere, in order."""
        for file in self.files:
            if file in self.found:
                continue
            for place in (self.path / file, self.cache / file):
                if place.is_file() and file_digest(place) == self.entries[file]["sha256"]:
                    self.found[file] = place
                    break
        return [f for f in self.files if f not in self.found]

    def fetch(self, source: Stream, timeout: float) -> int:
        """Fetch the files not found from ``source`` into the cache, ``STREAMS`` at a time; every wait
        (for another worker's fetch of the same file, for bytes) ends within ``timeout`` seconds.
        Returns the bytes received."""
        missing = self.locate()
        if missing and not (self.cache / "manifest.json").is_file():
            atomic_write_text(self.cache / "manifest.json", self.manifest_text)   # says what the folder holds
        with ThreadPoolExecutor(STREAMS, thread_name_prefix="shards-fetch") as pool:
            return sum(pool.map(lambda f: self._fetch_locked(f, source, timeout), missing))

    def _fetch_locked(self, file: str, source: Stream, timeout: float) -> int:
        target, received = self.cache / file, 0
        with _locked(self.cache / f".{file}.lock", timeout):
            if not (target.is_file() and file_digest(target) == self.entries[file]["sha256"]):
                received = self._fetch_one(file, target, source)
            # else: another worker of this machine fetched it meanwhile
        self.found[file] = target
        return received

    def _fetch_one(self, file: str, target: Path, source: Stream) -> int:
        size, blocks = source.file(file)
        digest, received = hashlib.sha256(), 0
        with atomic_path(target, size) as tmp:
            with open(tmp, "wb") as out:
                for block in blocks:
                    out.write(block)
                    digest.update(block)
                    received += len(block)
            if received != size or digest.hexdigest() != self.entries[file]["sha256"]:
                raise DataError(f"{target}: the fetched copy ({received} of {size} bytes) does not match the "
                                "manifest's checksum; the serving machine's file changed during the run?")
        return received


class _locked:
    """An exclusive lock on ``path`` (created if need be), waited for up to ``timeout`` seconds."""

    def __init__(self, path: Path, timeout: float):
        self.path, self.timeout = path, timeout

    def __enter__(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return self
            except BlockingIOError:
                if time.monotonic() > deadline:
                    os.close(self.fd)
                    raise DataError(f"{self.path}: held by another process for over {self.timeout:g} s (a "
                                    "fetch of the same shard that does not end); remove the file if no run "
                                    "uses this cache") from None
                time.sleep(0.05)

    def __exit__(self, *exc):
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)

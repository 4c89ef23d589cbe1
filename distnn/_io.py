"""Writing files so that a crash or a full disk never leaves a half-written one: a temporary name, then
a rename; a write that fails (a full disk, a read-only folder) removes its temporary file and raises a
WriteFailed that names the file, the space it needed and the space free."""
from __future__ import annotations

import os
import re
import shutil
import threading
from contextlib import contextmanager
from pathlib import Path


class WriteFailed(OSError):
    """A file could not be written; the message is one line naming it, the space needed and free."""

    def __init__(self, path, error: OSError, needed: int | None = None):
        self.path, self.needed = Path(path), needed
        self.free = free_bytes(self.path.parent)
        code = error.errno
        if code is None:  # h5py puts the C library's errno inside its message
            found = re.search(r"errno = (\d+)", str(error))
            code = int(found.group(1)) if found else None
        text = str(error).strip()
        reason = os.strerror(code) if code else (text.splitlines()[0][:120] if text else type(error).__name__)
        need = f"needs about {_mb(needed)}, " if needed else ""
        free = f"{_mb(self.free)} free" if self.free is not None else "free space unknown"
        super().__init__(code, f"{self.path}: cannot write ({reason}); {need}{free} on its disk")

    def __str__(self):
        return self.strerror


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"


def free_bytes(folder) -> int | None:
    folder = Path(folder)
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


@contextmanager
def atomic_path(path, needed: int | None = None):
    """Yields a temporary path beside ``path``; after the block it is renamed to ``path``. On any
    error the temporary file is removed, and an OSError becomes a WriteFailed."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")   # one per writer
    try:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            yield tmp
            os.replace(tmp, path)
        except WriteFailed:
            raise
        except OSError as e:
            raise WriteFailed(path, e, needed) from None
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_text(path, text: str) -> None:
    with atomic_path(path, len(text.encode())) as tmp:
        tmp.write_text(text)


def cache_dir() -> Path:
    """This machine's cache of distnn (calibrations, fetched shards): ``DISTNN_CACHE_DIR``, else
    ``$XDG_CACHE_HOME/distnn`` or ``~/.cache/distnn``."""
    own = os.environ.get("DISTNN_CACHE_DIR")
    if own:
        return Path(own)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "distnn"


# -- sockets: what the links, the shared-memory planes and the shard source have in common ----------
def serve_connections(listener, serve, name: str) -> None:
    """Accept connections on ``listener`` until it is closed, each served by ``serve(conn)`` on a
    daemon thread of its own (named ``name``)."""
    def accept():
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return   # the listener was closed
            threading.Thread(target=serve, args=(conn,), name=name, daemon=True).start()
    threading.Thread(target=accept, name=f"{name}-accept", daemon=True).start()


def recv_into_exactly(sock, view: memoryview) -> None:
    """Fill ``view`` from ``sock``; ConnectionError if the other end closes first."""
    while view.nbytes:
        n = sock.recv_into(view)
        if n == 0:
            raise ConnectionError("the other end closed")
        view = view[n:]


def recv_exactly(sock, n: int) -> bytes:
    """``n`` bytes from ``sock``; ConnectionError if the other end closes first."""
    buf = bytearray(n)
    recv_into_exactly(sock, memoryview(buf))
    return bytes(buf)


"""What the host is: its CPU's name, its cache sizes and the BLAS kernel numpy runs, read once.

Kernels size their blocks from the caches (``cache_bytes``) rather than from constants tuned on one
CPU; benchmark tables name the CPU and the BLAS kernel (``describe``).
"""
from __future__ import annotations

import functools
import platform
from pathlib import Path

_CACHES = Path("/sys/devices/system/cpu/cpu0/cache")


def _size(text: str) -> int:
    """'2048K' / '32M' / '512' -> bytes."""
    text = text.strip().upper()
    scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
    return int(text.rstrip("KMG")) * scale


@functools.cache
def cache_bytes(level: int, default: int) -> int:
    """The size of one core's data (or unified) cache at ``level``, from sysfs; ``default`` where
    it cannot be read (not Linux, a container hiding it)."""
    try:
        for index in sorted(_CACHES.glob("index*")):
            kind = (index / "type").read_text().strip()
            if int((index / "level").read_text()) == level and kind in ("Data", "Unified"):
                return _size((index / "size").read_text())
    except (OSError, ValueError):
        pass
    return default


@functools.cache
def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def blas_kernel() -> str:
    """numpy's BLAS as threadpoolctl names it, e.g. 'openblas 0.3.31 SkylakeX' (where other packages
    loaded a BLAS of their own too, the one in numpy's folder)."""
    from threadpoolctl import threadpool_info
    found = [lib for lib in threadpool_info() if lib.get("user_api") == "blas"]
    found.sort(key=lambda lib: "numpy" not in lib.get("filepath", ""))
    for lib in found:
        return " ".join(str(lib[k]) for k in ("internal_api", "version", "architecture") if lib.get(k))
    return "unknown"


def describe() -> dict:
    """The host as benchmark tables and JSON name it."""
    return {"cpu": cpu_name(), "blas": blas_kernel(), "l2_bytes": cache_bytes(2, 0), "l3_bytes": cache_bytes(3, 0)}

"""Compiled kernels for the passes numpy cannot fuse (``fused.py``: batch norm with its ReLU, a residual
add with its ReLU, the ReLU backward, 2x2 max pooling, im2col's fold of the column gradient, a step of
the LSTM's forward and backward, Adam's update), the direct convolution (``direct.py``) and
Winograd's tile transforms (``tiles.py``): numba, one thread (the processes are the parallelism),
compiled once per machine into numba's on-disk cache.

Every kernel has a numpy twin in the operator that calls it (for the direct convolution, im2col): the
reference a reader studies and the tests hold the kernel to. ``DISTNN_KERNELS=numpy`` selects the numpy path everywhere (so does a machine
without numba); ``DISTNN_KERNELS=numba`` (the default) the kernels. numba is imported on the first
kernel call, not with distnn.
"""
from __future__ import annotations

import os

MODES = ("numba", "numpy")
_forced: str | None = None
_module = None


def mode() -> str:
    """'numba' or 'numpy': ``use`` if called, else DISTNN_KERNELS, else numba where it imports."""
    chosen = _forced or os.environ.get("DISTNN_KERNELS", "numba")
    if chosen not in MODES:
        raise ValueError(f"DISTNN_KERNELS={chosen!r}: choose numba or numpy")
    return chosen if chosen == "numpy" or _compiled() is not None else "numpy"


def use(name: str | None) -> None:
    """Select the kernels for this process (None: back to DISTNN_KERNELS); tests switch with it."""
    if name is not None and name not in MODES:
        raise ValueError(f"kernels: choose numba or numpy, got {name!r}")
    global _forced
    _forced = name


def compiled():
    """The module of compiled kernels (``fused``), or None when the numpy path is selected."""
    return _compiled() if mode() == "numba" else None


def _compiled():
    global _module
    if _module is None:
        try:
            from . import fused
        except ImportError:   # no numba here: the numpy path
            _module = False
        else:
            _module = fused
    return _module or None


def dense_flat(*arrays):
    """1-D views of arrays that share one shape and one dense memory layout (any axis order), so
    that an element-wise kernel may run over their memory in order; None when they do not."""
    first = arrays[0]
    if any(a.shape != first.shape or a.strides != first.strides or a.dtype != first.dtype for a in arrays):
        return None
    from ..ops.layout import memory_order   # (here: ops imports this package)
    order = memory_order(first)
    views = [a.transpose(order) for a in arrays]
    if not views[0].flags.c_contiguous:
        return None
    return [v.reshape(-1) for v in views]

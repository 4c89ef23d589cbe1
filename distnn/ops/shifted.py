"""Convolution at stride 1 as kh * kw shifted matrix products over channels-last data.

With the padded input laid out (N, Hp, Wp, C) and flattened to rows (N*Hp*Wp, C), the input pixel
that kernel offset (i, j) sees for output position p = (n, y, x) is row p + i*Wp + j: every offset is
one contiguous block of rows shifted by a constant. So

    Y[p] = sum over (i, j) of X[p + i*Wp + j] @ W[i, j]          (W[i, j] = w[:, :, i, j]^T, (C, O))

is kh * kw products of contiguous (L, C) @ (C, O) blocks accumulated into the output, with no im2col
copy (kh * kw times the input) and no Winograd transforms: what pays when C is small and the copies
dominate. The outputs are computed for all Hp x Wp positions (the ones past Ho, Wo read wrapped rows
and are cropped), an extra (Hp*Wp) / (Ho*Wo) of work. Backward is the same shifts transposed:
dX[p + i*Wp + j] += dY[p] @ W[i, j]^T and dW[i, j] = X[shift]^T @ dY, with dY zero at the cropped
positions.
"""
from __future__ import annotations

import numpy as np

from .layout import zero_padded


def offsets(kernel, wp):
    """Row shift of each kernel offset (i, j), in (i, j) order."""
    kh, kw = kernel
    return [i * wp + j for i in range(kh) for j in range(kw)]


def forward(rows: np.ndarray, w: np.ndarray, padded_shape) -> np.ndarray:
    """rows (N*Hp*Wp, C) of the padded input, w (O, C, kh, kw) -> y (N, Ho, Wo, O), C-contiguous."""
    n, hp, wp, _ = padded_shape
    o, _, kh, kw = w.shape
    shifts = offsets((kh, kw), wp)
    length = rows.shape[0] - shifts[-1]
    wk = w.transpose(2, 3, 1, 0).reshape(kh * kw, -1, o)      # (kh*kw, C, O)
    out = np.zeros((rows.shape[0], o), rows.dtype)
    part = np.empty((length, o), rows.dtype)
    np.matmul(rows[:length], wk[0], out=out[:length])
    for k, s in enumerate(shifts[1:], 1):
        np.matmul(rows[s:s + length], wk[k], out=part)
        out[:length] += part
    return np.ascontiguousarray(out.reshape(n, hp, wp, o)[:, :hp - kh + 1, :wp - kw + 1])


def spread(g: np.ndarray, padded_shape) -> np.ndarray:
    """g (N, Ho, Wo, O) -> (N*Hp*Wp, O) rows, zero at the positions forward cropped."""
    _, hp, wp, _ = padded_shape
    full = zero_padded(g, (0, hp - g.shape[1], 0, wp - g.shape[2]), axes=(1, 2))
    return full.reshape(-1, g.shape[3])


def filter_grad(rows: np.ndarray, grows: np.ndarray, kernel, wp) -> np.ndarray:
    """dW (O, C, kh, kw) from the input rows (N*Hp*Wp, C) and ``spread`` output gradient rows."""
    shifts = offsets(kernel, wp)
    length = rows.shape[0] - shifts[-1]
    gw = np.stack([rows[s:s + length].T @ grows[:length] for s in shifts])     # (kh*kw, C, O)
    return gw.reshape(*kernel, *gw.shape[1:]).transpose(3, 2, 0, 1)


def input_grad(grows: np.ndarray, w: np.ndarray, padded_shape) -> np.ndarray:
    """dX of the padded input (N, Hp, Wp, C) from the ``spread`` output gradient rows."""
    n, hp, wp, c = padded_shape
    o, _, kh, kw = w.shape
    shifts = offsets((kh, kw), wp)
    length = grows.shape[0] - shifts[-1]
    wk = w.transpose(2, 3, 0, 1).reshape(kh * kw, o, c)      # (kh*kw, O, C)
    gx = np.zeros((grows.shape[0], c), grows.dtype)
    part = np.empty((length, c), grows.dtype)
    for k, s in enumerate(shifts):
        np.matmul(grows[:length], wk[k], out=part)
        gx[s:s + length] += part
    return gx.reshape(n, hp, wp, c)

"""The numba kernels (see ``kernels/__init__.py``). Rows are (M, C): M positions of C channels,
C-contiguous; statistics are accumulated in float64 whatever the data's dtype."""
from __future__ import annotations

import numpy as np
from numba import njit


@njit(cache=True, nogil=True)
def batch_stats(rows):
    """Per-channel mean and (biased) variance of rows (M, C), two passes, in float64."""
    m, c = rows.shape
    mean = np.zeros(c)
    for i in range(m):
        for j in range(c):
            mean[j] += rows[i, j]
    mean /= m
    var = np.zeros(c)
    for i in range(m):
        for j in range(c):
            d = rows[i, j] - mean[j]
            var[j] += d * d
    return mean, var / m


@njit(cache=True, nogil=True)
def scale_shift(rows, scale, shift, relu, out):
    """out = rows * scale + shift per channel (C,), then max(., 0) when ``relu``."""
    m, c = rows.shape
    for i in range(m):
        for j in range(c):
            v = rows[i, j] * scale[j] + shift[j]
            out[i, j] = max(v, 0) if relu else v


@njit(cache=True, nogil=True)
def batch_norm_backward(g, rows, y, mean, invstd, scale, relu, training, gx):
    """Gradients of y = [relu](gamma * (x - mean) * invstd + beta) over rows (M, C): gx written into
    ``gx`` (M, C); returns (ggamma, gbeta) in float64. With ``training`` the batch statistics' own
    gradients are included: gx = scale (g - gbeta / m - xhat ggamma / m)."""
    m, c = rows.shape
    gbeta, ggamma = np.zeros(c), np.zeros(c)
    for i in range(m):
        for j in range(c):
            gij = g[i, j] if not relu or y[i, j] > 0 else 0.0
            gbeta[j] += gij
            ggamma[j] += gij * (rows[i, j] - mean[j]) * invstd[j]
    a, b = np.zeros(c), np.zeros(c)   # gx = scale * g - a * (x - mean) - b
    for j in range(c):
        if training:
            a[j] = scale[j] * invstd[j] * ggamma[j] / m
            b[j] = scale[j] * gbeta[j] / m
    for i in range(m):
        for j in range(c):
            gij = g[i, j] if not relu or y[i, j] > 0 else 0.0
            gx[i, j] = scale[j] * gij - a[j] * (rows[i, j] - mean[j]) - b[j]
    return ggamma, gbeta


@njit(cache=True, nogil=True)
def add_relu(a, b, out):
    """out = max(a + b, 0) over flat arrays."""
    for i in range(a.size):
        out[i] = max(a[i] + b[i], 0)


@njit(cache=True, nogil=True)
def relu_grad(g, y, out):
    """out = g where y > 0, else 0, over flat arrays."""
    for i in range(g.size):
        out[i] = g[i] if y[i] > 0 else 0

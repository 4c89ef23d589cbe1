"""Winograd's tile transforms (``ops/winograd.py``) compiled (numba).

Both apply a small matrix M (R x K) along the two axes of a tile of K x K pixels, each pixel a
contiguous run of L = N * C values ((H, W, N, C) memory):

- ``tile``: dst[a, b, i, j, :] = sum over k, l of M[a, k] M[b, l] src[i*s + k, j*s + l, lo:hi] for
  the tiles at stride s of an image src (H, W, L), into dst (R, R, th, tw, hi - lo) (the input's
  B^T d B, the output gradient's A dY A^T);
- ``untile``: dst[i*R + a, j*R + b, lo:hi] = sum over k, l of M[a, k] M[b, l] src[k, l, i, j, :],
  from src (K, K, th, tw, hi - lo) into the blocks of an image dst (th*R, tw*R, L) (the output's
  A^T m A).

lo:hi picks some images' values of each pixel's run (a band of the batch, ``ops.winograd._bands``).

Each tile's runs go a chunk of CHUNK values at a time: M along the rows into a (R, K, CHUNK) buffer
that stays in L1, then along the columns into dst. M comes as its nonzero entries per row (columns,
values, count: ``ops.winograd.entries``), added in their order, as the numpy passes add them, so both
paths round alike; each term is one loop over the chunk that LLVM vectorises. (Kernels generated per
matrix with the entries written in ran 1.5-2x faster but took 20-36 s each to compile, 95 s for F(2x2)
and F(4x4): too long for a run's first step on a new machine.)
"""
from __future__ import annotations

import numpy as np
from numba import njit

CHUNK = 256


@njit(cache=True, nogil=True, error_model="numpy")
def _combine(rows, columns, values, count, d):
    """d = sum over e < count of values[e] * rows[columns[e]][:len(d)]."""
    n = d.shape[0]
    v, s = values[0], rows[columns[0]]
    for q in range(n):
        d[q] = v * s[q]
    for e in range(1, count):
        v, s = values[e], rows[columns[e]]
        for q in range(n):
            d[q] += v * s[q]


@njit(cache=True, nogil=True, error_model="numpy")
def tile(src, columns, values, count, stride, lo, hi, dst):
    """See the module's docstring; src (H, W, L), dst (R, R, th, tw, hi - lo): the values lo:hi of each
    of src's runs."""
    r, k = dst.shape[0], columns.max() + 1
    buf = np.empty((r, k, CHUNK), src.dtype)
    for i in range(dst.shape[2]):
        for j in range(dst.shape[3]):
            for p in range(0, hi - lo, CHUNK):
                n = min(hi - lo - p, CHUNK)
                for a in range(r):              # M along the tile's rows
                    for c in range(k):
                        out, at = buf[a, c], j * stride + c
                        v, s = values[a, 0], src[i * stride + columns[a, 0], at, lo + p:lo + p + n]
                        for q in range(n):
                            out[q] = v * s[q]
                        for e in range(1, count[a]):
                            v, s = values[a, e], src[i * stride + columns[a, e], at, lo + p:lo + p + n]
                            for q in range(n):
                                out[q] += v * s[q]
                for a in range(r):              # and along its columns
                    for b in range(r):
                        _combine(buf[a], columns[b], values[b], count[b], dst[a, b, i, j, p:p + n])


@njit(cache=True, nogil=True, error_model="numpy")
def untile(src, columns, values, count, lo, hi, dst):
    """See the module's docstring; src (K, K, th, tw, hi - lo), dst (th*R, tw*R, L): into the values
    lo:hi of each of dst's runs."""
    r, k = columns.shape[0], src.shape[0]
    buf = np.empty((r, k, CHUNK), src.dtype)
    for i in range(src.shape[2]):
        for j in range(src.shape[3]):
            for p in range(0, hi - lo, CHUNK):
                n = min(hi - lo - p, CHUNK)
                for a in range(r):
                    for c in range(k):
                        out = buf[a, c]
                        v, s = values[a, 0], src[columns[a, 0], c, i, j, p:p + n]
                        for q in range(n):
                            out[q] = v * s[q]
                        for e in range(1, count[a]):
                            v, s = values[a, e], src[columns[a, e], c, i, j, p:p + n]
                            for q in range(n):
                                out[q] += v * s[q]
                for a in range(r):
                    for b in range(r):
                        d = dst[i * r + a, j * r + b, lo + p:lo + p + n]
                        _combine(buf[a], columns[b], values[b], count[b], d)

"""Winograd's tile transforms (``ops/winograd_transforms.py``) compiled (numba).

Both apply a small matrix M (R x K) along the two axes of a tile of K x K pixels, each pixel a
contiguous run of L = N * C values ((H, W, N, C) memory):

- ``tile``: dst[a, b, i, j, :] = sum over k, l of M[a, k] M[b, l] src[y0 + i*s + k, x0 + j*s + l, lo:hi]
  for the tiles at stride s of an image src (H, W, L) from pixel (y0, x0) on, zero where a tile
  reaches outside src (the convolution's padding, never made), into dst (R, R, th, tw, hi - lo) (the
  input's B^T d B, the output gradient's A dY A^T);
- ``untile``: dst[i*R + a, j*R + b, lo:hi] = sum over k, l of M[a, k] M[b, l] src[k, l, i, j, :],
  from src (K, K, th, tw, hi - lo) into the blocks of an image dst (th*R, tw*R, L) (the output's
  A^T m A).

lo:hi picks some images' values of each pixel's run (a band of the batch, ``ops.winograd._bands``).

Each tile's runs go a chunk of CHUNK values at a time: M along the rows into a (R, K, CHUNK) buffer
that stays in L1, then along the columns into dst, each pass a loop over the chunk that LLVM
vectorises. F(4x4)'s transforms (``tile_bt4``, ``tile_a4``, ``untile_at4``) run its factored forms
(``bt4``, ``at4``, ``a4`` of ``ops/winograd_transforms.py``, the same functions the numpy passes
call): one loop per pass loads the K values, computes in registers and stores the R (1.2-1.6x faster
convolutions than adding the matrices' terms one loop each, docs/benchmarks.md). F(2x2)'s (``tile``,
``untile``) add the nonzero entries of its matrices (columns, values, count: ``entries`` there; all
+-1) in their order, one loop per term, as its numpy passes do; either way both paths round alike.
``tile_bt4`` and ``tile_a4`` share their loops but stay two kernels: one kernel choosing between six
and four rows at run time ran up to 1.8x slower.
(Kernels generated per matrix with every term written in ran 1.5-2x faster than the term loops but
took 20-36 s each to compile; the factored kernels compile in about 3 s.)
"""
from __future__ import annotations

import numpy as np
from numba import njit

from ..ops.winograd_transforms import a4, at4, bt4

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


@njit(cache=True, nogil=True, error_model="numpy", inline="always")
def _run(src, y, x, p, n, zero):
    """The n values from p on of pixel (y, x)'s run in src (H, W, L), or n zeros outside src."""
    if 0 <= y < src.shape[0] and 0 <= x < src.shape[1]:
        return src[y, x, p:p + n]
    return zero[:n]


@njit(cache=True, nogil=True, error_model="numpy")
def tile(src, columns, values, count, stride, y0, x0, lo, hi, dst):
    """See the module's docstring; src (H, W, L), dst (R, R, th, tw, hi - lo): the values lo:hi of each
    of src's runs, the first tile from pixel (y0, x0) on, zeros outside src."""
    r, k = dst.shape[0], columns.max() + 1
    buf = np.empty((r, k, CHUNK), src.dtype)
    zero = np.zeros(CHUNK, src.dtype)
    for i in range(dst.shape[2]):
        for j in range(dst.shape[3]):
            for p in range(0, hi - lo, CHUNK):
                n = min(hi - lo - p, CHUNK)
                for a in range(r):              # M along the tile's rows
                    for c in range(k):
                        out, y, x = buf[a, c], y0 + i * stride, x0 + j * stride + c
                        v, s = values[a, 0], _run(src, y + columns[a, 0], x, lo + p, n, zero)
                        for q in range(n):
                            out[q] = v * s[q]
                        for e in range(1, count[a]):
                            v, s = values[a, e], _run(src, y + columns[a, e], x, lo + p, n, zero)
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


# -- F(4x4, 3x3) by its factored transforms (``bt4``, ``at4``, ``a4``) ----------------------------------
# The same two passes a chunk at a time, each a loop over the chunk that loads K values, computes
# the transform in registers and stores R.
_bt4, _at4, _a4 = (njit(inline="always")(f) for f in (bt4, at4, a4))


@njit(cache=True, nogil=True, error_model="numpy", inline="always")
def _store(r, outs, q):
    for b in range(len(outs)):
        outs[b][q] = r[b]


@njit(cache=True, nogil=True, error_model="numpy", inline="always")
def _apply6(f, d, outs, n):
    """outs[b][q] = f(d[0][q], ..., d[5][q])[b] for q < n."""
    for q in range(n):
        _store(f(d[0][q], d[1][q], d[2][q], d[3][q], d[4][q], d[5][q]), outs, q)


@njit(cache=True, nogil=True, error_model="numpy", inline="always")
def _apply4(f, d, outs, n):
    for q in range(n):
        _store(f(d[0][q], d[1][q], d[2][q], d[3][q]), outs, q)


@njit(cache=True, nogil=True, error_model="numpy")
def tile_bt4(src, y0, x0, lo, hi, dst):
    """dst (6, 6, th, tw, hi - lo) = B^T d B of the 6x6 tiles at stride 4 of src (H, W, L), the first
    from pixel (y0, x0) on, zeros outside src."""
    buf = np.empty((6, 6, CHUNK), src.dtype)
    zero = np.zeros(CHUNK, src.dtype)
    for i in range(dst.shape[2]):
        for j in range(dst.shape[3]):
            for p in range(lo, hi, CHUNK):
                n = min(hi - p, CHUNK)
                for c in range(6):
                    y, x = y0 + 4 * i, x0 + 4 * j + c
                    _apply6(_bt4, (_run(src, y, x, p, n, zero), _run(src, y + 1, x, p, n, zero),
                                   _run(src, y + 2, x, p, n, zero), _run(src, y + 3, x, p, n, zero),
                                   _run(src, y + 4, x, p, n, zero), _run(src, y + 5, x, p, n, zero)),
                            (buf[0, c], buf[1, c], buf[2, c], buf[3, c], buf[4, c], buf[5, c]), n)
                for a in range(6):
                    d, q = dst[a], p - lo
                    _apply6(_bt4, (buf[a, 0], buf[a, 1], buf[a, 2], buf[a, 3], buf[a, 4], buf[a, 5]),
                            (d[0, i, j, q:q + n], d[1, i, j, q:q + n], d[2, i, j, q:q + n],
                             d[3, i, j, q:q + n], d[4, i, j, q:q + n], d[5, i, j, q:q + n]), n)


@njit(cache=True, nogil=True, error_model="numpy")
def tile_a4(src, y0, x0, lo, hi, dst):
    """dst (6, 6, th, tw, hi - lo) = A g A^T of the 4x4 blocks of src (H, W, L) (the output gradient)
    from pixel (y0, x0) on, zeros outside src."""
    buf = np.empty((6, 4, CHUNK), src.dtype)
    zero = np.zeros(CHUNK, src.dtype)
    for i in range(dst.shape[2]):
        for j in range(dst.shape[3]):
            for p in range(lo, hi, CHUNK):
                n = min(hi - p, CHUNK)
                for c in range(4):
                    y, x = y0 + 4 * i, x0 + 4 * j + c
                    _apply4(_a4, (_run(src, y, x, p, n, zero), _run(src, y + 1, x, p, n, zero),
                                  _run(src, y + 2, x, p, n, zero), _run(src, y + 3, x, p, n, zero)),
                            (buf[0, c], buf[1, c], buf[2, c], buf[3, c], buf[4, c], buf[5, c]), n)
                for a in range(6):
                    d, q = dst[a], p - lo
                    _apply4(_a4, (buf[a, 0], buf[a, 1], buf[a, 2], buf[a, 3]),
                            (d[0, i, j, q:q + n], d[1, i, j, q:q + n], d[2, i, j, q:q + n],
                             d[3, i, j, q:q + n], d[4, i, j, q:q + n], d[5, i, j, q:q + n]), n)


@njit(cache=True, nogil=True, error_model="numpy")
def untile_at4(src, lo, hi, dst):
    """dst (4 th, 4 tw, L)[4i + a, 4j + b, lo:hi] = (A^T m A)[a, b] of the tiles src (6, 6, th, tw,
    hi - lo)."""
    buf = np.empty((4, 6, CHUNK), src.dtype)
    for i in range(src.shape[2]):
        for j in range(src.shape[3]):
            for p in range(0, hi - lo, CHUNK):
                n = min(hi - lo - p, CHUNK)
                for c in range(6):
                    _apply6(_at4, (src[0, c, i, j, p:p + n], src[1, c, i, j, p:p + n],
                                   src[2, c, i, j, p:p + n], src[3, c, i, j, p:p + n],
                                   src[4, c, i, j, p:p + n], src[5, c, i, j, p:p + n]),
                            (buf[0, c], buf[1, c], buf[2, c], buf[3, c]), n)
                for a in range(4):
                    y, q = 4 * i + a, lo + p
                    _apply6(_at4, (buf[a, 0], buf[a, 1], buf[a, 2], buf[a, 3], buf[a, 4], buf[a, 5]),
                            (dst[y, 4 * j, q:q + n], dst[y, 4 * j + 1, q:q + n], dst[y, 4 * j + 2, q:q + n],
                             dst[y, 4 * j + 3, q:q + n]), n)

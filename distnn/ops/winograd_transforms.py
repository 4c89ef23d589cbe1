"""The transforms of Winograd's minimal filtering F(m x m, 3x3), m = 2 or 4 (Lavin and Gray, 2016),
over the tiles of a batch of images; ``winograd.py`` builds the convolution from them.

An m x m block of outputs of a 3x3 filter g over the (m+2) x (m+2) input tile d around it is

    Y = A^T [ (G g G^T) * (B^T d B) ] A          (* elementwise on (m+2) x (m+2))

with, for F(2x2, 3x3),

    B^T = [[1, 0, -1,  0],     G = [[1,    0,   0],     A^T = [[1, 1,  1,  0],
           [0, 1,  1,  0],          [1/2,  1/2, 1/2],          [0, 1, -1, -1]]
           [0, -1, 1,  0],          [1/2, -1/2, 1/2],
           [0, 1,  0, -1]]          [0,    0,   1]]

and for F(4x4, 3x3) the 6x6, 6x3 and 4x6 matrices below (points 0, +-1, +-2 and infinity). The
filter gradient uses dM = A dY A^T, the output gradient's blocks to tiles.

Images are (H, W, N, C) memory, seen as (H, W, N*C) runs (``_runs``): each pixel one contiguous run,
a band of images a slice lo:hi of it. The transforms are numpy passes here (``_tile``, ``_untile``)
and compiled loops with the numba kernels (``kernels/tiles.py``); F(4x4)'s matrices are applied in
factored form (``bt4``, ``at4``, ``a4``: 11-21 operations each instead of a multiplication and an
addition per nonzero entry), F(2x2)'s (all +-1) entry by entry. The padding (the layer's, and the
zeros up to a whole number of blocks at the bottom and right) is never made: a tile transform reads
zeros where a tile reaches outside the image, so neither the input nor, for the input gradient, the
output gradient is copied into a padded frame first.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from .. import kernels


@dataclass(frozen=True, eq=False)
class Tiles:
    """The matrices of F(m x m, 3x3): B^T ((m+2) x (m+2)), G ((m+2) x 3), A^T (m x (m+2))."""
    m: int
    bt: np.ndarray
    g: np.ndarray
    at: np.ndarray

    @property
    def size(self) -> int:
        """The input tile's side, m + 2."""
        return self.m + 2


F = {
    2: Tiles(2, np.array([[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]], float),
             np.array([[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]]),
             np.array([[1, 1, 1, 0], [0, 1, -1, -1]], float)),
    4: Tiles(4, np.array([[4, 0, -5, 0, 1, 0], [0, -4, -4, 1, 1, 0], [0, 4, -4, -1, 1, 0],
                          [0, -2, -1, 2, 1, 0], [0, 2, -1, -2, 1, 0], [0, 4, 0, -5, 0, 1]], float),
             np.array([[1 / 4, 0, 0], [-1 / 6, -1 / 6, -1 / 6], [-1 / 6, 1 / 6, -1 / 6],
                       [1 / 24, 1 / 12, 1 / 6], [1 / 24, -1 / 12, 1 / 6], [0, 0, 1]]),
             np.array([[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0], [0, 1, -1, 8, -8, 1]],
                      float)),
}


def transform_filter(w: np.ndarray, f: Tiles) -> np.ndarray:
    """w (O, C, 3, 3) -> U = G w G^T as ((m+2)^2, C, O): G along the rows of every filter in one
    product, then along the columns in another (einsum's path over the same sums took 6-13x as
    long)."""
    o, c = w.shape[:2]
    g = f.g.astype(w.dtype)
    taps = np.ascontiguousarray(w.transpose(2, 3, 1, 0)).reshape(3, -1)   # (i, (j, C, O))
    rows = (g @ taps).reshape(f.size, 3, c * o)                          # (G w)[a, j]
    return np.matmul(g, rows).reshape(-1, c, o)                          # (G w G^T)[a, b]


def filter_grad_from_tiles(du: np.ndarray, f: Tiles) -> np.ndarray:
    """The filter gradient G^T dU G (O, C, 3, 3) of du ((m+2)^2, C, O), the gradient of U, the same
    two products the other way."""
    _, c, o = du.shape
    g = f.g.astype(du.dtype)
    rows = (g.T @ du.reshape(f.size, -1)).reshape(3, f.size, c * o)      # (G^T dU)[i, b]
    return np.ascontiguousarray(np.matmul(g.T, rows).reshape(3, 3, c, o).transpose(3, 2, 0, 1))


_2, _4, _5, _8 = (np.float32(v) for v in (2, 4, 5, 8))   # exact in float32, so float32 data stays float32


def bt4(d0, d1, d2, d3, d4, d5):
    """B^T d of F(4x4, 3x3) along one axis of a 6x6 tile, factored: 21 operations, where the
    matrix's 22 nonzero entries take a multiplication and an addition each. On numbers (the
    compiled kernels) or arrays (the numpy passes): the same operations in the same order, so both
    paths round alike."""
    s, t = d4 - d2, _2 * (d3 - d1)
    return ((d4 + _4 * d0) - _5 * d2, (d3 + d4) - _4 * (d1 + d2), (d4 - d3) + _4 * (d1 - d2),
            s + t, s - t, (d5 + _4 * d1) - _5 * d3)


def at4(m0, m1, m2, m3, m4, m5):
    """A^T m of F(4x4, 3x3): a 6x6 product tile to its 4x4 outputs along one axis."""
    a, b, c, d = m1 + m2, m1 - m2, m3 + m4, m3 - m4
    return (m0 + a) + c, b + _2 * d, a + _4 * c, (b + _8 * d) + m5


def a4(g0, g1, g2, g3):
    """A g of F(4x4, 3x3) (A the transpose of A^T): a 4x4 block of the output gradient to a 6x6
    tile along one axis."""
    e, o, s, t = g0 + _4 * g2, _2 * (g1 + _4 * g3), g0 + g2, g1 + g3
    return g0, s + t, s - t, e + o, e - o, g3


FACTORED = {"bt": (bt4, 6), "at": (at4, 6), "a": (a4, 4)}   # F(4x4)'s transforms and their inputs per axis


@functools.lru_cache(maxsize=None)
def entries(m: int, name: str, dtype: str):
    """The nonzero entries of F(m x m, 3x3)'s matrix ``name`` ("bt", "at", or "a" = A, the transpose
    of A^T), row by row, a +1 first (so that a - b is one numpy pass): columns (R, E), values (R, E)
    in ``dtype`` and count (R,), E the most in a row. The numpy passes and the compiled kernels add
    each row's terms in this order, so both round alike. (F(2x2)'s: all its entries are +-1.)"""
    f = F[m]
    mat = f.at.T if name == "a" else getattr(f, name)
    rows = [sorted(((c, k) for k, c in enumerate(row) if c != 0), key=lambda t: t[0] != 1) for row in mat]
    columns, values = np.zeros(mat.shape, np.int64), np.zeros(mat.shape, dtype)
    for a, row in enumerate(rows):
        values[a, :len(row)], columns[a, :len(row)] = zip(*row)
    return columns, values, np.array([len(r) for r in rows], np.int64)


def _combine(columns, values, count, arrays, out: np.ndarray) -> None:
    """out = sum over e < count of values[e] * arrays[columns[e]], in numpy passes (a +- b in one)."""
    a0, start = arrays[columns[0]], 1
    if values[0] == 1 and count > 1 and abs(values[1]) == 1:
        (np.add if values[1] == 1 else np.subtract)(a0, arrays[columns[1]], out=out)
        start = 2
    elif values[0] == 1:
        np.copyto(out, a0)
    else:
        np.multiply(a0, values[0], out=out)
    for c, k in zip(values[start:count], columns[start:count]):
        if abs(c) == 1:
            (np.add if c == 1 else np.subtract)(out, arrays[k], out=out)
        else:
            out += c * arrays[k]


def _by_entries(mat):
    """The transform of a matrix (R, K) given by its ``entries``, as ``bt4`` is (K arrays -> R
    arrays), and K."""
    columns, values, count = mat

    def transform(*arrays):
        rows = [np.empty(arrays[0].shape, arrays[0].dtype) for _ in count]
        for a, row in enumerate(rows):
            _combine(columns[a], values[a], count[a], arrays, row)
        return rows
    return transform, columns.shape[1]


def _tile(src: np.ndarray, transform, k: int, s: int, dst: np.ndarray) -> None:
    """dst (R, R, th, tw, L)[a, b, i, j] = sum over k, l of M[a, k] M[b, l] src[i*s + k, j*s + l]
    for src (H, W, L), M (R, K) applied by ``transform`` (K arrays -> R arrays; numpy passes)."""
    th, tw = dst.shape[2:4]
    rows = transform(*[src[i:i + s * (th - 1) + 1:s] for i in range(k)])         # M along the rows
    for a, row in enumerate(rows):                                                # and along the columns
        for b, v in enumerate(transform(*[row[:, j:j + s * (tw - 1) + 1:s] for j in range(k)])):
            dst[a, b] = v


def _untile(src: np.ndarray, transform, dst: np.ndarray) -> None:
    """dst (th*R, tw*R, L)[i*R + a, j*R + b] = sum over k, l of M[a, k] M[b, l] src[k, l, i, j]
    for src (K, K, th, tw, L), M (R, K) applied by ``transform`` (numpy passes)."""
    th, tw = src.shape[2:4]
    rows = transform(*src)
    blocks = dst.reshape(th, len(rows), tw, len(rows), -1)
    for a, row in enumerate(rows):
        for b, v in enumerate(transform(*row)):
            blocks[:, a, :, b] = v


def _transform(f: Tiles, name: str, mode: str, src: np.ndarray, dst: np.ndarray, runs,
               origin=(0, 0)) -> None:
    """``_tile`` (at stride m) or ``_untile`` by F[m]'s matrix ``name`` of the values lo:hi of each
    pixel's run in the image (src of a tile, dst of an untile), compiled when the numba kernels are
    selected: F(4x4)'s by its factored transforms (``FACTORED``), F(2x2)'s by its matrices' entries.
    A tile's first tile starts at pixel ``origin`` (y, x) of src, and what lies outside src reads as
    zeros: the padding is never made."""
    lo, hi = runs
    if kernels.compiled() is None:
        transform, k = FACTORED[name] if f.m == 4 else _by_entries(entries(f.m, name, src.dtype.name))
        if mode == "tile":
            (th, tw), s = dst.shape[2:4], f.m
            _tile(_window(src[..., lo:hi], origin, (th - 1) * s + k, (tw - 1) * s + k), transform, k, s, dst)
        else:
            _untile(src, transform, dst[..., lo:hi])
        return
    from ..kernels import tiles   # here: numba is imported with the first compiled call, not with distnn
    if mode == "untile" and f.m == 4:
        tiles.untile_at4(src, lo, hi, dst)
    elif mode == "untile":
        tiles.untile(src, *entries(f.m, name, src.dtype.name), lo, hi, dst)
    elif f.m == 4:
        getattr(tiles, f"tile_{name}4")(src, *origin, lo, hi, dst)   # tile_bt4, tile_a4
    else:
        tiles.tile(src, *entries(f.m, name, src.dtype.name), f.m, *origin, lo, hi, dst)


def _window(src: np.ndarray, origin, rows: int, cols: int) -> np.ndarray:
    """The rows x cols pixels of src (H, W, L) from ``origin`` (y, x) on, zeros outside src (a copy)."""
    (y0, x0), (h, w) = origin, src.shape[:2]
    out = np.zeros((rows, cols) + src.shape[2:], src.dtype)
    ys, xs, ye, xe = max(y0, 0), max(x0, 0), min(y0 + rows, h), min(x0 + cols, w)
    if ys < ye and xs < xe:
        out[ys - y0:ye - y0, xs - x0:xe - x0] = src[ys:ye, xs:xe]
    return out


def _runs(a: np.ndarray) -> np.ndarray:
    """a (..., N, C) as (..., N*C), a view (a transform writes through it)."""
    view = a.view()
    view.shape = (*a.shape[:-2], -1)   # raises rather than copy
    return view


def transform_input(x: np.ndarray, v: np.ndarray, f: Tiles, images: tuple, origin) -> None:
    """x (H, W, N, C) -> v (m+2, m+2, th, tw, n1 - n0, C) = B^T d B for the th x tw tiles at stride m
    of the images n0:n1 (``images``), the first from pixel ``origin`` (y, x) on, zeros outside x."""
    c = x.shape[3]
    _transform(f, "bt", "tile", _runs(x), _runs(v), (images[0] * c, images[1] * c), origin)


def transform_output(mm: np.ndarray, y: np.ndarray, f: Tiles, images: tuple) -> None:
    """mm (m+2, m+2, th, tw, n1 - n0, O) -> the images n0:n1 of y (m*th, m*tw, N, O) = A^T mm A."""
    o = y.shape[3]
    _transform(f, "at", "untile", _runs(mm), _runs(y), (images[0] * o, images[1] * o))


def transform_output_grad(gy: np.ndarray, f: Tiles, images: tuple, rows: tuple, tw: int) -> np.ndarray:
    """gy (Ho, Wo, N, O) -> dM = A dY A^T for the m x m output blocks of tile rows t0:t1 (``rows``), tw
    blocks each, of the images n0:n1 (zeros past gy's bottom and right), as ((m+2)^2, T, O),
    T = (t1 - t0) * tw * (n1 - n0)."""
    o, (t0, t1), ng = gy.shape[3], rows, images[1] - images[0]
    dm = np.empty((f.size, f.size, t1 - t0, tw, ng, o), gy.dtype)
    _transform(f, "a", "tile", _runs(gy), _runs(dm), (images[0] * o, images[1] * o), (f.m * t0, 0))
    return dm.reshape(f.size ** 2, (t1 - t0) * tw * ng, o)

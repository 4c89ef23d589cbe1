"""3x3 convolution at stride 1 by Winograd's minimal filtering F(2x2, 3x3) (Lavin and Gray, 2016).

A 2x2 block of outputs of a 3x3 filter g over the 4x4 input tile d around it is

    Y = A^T [ (G g G^T) * (B^T d B) ] A          (* elementwise on 4x4)

    B^T = [[1, 0, -1,  0],     G = [[1,    0,   0],     A^T = [[1, 1,  1,  0],
           [0, 1,  1,  0],          [1/2,  1/2, 1/2],          [0, 1, -1, -1]]
           [0, -1, 1,  0],          [1/2, -1/2, 1/2],
           [0, 1,  0, -1]]          [0,    0,   1]]

Summed over input channels, the 16 elementwise products become 16 matrix products (T, C) @ (C, O)
over all T tiles of the batch: 16 * C * O multiplies per four outputs instead of 36 * C * O, so the
matrix work is 2.25 times smaller than im2col's, and the transforms are only additions. Backward
uses the same pieces: the input gradient is this convolution of the padded output gradient with the
flipped, transposed filter; the filter gradient is G^T [ sum over tiles V^T dM ] G, dM = A dY A^T.

Layout and blocking, both measured on cifar_convnet's convolutions: arrays are (H, W, N, C), so each
image position is one contiguous run of N * C values and the strided tile slices copy long runs
((N, H, W, C) copies runs of C: its transforms took 1.2-2x as long); and the work goes one band of
tile rows at a time (transform, multiply, transform back), so that a band's arrays stay in cache
(the 32x32x32 layer's forward 24 -> 16 ms, its input gradient 28 -> 15 ms). Transformed tiles are
(16, T, C) with T = Ho/2 * Wo/2 * N, tile-row major.
"""
from __future__ import annotations

import numpy as np

from .. import kernels
from .._hardware import cache_bytes

G = np.array([[1.0, 0.0, 0.0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0.0, 0.0, 1.0]])
BAND_VALUES = None  # transformed values (16 * tiles * channels) per band; None: from the L2 (band_values)


def band_values() -> int:
    """Half of one core's L2 cache in float32 values (a band's transformed tiles and the products
    made from them stay in it), between 64 kB and 2 MB; ``BAND_VALUES`` overrides it."""
    if BAND_VALUES is not None:
        return BAND_VALUES
    return min(max(cache_bytes(2, 1 << 20) // 2, 1 << 16), 1 << 21) // 4


def even_tiles(xp: np.ndarray) -> np.ndarray:
    """Pad a padded input (Hp, Wp, N, C) at the bottom and right so that its 3x3 output is even-sized."""
    hp, wp, n, c = xp.shape
    eh, ew = (hp - 2) % 2, (wp - 2) % 2
    if not (eh or ew):
        return xp
    out = np.zeros((hp + eh, wp + ew, n, c), xp.dtype)
    out[:hp, :wp] = xp
    return out


def transform_filter(w: np.ndarray) -> np.ndarray:
    """w (O, C, 3, 3) -> U = G w G^T as (16, C, O)."""
    o, c = w.shape[:2]
    g = G.astype(w.dtype)
    return np.ascontiguousarray(np.einsum("ai,bj,ocij->abco", g, g, w, optimize=True).reshape(16, c, o))


def transform_input(xp: np.ndarray, v: np.ndarray) -> None:
    """xp (2*th + 2, 2*tw + 2, N, C) -> v (4, 4, th, tw, N, C) = B^T d B for every 4x4 tile at stride 2."""
    th, tw = v.shape[2:4]
    r = [xp[i:i + 2 * th:2] for i in range(4)]               # row i of every tile: (th, Wp, N, C)
    rows = np.empty((4,) + r[0].shape, xp.dtype)               # B^T d
    np.subtract(r[0], r[2], out=rows[0])
    np.add(r[1], r[2], out=rows[1])
    np.subtract(r[2], r[1], out=rows[2])
    np.subtract(r[1], r[3], out=rows[3])
    k = [rows[:, :, j:j + 2 * tw:2] for j in range(4)]        # column j of every tile: (4, th, tw, N, C)
    np.subtract(k[0], k[2], out=v[:, 0])                       # (B^T d) B
    np.add(k[1], k[2], out=v[:, 1])
    np.subtract(k[2], k[1], out=v[:, 2])
    np.subtract(k[1], k[3], out=v[:, 3])


def transform_output(m: np.ndarray, y: np.ndarray) -> None:
    """m (4, 4, th, tw, N, O) -> y (2*th, 2*tw, N, O) = A^T m A."""
    th, tw = m.shape[2:4]
    s = np.empty((2,) + m.shape[1:], m.dtype)                  # A^T m
    np.add(m[0], m[1], out=s[0])
    s[0] += m[2]
    np.subtract(m[1], m[2], out=s[1])
    s[1] -= m[3]
    y = y.reshape(th, 2, tw, 2, *y.shape[2:])                  # (A^T m) A
    for i in range(2):
        np.add(s[i, 0], s[i, 1], out=y[:, i, :, 0])
        y[:, i, :, 0] += s[i, 2]
        np.subtract(s[i, 1], s[i, 2], out=y[:, i, :, 1])
        y[:, i, :, 1] -= s[i, 3]


def transform_output_grad(gy: np.ndarray) -> np.ndarray:
    """gy (2*th, 2*tw, N, O) -> dM = A dY A^T for every 2x2 output block, as (16, T, O)."""
    ho, wo, n, o = gy.shape
    th, tw = ho // 2, wo // 2
    y = gy.reshape(th, 2, tw, 2, n, o)
    r = np.empty((4, th, tw, 2, n, o), gy.dtype)               # A dY
    r[0] = y[:, 0]
    np.add(y[:, 0], y[:, 1], out=r[1])
    np.subtract(y[:, 0], y[:, 1], out=r[2])
    np.negative(y[:, 1], out=r[3])
    dm = np.empty((4, 4, th, tw, n, o), gy.dtype)              # (A dY) A^T
    dm[:, 0] = r[:, :, :, 0]
    np.add(r[:, :, :, 0], r[:, :, :, 1], out=dm[:, 1])
    np.subtract(r[:, :, :, 0], r[:, :, :, 1], out=dm[:, 2])
    np.negative(r[:, :, :, 1], out=dm[:, 3])
    return dm.reshape(16, th * tw * n, o)


def _bands(th: int, tw: int, n: int, c: int):
    """(first, last) tile rows of each band."""
    rows = max(1, band_values() // (16 * tw * n * max(c, 1)))
    return [(t, min(th, t + rows)) for t in range(0, th, rows)]


def conv3x3(xp: np.ndarray, w: np.ndarray, keep_tiles: bool = False):
    """xp (Hp, Wp, N, C) already padded, w (O, C, 3, 3) -> y (Hp-2, Wp-2, N, O), and (when
    ``keep_tiles``) the transformed input tiles (16, T, C) and even-padded shape for filter_grad."""
    hp, wp, n, c = xp.shape
    ho, wo = hp - 2, wp - 2
    xe = even_tiles(xp)
    th, tw = (xe.shape[0] - 2) // 2, (xe.shape[1] - 2) // 2
    u = transform_filter(w)
    y = np.empty((2 * th, 2 * tw, n, u.shape[2]), xp.dtype)
    v_all = np.empty((16, th * tw * n, c), xp.dtype) if keep_tiles else None
    per_row = tw * n
    fused = kernels.compiled()
    for t0, t1 in _bands(th, tw, n, c):
        if keep_tiles:
            v = v_all[:, t0 * per_row:t1 * per_row]
        else:
            v = np.empty((16, (t1 - t0) * per_row, c), xp.dtype)
        transform_input(xe[2 * t0:2 * t1 + 2], v.reshape(4, 4, t1 - t0, tw, n, c))
        m = np.matmul(v, u).reshape(4, 4, t1 - t0, tw, n, -1)
        (fused.winograd_output if fused is not None else transform_output)(m, y[2 * t0:2 * t1])
    y = y if y.shape[:2] == (ho, wo) else np.ascontiguousarray(y[:ho, :wo])   # (H, W, N, O) memory, as promised
    return (y, v_all, xe.shape) if keep_tiles else y


def input_tiles(xp: np.ndarray):
    """The transformed tiles (16, T, C) of a padded input (Hp, Wp, N, C) and its even-padded shape,
    as ``conv3x3(..., keep_tiles=True)`` keeps them, for ``filter_grad`` after another forward."""
    xe = even_tiles(xp)
    th, tw, n, c = (xe.shape[0] - 2) // 2, (xe.shape[1] - 2) // 2, xe.shape[2], xe.shape[3]
    v = np.empty((16, th * tw * n, c), xp.dtype)
    transform_input(xe, v.reshape(4, 4, th, tw, n, c))
    return v, xe.shape


def filter_grad(v: np.ndarray, gy: np.ndarray, even_shape) -> np.ndarray:
    """Filter gradient (O, C, 3, 3) from conv3x3's tiles V (16, T, C) and gy (Ho, Wo, N, O)."""
    hp, wp, n, c = even_shape
    th, tw = (hp - 2) // 2, (wp - 2) // 2
    if gy.shape[:2] != (2 * th, 2 * tw):
        ge = np.zeros((2 * th, 2 * tw, n, gy.shape[3]), gy.dtype)
        ge[:gy.shape[0], :gy.shape[1]] = gy
        gy = ge
    du = np.zeros((16, c, gy.shape[3]), gy.dtype)
    per_row = tw * n
    for t0, t1 in _bands(th, tw, n, max(c, gy.shape[3])):
        dm = transform_output_grad(gy[2 * t0:2 * t1])
        du += np.matmul(v[:, t0 * per_row:t1 * per_row].transpose(0, 2, 1), dm)
    g = G.astype(gy.dtype)
    return np.einsum("ai,bj,abco->ocij", g, g, du.reshape(4, 4, *du.shape[1:]), optimize=True)


def input_grad(gy: np.ndarray, w: np.ndarray, pads) -> np.ndarray:
    """Input gradient (H, W, N, C) of a 3x3 stride-1 convolution with padding (top, bottom, left,
    right), each at most 2: the convolution of gy (Ho, Wo, N, O) padded by 2 - p with the flipped,
    transposed filter."""
    t, b, l, r = pads
    ho, wo, n, o = gy.shape
    gp = np.zeros((ho + 4 - t - b, wo + 4 - l - r, n, o), gy.dtype)
    gp[2 - t:2 - t + ho, 2 - l:2 - l + wo] = gy
    return conv3x3(gp, w.transpose(1, 0, 2, 3)[:, :, ::-1, ::-1])

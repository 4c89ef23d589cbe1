"""3x3 convolution at stride 1 by Winograd's minimal filtering F(m x m, 3x3), m = 2 or 4 (Lavin and
Gray, 2016), its filter gradient and its input gradient. The matrices and the tile transforms are in
``winograd_transforms.py``.

Summed over input channels, the (m+2)^2 elementwise products of Y = A^T [(G g G^T) * (B^T d B)] A
become (m+2)^2 matrix products (T, C) @ (C, O) over all T tiles of the batch: (m+2)^2 / m^2 products
per output instead of 9, so the matrix work is 2.25 (F(2x2)) or 4 (F(4x4)) times smaller than
im2col's, and the transformed tiles take 4 or 2.25 times the input's size. F(4x4)'s larger transforms
cost more and lose a little float32 precision (within 1e-5 of the output's largest value, against
1e-6): the calibration decides per layer shape. Backward uses the same pieces: the input gradient is
this convolution of the padded output gradient with the flipped, transposed filter; the filter
gradient is G^T [ sum over tiles V^T dM ] G, dM = A dY A^T.

Layout and blocking, both measured on cifar_convnet's convolutions: arrays are (H, W, N, C), so each
image position is one contiguous run of N * C values and the strided tile slices copy long runs
((N, H, W, C) copies runs of C: its transforms took 1.2-2x as long); and the work goes one band of
tile rows at a time (transform, multiply, transform back), so that a band's arrays stay in cache
(the 32x32x32 layer's forward 24 -> 16 ms, its input gradient 28 -> 15 ms); where one tile row of
the whole batch is more than a band, a band is one tile row of a group of images (resnet20's 32- and
64-channel layers at batch 256: 0.82-0.85x the time). A band's transformed tiles are ((m+2)^2,
T_band, C) and contiguous, T_band = tile rows * Wo/m * images, written into one buffer that every band
reuses; the filter gradient transforms the input's tiles again rather than keep them from the forward
(kept, 2.25x the input for F(4x4) went out to memory and back: the resnet20 step at batch 64 and 256
took 1.05x and 1.06x as long). The padding is never made: the transforms read zeros outside the image.
"""
from __future__ import annotations

import numpy as np

from .._hardware import cache_bytes
from .winograd_transforms import (F, Tiles, filter_grad_from_tiles, transform_filter, transform_input,
                                  transform_output, transform_output_grad)

BAND_VALUES = None  # transformed values ((m+2)^2 * tiles * channels) per band; None: from the L2


def band_values() -> int:
    """Half of one core's L2 cache in float32 values (a band's transformed tiles and the products
    made from them stay in it), between 64 kB and 2 MB; ``BAND_VALUES`` overrides it."""
    if BAND_VALUES is not None:
        return BAND_VALUES
    return min(max(cache_bytes(2, 1 << 20) // 2, 1 << 16), 1 << 21) // 4


def _bands(th: int, tw: int, n: int, c: int, f: Tiles):
    """(first, last tile row, first, last image) of each band: whole tile rows of every image while
    their transformed tiles fit in ``band_values``, else one tile row of a group of images, as many
    groups as budgets the row holds, rounded to the nearest (a band is at most 1.5 budgets: a row
    just over one budget cut in two made twice the calls, each product half as long; cifar_convnet's
    32x32x32 layer at batch 64, forward and both gradients, 25.2 -> 22.7 ms)."""
    budget, per_image = band_values(), f.size ** 2 * tw * max(c, 1)
    if per_image * n <= budget:
        rows = budget // (per_image * n)
        return [(t, min(th, t + rows), 0, n) for t in range(0, th, rows)]
    groups = max(1, round(per_image * n / budget))
    images = -(-n // groups)   # the same number in each group, but for the last
    return [(t, t + 1, a, min(n, a + images)) for t in range(th) for a in range(0, n, images)]


def tiling(shape: tuple, pads, m: int) -> tuple:
    """(th, tw): the m x m output blocks in a column and in a row of a 3x3 convolution of an image of
    ``shape`` (H, W, ...) padded by ``pads`` (top, bottom, left, right), the last ones cropped."""
    (h, w), (t, b, l, r) = shape[:2], pads
    return -(-(h + t + b - 2) // m), -(-(w + l + r - 2) // m)


def conv3x3(x: np.ndarray, w: np.ndarray, pads=(0, 0, 0, 0), m: int = 2) -> np.ndarray:
    """x (H, W, N, C) padded by ``pads`` (top, bottom, left, right; each at most 2), w (O, C, 3, 3) ->
    y (Ho, Wo, N, O) by F(m x m, 3x3). The padding is never made: the tile transforms read zeros
    outside x."""
    f = F[m]
    (h, wd, n, c), (t, b, l, r) = x.shape, pads
    ho, wo = h + t + b - 2, wd + l + r - 2
    th, tw = tiling(x.shape, pads, m)
    u = transform_filter(w, f)
    y = np.empty((m * th, m * tw, n, u.shape[2]), x.dtype)
    bands = _bands(th, tw, n, c, f)
    v_buf, mm_buf = _buffer(bands, tw, c, f, x.dtype), _buffer(bands, tw, u.shape[2], f, x.dtype)
    for t0, t1, n0, n1 in bands:
        v = _band_tiles(x, pads, (t0, t1, n0, n1), tw, f, v_buf)
        mm = np.matmul(v, u, out=_front(mm_buf, v.shape[1])).reshape(f.size, f.size, t1 - t0, tw, n1 - n0, -1)
        transform_output(mm, y[m * t0:m * t1], f, (n0, n1))
    return y if y.shape[:2] == (ho, wo) else np.ascontiguousarray(y[:ho, :wo])   # (H, W, N, O) memory, as promised


def _buffer(bands, tw: int, c: int, f: Tiles, dtype) -> np.ndarray:
    """((m+2)^2, T, c) for the largest band's T tiles: one array every band's transform writes into
    in turn, so that it stays in cache (a new array per band is new memory each time)."""
    most = max((t1 - t0) * (n1 - n0) for t0, t1, n0, n1 in bands) * tw
    return np.empty((f.size ** 2, most, c), dtype)


def _front(buf: np.ndarray, t: int) -> np.ndarray:
    """The contiguous ((m+2)^2, t, c) array at the front of buf ((m+2)^2, T, c), t <= T."""
    return buf.reshape(-1)[:buf.shape[0] * t * buf.shape[2]].reshape(buf.shape[0], t, buf.shape[2])


def _band_tiles(x: np.ndarray, pads, band: tuple, tw: int, f: Tiles, buf: np.ndarray) -> np.ndarray:
    """The transformed tiles ((m+2)^2, T_band, C) of tile rows t0:t1 of the images n0:n1 (``band``) of
    x padded by ``pads``, written into the front of ``buf`` (``_buffer``; contiguous: the compiled
    transforms vectorise over contiguous runs only)."""
    (t0, t1, n0, n1), c = band, x.shape[3]
    v = _front(buf, (t1 - t0) * tw * (n1 - n0))
    tiles = v.reshape(f.size, f.size, t1 - t0, tw, n1 - n0, c)
    transform_input(x, tiles, f, (n0, n1), (f.m * t0 - pads[0], -pads[2]))
    return v


def filter_grad(x: np.ndarray, gy: np.ndarray, pads, m: int = 2) -> np.ndarray:
    """Filter gradient (O, C, 3, 3) of conv3x3(x, w, pads, m) from its input x (H, W, N, C) and
    gy (Ho, Wo, N, O): G^T [sum over tiles V^T dM] G, band by band, each band's input tiles V made
    again here (kept from the forward they would go out to memory and back: 2.25 times the input
    for F(4x4), slower than the transform)."""
    f = F[m]
    th, tw = tiling(x.shape, pads, m)
    gy = np.ascontiguousarray(gy)
    bands = _bands(th, tw, x.shape[2], x.shape[3], f)
    v_buf = _buffer(bands, tw, x.shape[3], f, x.dtype)
    du = np.zeros((f.size ** 2, x.shape[3], gy.shape[3]), gy.dtype)
    for t0, t1, n0, n1 in bands:
        v = _band_tiles(x, pads, (t0, t1, n0, n1), tw, f, v_buf)
        dm = transform_output_grad(gy, f, (n0, n1), (t0, t1), tw)
        du += np.matmul(v.transpose(0, 2, 1), dm)
    return filter_grad_from_tiles(du, f)


def input_grad(gy: np.ndarray, w: np.ndarray, pads, m: int = 2) -> np.ndarray:
    """Input gradient (H, W, N, C) of a 3x3 stride-1 convolution with padding (top, bottom, left,
    right), each at most 2: the convolution of gy (Ho, Wo, N, O) padded by 2 - p with the flipped,
    transposed filter."""
    flipped = w.transpose(1, 0, 2, 3)[:, :, ::-1, ::-1]
    return conv3x3(np.ascontiguousarray(gy), flipped, [2 - p for p in pads], m=m)

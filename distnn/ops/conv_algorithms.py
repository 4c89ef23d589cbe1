"""The five convolution algorithms behind ``Conv2d``, each as the same four steps on arrays, so that
forward, input gradient and weight gradient can each run a different one (``conv_choice``):

- ``inputs(x, geo)``: what the weight gradient reads of the input (im2col's columns, the (H, W, N, C)
  input whose tiles Winograd transforms again, the shifted algorithm's padded rows); ``forward``
  returns it too when asked, so a weight gradient by the forward's own algorithm does not build it
  twice;
- ``forward(x, w, geo, keep)`` -> (y, channels-last and C-contiguous, in ``layout``; inputs or None);
- ``weight_grad(inputs, g, geo)`` -> (O, C, kh, kw), with g the output gradient in ``layout``;
- ``input_grad(g, w, geo)`` -> the input gradient, channels-last in ``layout`` (may be a view: ``Conv2d``
  copies it once, into the input's memory order).

``layout`` is "nhwc" ((N, H, W, C) memory) or "hwnc" ((H, W, N, C), Winograd's). x is (N, C, H, W)
in any memory order; w is (O, C, kh, kw).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from .. import kernels
from ..kernels import direct
from . import shifted, winograd
from .layout import nhwc, zero_padded

COLUMN_VALUES = 1 << 20   # an input gradient's column gradient is made this many values at a time


@dataclass(frozen=True)
class Geometry:
    """A convolution's sizes: input (N, C, H, W), weight (O, C, kh, kw), stride, padding (top, bottom,
    left, right) and output (Ho, Wo)."""
    x_shape: tuple
    w_shape: tuple
    stride: tuple
    pads: tuple
    out: tuple

    @property
    def padded(self) -> tuple:
        """(Hp, Wp) of the padded input."""
        (_, _, h, w), (t, b, l, r) = self.x_shape, self.pads
        return h + t + b, w + l + r


def pad_nhwc(x, pads):
    """x (N, C, H, W) -> the padded input as (N, Hp, Wp, C) memory (one copy, whatever x's layout)."""
    return zero_padded(x.transpose(0, 2, 3, 1), pads, axes=(1, 2)) if any(pads) else nhwc(x)


def window(i, j, sh, sw, ho, wo):
    """Index of the input pixels that kernel offset (i, j) sees, for all output positions."""
    return (slice(None), slice(i, i + sh * (ho - 1) + 1, sh), slice(j, j + sw * (wo - 1) + 1, sw))


class Im2col:
    """Columns of every window, then one matrix product (any kernel, stride and padding)."""
    layout = "nhwc"

    @staticmethod
    def inputs(x, geo):
        """(N*Ho*Wo, kh*kw*C) columns; for a channels-first x (the images entering a network) their
        transpose (kh*kw*C, N*Ho*Wo), whose rows copy runs of Wo pixels instead of runs of C channels,
        as short as one pixel for a grey image (LeNet-5's conv1 at batch 64: 1.3 ms against 0.3 ms)."""
        (n, c, _, _), (_, _, kh, kw), (sh, sw), (ho, wo) = geo.x_shape, geo.w_shape, geo.stride, geo.out
        if x.flags.c_contiguous:
            xp = zero_padded(x, geo.pads, axes=(2, 3)) if any(geo.pads) else x
            windows = sliding_window_view(xp, (kh, kw), axis=(2, 3))[:, :, ::sh, ::sw]  # (N, C, Ho, Wo, kh, kw)
            cols_t = np.empty((kh, kw, c, n, ho, wo), x.dtype)
            np.copyto(cols_t, windows.transpose(4, 5, 1, 0, 2, 3))
            return cols_t.reshape(kh * kw * c, n * ho * wo).T
        xp = pad_nhwc(x, geo.pads)
        windows = sliding_window_view(xp, (kh, kw), axis=(1, 2))[:, ::sh, ::sw]  # (N, Ho, Wo, C, kh, kw)
        cols = np.empty((n, ho, wo, kh, kw, c), x.dtype)
        np.copyto(cols, windows.transpose(0, 1, 2, 4, 5, 3))  # one pass; inner runs of C channels
        return cols.reshape(n * ho * wo, kh * kw * c)

    @staticmethod
    def forward(x, w, geo, keep):
        cols = Im2col.inputs(x, geo)
        o = w.shape[0]
        y = cols @ w.transpose(0, 2, 3, 1).reshape(o, -1).T
        return y.reshape(geo.x_shape[0], *geo.out, o), cols if keep else None

    @staticmethod
    def weight_grad(cols, g, geo):
        o, c, kh, kw = geo.w_shape
        g2 = g.reshape(-1, o)
        # a channels-first input's columns are the transpose of a C-contiguous (kh*kw*C, N*Ho*Wo)
        # array: the product that reads it in its own order runs 1.6-1.8x faster (OpenBLAS SkylakeX)
        gw = (cols.T @ g2).T if cols.T.flags.c_contiguous else g2.T @ cols
        return gw.reshape(o, kh, kw, c).transpose(0, 3, 1, 2)

    @staticmethod
    def input_grad(g, w, geo):
        """col2im one kernel offset at a time: (N*Ho*Wo, O) @ (O, C) lands contiguous and is added into
        the input positions that offset saw, without the (N*Ho*Wo, kh*kw*C) column gradient. With the
        compiled kernels: the column gradient of a few images at a time in one product, folded into
        the pixels by ``kernels.fused.col2im_add`` (kh*kw small products and strided adds cost more)."""
        (n, c, h, wd), (o, _, kh, kw), (sh, sw), (ho, wo) = geo.x_shape, geo.w_shape, geo.stride, geo.out
        wk = w.transpose(0, 2, 3, 1)
        gxp = np.zeros((n, *geo.padded, c), g.dtype)
        fused = kernels.compiled()
        if fused is not None:
            wall = wk.reshape(o, -1)
            images = max(1, COLUMN_VALUES // (ho * wo * kh * kw * c))
            for a in range(0, n, images):
                cols = g[a:a + images].reshape(-1, o) @ wall
                fused.col2im_add(cols.reshape(-1, ho, wo, kh * kw * c), kh, kw, sh, sw, gxp[a:a + images])
        else:
            g2 = g.reshape(-1, o)
            part = np.empty((g2.shape[0], c), g.dtype)
            for i in range(kh):
                for j in range(kw):
                    np.matmul(g2, wk[:, i, j, :], out=part)
                    gxp[window(i, j, sh, sw, ho, wo)] += part.reshape(n, ho, wo, c)
        t, _, l, _ = geo.pads
        return gxp[:, t:t + h, l:l + wd]   # a view: Conv2d copies it once, into the input's layout


class Winograd:
    """F(2x2, 3x3) (``winograd.py``): 3x3 kernels at stride 1, padding at most 2."""
    layout = "hwnc"
    m = 2

    @staticmethod
    def hwnc(x):
        """x (N, C, H, W) as (H, W, N, C) memory: free when a Winograd layer made it."""
        return np.ascontiguousarray(x.transpose(2, 3, 0, 1))

    @classmethod
    def inputs(cls, x, geo):
        """x in (H, W, N, C) memory: the weight gradient transforms its tiles again, band by band."""
        return cls.hwnc(x)

    @classmethod
    def forward(cls, x, w, geo, keep):
        xh = cls.hwnc(x)
        return winograd.conv3x3(xh, w, geo.pads, m=cls.m), xh if keep else None

    @classmethod
    def weight_grad(cls, xh, g, geo):
        return winograd.filter_grad(xh, g, geo.pads, cls.m)

    @classmethod
    def input_grad(cls, g, w, geo):
        return winograd.input_grad(g, w, geo.pads, cls.m)


class Winograd4(Winograd):
    """F(4x4, 3x3): 0.56x F(2x2)'s matrix work and transformed tiles, larger transforms (chosen only
    with the numba kernels, which compile them; the numpy passes are the reference)."""
    m = 4


class Shifted:
    """kh*kw shifted products over the padded rows (``shifted.py``): stride 1."""
    layout = "nhwc"

    @staticmethod
    def inputs(x, geo):
        xp = pad_nhwc(x, geo.pads)
        return xp.reshape(-1, xp.shape[3])

    @staticmethod
    def forward(x, w, geo, keep):
        rows = Shifted.inputs(x, geo)
        return shifted.forward(rows, w, Shifted._shape(geo)), rows if keep else None

    @staticmethod
    def weight_grad(rows, g, geo):
        return shifted.filter_grad(rows, shifted.spread(g, Shifted._shape(geo)), geo.w_shape[2:], geo.padded[1])

    @staticmethod
    def input_grad(g, w, geo):
        (_, _, h, wd), (t, _, l, _) = geo.x_shape, geo.pads
        return shifted.input_grad(shifted.spread(g, Shifted._shape(geo)), w, Shifted._shape(geo))[:, t:t + h, l:l + wd]

    @staticmethod
    def _shape(geo):
        return (geo.x_shape[0], *geo.padded, geo.x_shape[1])


class Direct:
    """Compiled loops over the padded channel planes (``kernels/direct.py``): stride 1, with numba.
    The input gradient is the correlation of the output gradient, padded by kh-1 and kw-1, with the
    weights flipped and their channel axes swapped. The kernels write their results channels-last,
    like im2col's, and read the output gradient so."""
    layout = "nhwc"

    @staticmethod
    def inputs(x, geo):
        """(N, C, Hp*Wp): each image's padded channel planes, each flattened."""
        (n, c, _, _), (hp, wp) = geo.x_shape, geo.padded
        if not any(geo.pads) and x.flags.c_contiguous:
            return x.reshape(n, c, hp * wp)
        return zero_padded(x, geo.pads, axes=(2, 3)).reshape(n, c, hp * wp)

    @staticmethod
    def forward(x, w, geo, keep):
        planes = Direct.inputs(x, geo)
        return _correlate(planes, w, geo.padded[1], geo.out, (0, 0), geo.out), planes if keep else None

    @staticmethod
    def weight_grad(planes, g, geo):
        (_, ho, wo, _), wp = g.shape, geo.padded[1]
        gw = np.zeros(geo.w_shape, g.dtype)
        direct.kernels(*geo.w_shape[2:]).correlate_weight_grad(planes, g, wp, (ho - 1) * wp + wo, gw)
        return gw

    @staticmethod
    def input_grad(g, w, geo):
        (n, _, _, o), (_, _, kh, kw) = g.shape, w.shape
        framed = zero_padded(g.transpose(0, 3, 1, 2), (kh - 1, kh - 1, kw - 1, kw - 1), axes=(2, 3))
        flipped = w[:, :, ::-1, ::-1].transpose(1, 0, 2, 3)   # (C, O, kh, kw)
        (_, _, h, wd), (t, _, l, _) = geo.x_shape, geo.pads
        return _correlate(framed.reshape(n, o, -1), flipped, framed.shape[3], geo.padded, (t, l), (h, wd))


def _correlate(planes, w, wp, frame_hw, corner, out_hw):
    """planes (N, C, frame of width wp) correlated with w (O, C, kh, kw) over frame_hw (Hf, Wf) output
    pixels -> the (Ho, Wo) of them from ``corner`` (top, left) on, as the (N, Ho, Wo, O) array."""
    (n, _, _), o, (hf, wf) = planes.shape, w.shape[0], frame_hw
    out = np.empty((n, *out_hw, o), planes.dtype)
    direct.kernels(*w.shape[2:]).correlate(planes, np.ascontiguousarray(w), np.zeros(o, planes.dtype), wp,
                                           (hf - 1) * wp + wf, *corner, out)
    return out


ALGORITHMS = {"im2col": Im2col, "winograd": Winograd, "winograd4": Winograd4, "shifted": Shifted, "direct": Direct}

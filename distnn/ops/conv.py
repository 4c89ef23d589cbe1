"""Convolution of images by one of three algorithms chosen per layer shape on the host
(``conv_choice.py``): im2col and one matrix product, Winograd F(2x2, 3x3) (``winograd.py``) or shifted
products (``shifted.py``). (N, C, H, W) at the interface, channels-last in memory (``layout.py``).
"""
from __future__ import annotations

import time

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from ..autograd import Operator
from . import conv_choice, shifted, winograd
from .basic import add_row_vector, column_sums
from .conv_choice import ConvShape
from .layout import channel_rows, channels_last_order, from_channel_rows, nchw_view, nhwc


def pair(v, name):
    if isinstance(v, (int, np.integer)):
        return int(v), int(v)
    if isinstance(v, (tuple, list)) and len(v) == 2:
        return int(v[0]), int(v[1])
    raise ValueError(f"{name} must be an int or a pair of ints, got {v!r}")


def conv_padding(padding, kernel, stride):
    """Resolve ``padding`` ('valid', 'same', int or (ph, pw)) to (top, bottom, left, right).

    'same' keeps H and W at stride 1 (and gives ceil(H / stride) otherwise); an even kernel puts the
    extra row and column at the bottom and right, as PyTorch and TensorFlow do.
    """
    kh, kw = kernel
    if isinstance(padding, str):
        if padding == "valid":
            return 0, 0, 0, 0
        if padding == "same":
            if stride != (1, 1):
                raise ValueError("padding='same' is supported for stride 1 only; give integers instead")
            return (kh - 1) // 2, kh - 1 - (kh - 1) // 2, (kw - 1) // 2, kw - 1 - (kw - 1) // 2
        raise ValueError(f"padding must be 'valid', 'same' or integers, got {padding!r}")
    ph, pw = pair(padding, "padding")
    if ph < 0 or pw < 0:
        raise ValueError(f"padding must be >= 0, got {padding!r}")
    return ph, ph, pw, pw


def out_size(size, pad, k, s, what):
    out = (size + pad - k) // s + 1
    if out < 1:
        raise ValueError(f"{what}: window {k} with stride {s} does not fit input size {size} (padding {pad})")
    return out


def _pad_nhwc(xh, pads):
    t, b, l, r = pads
    if not any(pads):
        return xh
    n, h, w, c = xh.shape
    xp = np.zeros((n, h + t + b, w + l + r, c), xh.dtype)
    xp[:, t:t + h, l:l + w] = xh
    return xp


def _pad_nchw(x, pads):
    t, b, l, r = pads
    if not any(pads):
        return x
    n, c, h, w = x.shape
    xp = np.zeros((n, c, h + t + b, w + l + r), x.dtype)
    xp[:, :, t:t + h, l:l + w] = x
    return xp


def window(i, j, sh, sw, ho, wo):
    """Index of the input pixels that kernel offset (i, j) sees, for all output positions."""
    return (slice(None), slice(i, i + sh * (ho - 1) + 1, sh), slice(j, j + sw * (wo - 1) + 1, sw))


class Conv2d(Operator):
    """Cross-correlation. x (N, C, H, W), W (O, C, kh, kw), b (O,) -> (N, O, Ho, Wo).

    Three algorithms, chosen per layer shape on the host (``conv_choice``): ``im2col`` (any shape;
    returns (N, H, W, C) memory), ``winograd`` F(2x2, 3x3) (3x3 at stride 1, ``winograd.py``; (H, W, N, C)
    memory) and ``shifted`` (stride 1, ``shifted.py``; (N, H, W, C) memory). Each returns its input
    gradient in the memory order its input came in.
    """

    def __init__(self, stride=1, padding=0):
        self.stride = pair(stride, "stride")
        if min(self.stride) < 1:
            raise ValueError(f"stride must be >= 1, got {stride!r}")
        self.padding = padding

    def forward(self, x, w, b=None):
        n, c, h, wd = x.shape
        o, cw, kh, kw = w.shape
        if c != cw:
            raise ValueError(f"conv2d: input has {c} channels, weight expects {cw}")
        pads = conv_padding(self.padding, (kh, kw), self.stride)
        ho = out_size(h, pads[0] + pads[1], kh, self.stride[0], "conv2d")
        wo = out_size(wd, pads[2] + pads[3], kw, self.stride[1], "conv2d")
        if not hasattr(self, "algorithm"):   # (set beforehand when calibrating)
            shape = ConvShape(n, c, h, wd, o, (kh, kw), self.stride, pads, x.dtype.name)
            self.algorithm = conv_choice.choose(shape, lambda a: self._time(a, x, w, b))
        self.pads, self.w, self.x_order = pads, w, channels_last_order(x)
        y = getattr(self, f"_forward_{self.algorithm}")(x, w, pads, (ho, wo))   # channels-last, contiguous
        if b is not None:
            add_row_vector(y.reshape(-1, o), b)
        return y.transpose(2, 3, 0, 1) if self.algorithm == "winograd" else nchw_view(y)

    def _time(self, algorithm, x, w, b) -> float:
        """Seconds of one forward + backward of this convolution by ``algorithm`` (calibration)."""
        op = Conv2d(self.stride, self.padding)
        op.algorithm, op.needs_grad = algorithm, (True, True, True)[:2 + (b is not None)]
        start = time.perf_counter()
        y = op.forward(x, w) if b is None else op.forward(x, w, b)
        op.backward(np.ones_like(y))
        return time.perf_counter() - start

    def _forward_im2col(self, x, w, pads, out):
        (n, c, _, _), (o, _, kh, kw), (sh, sw), (ho, wo) = x.shape, w.shape, self.stride, out
        wm = w.transpose(0, 2, 3, 1).reshape(o, kh * kw * c)
        if x.flags.c_contiguous:
            # A channels-first input (the images entering a network): gather the columns transposed,
            # (kh*kw*C, N*Ho*Wo), whose rows copy runs of Wo pixels; channels-last columns would copy
            # runs of C, as short as one pixel for a grey image (LeNet-5's conv1 at batch 64: 1.3 ms
            # against 0.3 ms).
            xp = _pad_nchw(x, pads)
            windows = sliding_window_view(xp, (kh, kw), axis=(2, 3))[:, :, ::sh, ::sw]  # (N, C, Ho, Wo, kh, kw)
            cols_t = np.empty((kh, kw, c, n, ho, wo), x.dtype)
            np.copyto(cols_t, windows.transpose(4, 5, 1, 0, 2, 3))
            cols_t = cols_t.reshape(kh * kw * c, n * ho * wo)
            y = cols_t.T @ wm.T
            self.cols, self.cols_t = None, cols_t if self.needs_grad[1] else None
            xp_shape = (n, xp.shape[2], xp.shape[3], c)
        else:
            xp = _pad_nhwc(nhwc(x), pads)
            windows = sliding_window_view(xp, (kh, kw), axis=(1, 2))[:, ::sh, ::sw]  # (N, Ho, Wo, C, kh, kw)
            cols = np.empty((n, ho, wo, kh, kw, c), x.dtype)
            np.copyto(cols, windows.transpose(0, 1, 2, 4, 5, 3))  # one pass; inner runs of C channels
            cols = cols.reshape(n * ho * wo, kh * kw * c)
            y = cols @ wm.T
            self.cols, self.cols_t = cols if self.needs_grad[1] else None, None
            xp_shape = xp.shape
        self.wm, self.geom = wm, (x.shape, xp_shape, pads, (kh, kw), (ho, wo))
        return y.reshape(n, ho, wo, o)

    def _forward_shifted(self, x, w, pads, out):
        xp = _pad_nhwc(nhwc(x), pads)
        self.rows, self.padded_shape = xp.reshape(-1, xp.shape[3]), xp.shape
        return shifted.forward(self.rows, w, xp.shape)

    def _forward_winograd(self, x, w, pads, out):
        n, c, h, wd = x.shape
        t, bottom, l, r = pads
        xp = np.zeros((h + t + bottom, wd + l + r, n, c), x.dtype)
        xp[t:t + h, l:l + wd] = x.transpose(2, 3, 0, 1)
        keep = self.needs_grad[1]
        y = winograd.conv3x3(xp, w, keep_tiles=keep)
        if keep:
            y, self.tiles, self.even_shape = y
        return y

    def backward(self, gy):
        gx, gw, gb = getattr(self, f"_backward_{self.algorithm}")(gy)
        if gx is not None:   # in the input's memory order, so that the element-wise backward passes
            #                  before (ReLU, batch norm) read arrays laid out alike
            gx = from_channel_rows(channel_rows(gx, self.x_order), self.x_order, gx.shape)
        return (gx, gw, gb)[:len(self.needs_grad)]

    def _bias_grad(self, rows):
        return column_sums(rows) if len(self.needs_grad) == 3 and self.needs_grad[2] else None

    def _backward_shifted(self, gy):
        (kh, kw), (t, _, l, _) = self.w.shape[2:], self.pads
        g = nhwc(gy)   # (N, Ho, Wo, O)
        grows = shifted.spread(g, self.padded_shape)
        gw = shifted.filter_grad(self.rows, grows, (kh, kw), self.padded_shape[2]) if self.needs_grad[1] else None
        gx = None
        if self.needs_grad[0]:
            h, wd = self.padded_shape[1] - sum(self.pads[:2]), self.padded_shape[2] - sum(self.pads[2:])
            gx = nchw_view(shifted.input_grad(grows, self.w, self.padded_shape)[:, t:t + h, l:l + wd])
        self.rows = None
        return gx, gw, self._bias_grad(g.reshape(-1, g.shape[3]))

    def _backward_winograd(self, gy):
        g = np.ascontiguousarray(gy.transpose(2, 3, 0, 1))  # (Ho, Wo, N, O): free after a Winograd conv
        gw = gx = None
        if self.needs_grad[1]:
            gw = winograd.filter_grad(self.tiles, g, self.even_shape)
            self.tiles = None
        if self.needs_grad[0]:
            gx = winograd.input_grad(g, self.w, self.pads).transpose(2, 3, 0, 1)
        return gx, gw, self._bias_grad(g.reshape(-1, g.shape[3]))

    def _backward_im2col(self, gy):
        (n, c, h, wd), xp_shape, pads, (kh, kw), (ho, wo) = self.geom
        sh, sw = self.stride
        g2 = nhwc(gy).reshape(-1, gy.shape[1])
        gw = gx = None
        if self.needs_grad[1]:
            gw = g2.T @ self.cols if self.cols is not None else (self.cols_t @ g2).T
            gw = gw.reshape(-1, kh, kw, c).transpose(0, 3, 1, 2)
            self.cols = self.cols_t = None
        if self.needs_grad[0]:
            # col2im one kernel offset at a time: (N*Ho*Wo, O) @ (O, C) lands contiguous and is added
            # into the input positions that offset saw, without the (N*Ho*Wo, kh*kw*C) column gradient.
            wk = self.wm.reshape(-1, kh, kw, c)
            gxp = np.zeros(xp_shape, gy.dtype)
            part = np.empty((g2.shape[0], c), gy.dtype)
            for i in range(kh):
                for j in range(kw):
                    np.matmul(g2, wk[:, i, j, :], out=part)
                    gxp[window(i, j, sh, sw, ho, wo)] += part.reshape(n, ho, wo, c)
            t, _, l, _ = pads
            gx = nchw_view(np.ascontiguousarray(gxp[:, t:t + h, l:l + wd]) if any(pads) else gxp)
        return gx, gw, self._bias_grad(g2)


def conv2d(x, w, b=None, stride=1, padding=0):
    """x (N, C, H, W), w (O, C, kh, kw), b (O,) -> (N, O, Ho, Wo)."""
    op = Conv2d(stride, padding)
    return op(x, w) if b is None else op(x, w, b)

"""Convolution and pooling over images.

Images are (N, C, H, W) at the interface, as PyTorch and the data shards have them. In memory the
channel axis is innermost: an operator here returns a channels-last array seen through a transpose
to (N, C, H, W), so a stack of conv / batch norm / relu / pool layers never pays for a layout change
except at the first layer and the flatten. Two channels-last orders occur:

- (N, H, W, C) from im2col convolutions: im2col is a copy of contiguous channel runs and the
  convolution one matrix product (N*Ho*Wo, kh*kw*C) @ (kh*kw*C, O) whose result is the next input.
- (H, W, N, C) from Winograd convolutions (3x3, stride 1, ops/winograd.py), whose tile transforms
  copy runs of N*C values.

Batch norm and pooling work in whichever order they are given (``channels_last_order``), and they and
Winograd convolutions return their input gradient in their input's order, so the element-wise
backward passes between them read arrays laid out alike.
"""
from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from ..autograd import Operator
from . import winograd
from .basic import add_row_vector, column_sums


def nhwc(x: np.ndarray) -> np.ndarray:
    """(N, C, H, W) -> a C-contiguous (N, H, W, C) array; free when x is already channels-last."""
    return np.ascontiguousarray(x.transpose(0, 2, 3, 1))


def nchw_view(x: np.ndarray) -> np.ndarray:
    """(N, H, W, C) -> the logical (N, C, H, W) view of the same memory."""
    return x.transpose(0, 3, 1, 2)


def channels_last_order(x: np.ndarray) -> tuple:
    """The axis order, channels last, in which the (N, C, H, W) array x is laid out in memory:
    (0, 2, 3, 1) for (N, H, W, C), (2, 3, 0, 1) for the (H, W, N, C) of Winograd convolutions, and
    (0, 2, 3, 1) when x is channels-first (it must then be copied)."""
    if x.strides[1] == x.itemsize:
        order = (*sorted((0, 2, 3), key=lambda a: -x.strides[a]), 1)
        if x.transpose(order).flags.c_contiguous:
            return order
    return 0, 2, 3, 1


def channel_rows(x: np.ndarray, order: tuple) -> np.ndarray:
    """(N, C, H, W) -> (M, C) rows in the given axis order: a view when x is laid out that way."""
    return np.ascontiguousarray(x.transpose(order)).reshape(-1, x.shape[1])


def from_channel_rows(rows: np.ndarray, order: tuple, shape: tuple) -> np.ndarray:
    """Inverse of channel_rows: (M, C) -> the (N, C, H, W) view of the same memory."""
    return rows.reshape([shape[a] for a in order]).transpose(np.argsort(order))


def image_view(x: np.ndarray):
    """(N, C, H, W) -> a (B, H, W, K) array over x's memory, where B * K = N * C, and the function that
    turns a (B, h, w, K) result back into (N, C, h, w). A view for (N, H, W, C) memory (B = N, K = C)
    and for the (H, W, N, C) of Winograd convolutions (B = 1, K = N * C); otherwise an (N, H, W, C) copy.
    Pooling reads and writes through it, so it keeps whichever layout it is given."""
    order = channels_last_order(x)
    i = order.index(2)
    if order[i + 1] != 3:
        order, i = (0, 2, 3, 1), 1
    pre, post = order[:i], order[i + 2:]
    b = int(np.prod([x.shape[a] for a in pre]))
    v = np.ascontiguousarray(x.transpose(order)).reshape(b, x.shape[2], x.shape[3], -1)

    def back(r):
        h, w = r.shape[1:3]
        full = r.reshape(*(x.shape[a] for a in pre), h, w, *(x.shape[a] for a in post))
        return full.transpose(np.argsort(order))
    back.order = order
    return v, back


def _pair(v, name):
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
    ph, pw = _pair(padding, "padding")
    if ph < 0 or pw < 0:
        raise ValueError(f"padding must be >= 0, got {padding!r}")
    return ph, ph, pw, pw


def _out_size(size, pad, k, s, what):
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


def _window(i, j, sh, sw, ho, wo):
    """Index of the input pixels that kernel offset (i, j) sees, for all output positions."""
    return (slice(None), slice(i, i + sh * (ho - 1) + 1, sh), slice(j, j + sw * (wo - 1) + 1, sw))


WINOGRAD_MIN_CHANNELS = 8


class Conv2d(Operator):
    """Cross-correlation. x (N, C, H, W), W (O, C, kh, kw), b (O,) -> (N, O, Ho, Wo).

    3x3 kernels at stride 1 with at least WINOGRAD_MIN_CHANNELS input channels run as Winograd
    F(2x2, 3x3) (ops/winograd.py) and return (H, W, N, C)-ordered memory; every other shape runs as
    im2col and one matrix product.
    """

    def __init__(self, stride=1, padding=0):
        self.stride = _pair(stride, "stride")
        if min(self.stride) < 1:
            raise ValueError(f"stride must be >= 1, got {stride!r}")
        self.padding = padding

    def forward(self, x, w, b=None):
        n, c, h, wd = x.shape
        o, cw, kh, kw = w.shape
        if c != cw:
            raise ValueError(f"conv2d: input has {c} channels, weight expects {cw}")
        sh, sw = self.stride
        pads = conv_padding(self.padding, (kh, kw), self.stride)
        ho = _out_size(h, pads[0] + pads[1], kh, sh, "conv2d")
        wo = _out_size(wd, pads[2] + pads[3], kw, sw, "conv2d")
        if (kh, kw) == (3, 3) and (sh, sw) == (1, 1) and max(pads) <= 2 and c >= WINOGRAD_MIN_CHANNELS:
            return self._forward_winograd(x, w, b, pads)
        self.winograd = False
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
        if b is not None:
            add_row_vector(y, b)
        self.wm, self.geom = wm, (x.shape, xp_shape, pads, (kh, kw), (ho, wo))
        return nchw_view(y.reshape(n, ho, wo, o))

    def _forward_winograd(self, x, w, b, pads):
        n, c, h, wd = x.shape
        t, bottom, l, r = pads
        xp = np.zeros((h + t + bottom, wd + l + r, n, c), x.dtype)
        xp[t:t + h, l:l + wd] = x.transpose(2, 3, 0, 1)
        keep = self.needs_grad[1]
        y = winograd.conv3x3(xp, w, keep_tiles=keep)
        if keep:
            y, self.tiles, self.even_shape = y
        if b is not None:
            if y.flags.c_contiguous:
                add_row_vector(y.reshape(-1, y.shape[-1]), b)
            else:  # cropped to an odd size
                y += b
        self.winograd, self.w, self.pads, self.x_order = True, w, pads, channels_last_order(x)
        return y.transpose(2, 3, 0, 1)

    def _backward_winograd(self, gy):
        g = np.ascontiguousarray(gy.transpose(2, 3, 0, 1))  # (Ho, Wo, N, O): free after a Winograd conv
        gx = gw = gb = None
        if self.needs_grad[1]:
            gw = winograd.filter_grad(self.tiles, g, self.even_shape)
            self.tiles = None
        if len(self.needs_grad) == 3 and self.needs_grad[2]:
            gb = column_sums(g.reshape(-1, g.shape[3]))
        if self.needs_grad[0]:
            # returned in the input's memory order, so that the backward of the element-wise layers
            # before (ReLU, batch norm) reads gradient and saved arrays in the same order
            gx = winograd.input_grad(g, self.w, self.pads).transpose(2, 3, 0, 1)
            gx = from_channel_rows(channel_rows(gx, self.x_order), self.x_order, gx.shape)
        return (gx, gw) if len(self.needs_grad) == 2 else (gx, gw, gb)

    def backward(self, gy):
        if self.winograd:
            return self._backward_winograd(gy)
        (n, c, h, wd), xp_shape, pads, (kh, kw), (ho, wo) = self.geom
        sh, sw = self.stride
        g2 = nhwc(gy).reshape(-1, gy.shape[1])
        gw = gb = gx = None
        if self.needs_grad[1]:
            gw = g2.T @ self.cols if self.cols is not None else (self.cols_t @ g2).T
            gw = gw.reshape(-1, kh, kw, c).transpose(0, 3, 1, 2)
            self.cols = self.cols_t = None
        if len(self.needs_grad) == 3 and self.needs_grad[2]:
            gb = column_sums(g2)
        if self.needs_grad[0]:
            # col2im one kernel offset at a time: (N*Ho*Wo, O) @ (O, C) lands contiguous and is added
            # into the input positions that offset saw, without the (N*Ho*Wo, kh*kw*C) column gradient.
            wk = self.wm.reshape(-1, kh, kw, c)
            gxp = np.zeros(xp_shape, gy.dtype)
            part = np.empty((g2.shape[0], c), gy.dtype)
            for i in range(kh):
                for j in range(kw):
                    np.matmul(g2, wk[:, i, j, :], out=part)
                    gxp[_window(i, j, sh, sw, ho, wo)] += part.reshape(n, ho, wo, c)
            t, _, l, _ = pads
            gx = nchw_view(np.ascontiguousarray(gxp[:, t:t + h, l:l + wd]) if any(pads) else gxp)
        return (gx, gw) if len(self.needs_grad) == 2 else (gx, gw, gb)


def _rows_like(gy, back, x_shape):
    """gy (N, C, ho, wo) in the (B, ho, wo, K) layout that ``back`` (from image_view) undoes."""
    g = np.ascontiguousarray(gy.transpose(back.order))
    return g.reshape(x_shape[0], gy.shape[2], gy.shape[3], x_shape[3])


class _Pool2d(Operator):
    def __init__(self, kernel_size, stride=None):
        self.kernel = _pair(kernel_size, "kernel_size")
        self.stride = self.kernel if stride is None else _pair(stride, "stride")
        if min(self.kernel) < 1 or min(self.stride) < 1:
            raise ValueError(f"kernel_size and stride must be >= 1, got {kernel_size!r}, {stride!r}")

    def _geometry(self, x):
        n, c, h, w = x.shape
        (kh, kw), (sh, sw) = self.kernel, self.stride
        name = type(self).__name__
        return _out_size(h, 0, kh, sh, name), _out_size(w, 0, kw, sw, name)

    def _offsets(self, ho, wo):
        (kh, kw), (sh, sw) = self.kernel, self.stride
        return [_window(i, j, sh, sw, ho, wo) for i in range(kh) for j in range(kw)]


class MaxPool2d(_Pool2d):
    """Max over kh x kw windows moved by the stride (windows may overlap). (N, C, H, W) -> (N, C, Ho, Wo).

    Exactly one input per window wins (the first maximum found), so ties, common after a ReLU, send
    the window's whole gradient to one input, as in PyTorch, never a copy to each.
    """

    def forward(self, x):
        ho, wo = self._geometry(x)
        xh, self.back = image_view(x)
        self.x_shape = xh.shape
        self.tiled = self.kernel == self.stride and xh.shape[1] == ho * self.kernel[0] \
            and xh.shape[2] == wo * self.kernel[1]
        if self.tiled:
            return self.back(self._forward_tiled(xh, ho, wo))
        offsets = self._offsets(ho, wo)
        best, arg = xh[offsets[0]], np.zeros((xh.shape[0], ho, wo, xh.shape[3]), np.uint8)
        for t, idx in enumerate(offsets[1:], start=1):
            better = xh[idx] > best
            arg = np.where(better, np.uint8(t), arg)
            best = np.maximum(best, xh[idx])
        self.arg = arg
        return self.back(best)

    @staticmethod
    def _argmax_rows(rows):
        """Max over axis 2 of rows (A, B, k, L) by k - 1 comparisons -> max (A, B, L), winner (uint8)."""
        best, arg = rows[:, :, 0], None
        for t in range(1, rows.shape[2]):
            v = rows[:, :, t]
            better = v > best
            arg = better.view(np.uint8) if arg is None else np.where(better, np.uint8(t), arg)
            best = np.maximum(best, v)
        return best, arg

    def _forward_tiled(self, xh, ho, wo):
        """Windows that tile the image: first the max over the kh rows of each window, comparing
        whole contiguous image rows, then over the kw columns; two winner maps for backward."""
        (kh, kw), (n, _, _, c) = self.kernel, xh.shape
        rows, self.arg_row = self._argmax_rows(xh.reshape(n, ho, kh, wo * kw * c))
        best, self.arg_col = self._argmax_rows(rows.reshape(n * ho, wo, kw, c))
        return best.reshape(n, ho, wo, c)

    def backward(self, gy):
        gyh = _rows_like(gy, self.back, self.x_shape)
        if self.tiled:
            (kh, kw), (n, _, _, c) = self.kernel, self.x_shape
            ho, wo = gyh.shape[1:3]
            g_cols = np.empty((n * ho, wo, kw, c), gy.dtype)
            g = gyh.reshape(n * ho, wo, c)
            for t in range(kw):
                np.multiply(g, self.arg_col == t, out=g_cols[:, :, t])
            g_cols = g_cols.reshape(n, ho, wo * kw * c)
            gx = np.empty((n, ho, kh, wo * kw * c), gy.dtype)
            for t in range(kh):
                np.multiply(g_cols, self.arg_row == t, out=gx[:, :, t])
            return self.back(gx.reshape(self.x_shape))
        gx = np.zeros(self.x_shape, gy.dtype)
        for t, idx in enumerate(self._offsets(*gyh.shape[1:3])):
            gx[idx] += np.where(self.arg == t, gyh, 0)
        return self.back(gx)


class AvgPool2d(_Pool2d):
    """Mean over kh x kw windows moved by the stride. (N, C, H, W) -> (N, C, Ho, Wo)."""

    def forward(self, x):
        ho, wo = self._geometry(x)
        xh, self.back = image_view(x)
        offsets = self._offsets(ho, wo)
        y = xh[offsets[0]].copy()
        for idx in offsets[1:]:
            y += xh[idx]
        y *= np.asarray(1.0 / len(offsets), y.dtype)
        self.x_shape = xh.shape
        return self.back(y)

    def backward(self, gy):
        gyh = _rows_like(gy, self.back, self.x_shape)
        offsets = self._offsets(*gyh.shape[1:3])
        share = gyh * np.asarray(1.0 / len(offsets), gy.dtype)
        gx = np.zeros(self.x_shape, gy.dtype)
        for idx in offsets:
            gx[idx] += share
        return self.back(gx)


def conv2d(x, w, b=None, stride=1, padding=0):
    """x (N, C, H, W), w (O, C, kh, kw), b (O,) -> (N, O, Ho, Wo)."""
    op = Conv2d(stride, padding)
    return op(x, w) if b is None else op(x, w, b)


def max_pool2d(x, kernel_size, stride=None):
    return MaxPool2d(kernel_size, stride)(x)


def avg_pool2d(x, kernel_size, stride=None):
    return AvgPool2d(kernel_size, stride)(x)

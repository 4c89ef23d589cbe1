"""Convolution and pooling over images.

Images are (N, C, H, W) at the interface, as PyTorch and the data shards have them. Inside, every
operator here works on the channels-last view ``x.transpose(0, 2, 3, 1)`` and returns its result as a
channels-last array seen through the inverse transpose. So a stack of conv / batch norm / relu / pool
layers keeps its activations channels-last in memory, where im2col is a plain copy of contiguous
channel runs and the convolution one matrix product (N*Ho*Wo, kh*kw*C) @ (kh*kw*C, O) whose result is
already the next layer's input; no layer pays for a layout change except the first and the flatten.
"""
from __future__ import annotations

import numpy as np

from ..autograd import Operator


def nhwc(x: np.ndarray) -> np.ndarray:
    """(N, C, H, W) -> a C-contiguous (N, H, W, C) array; free when x is already channels-last."""
    return np.ascontiguousarray(x.transpose(0, 2, 3, 1))


def nchw_view(x: np.ndarray) -> np.ndarray:
    """(N, H, W, C) -> the logical (N, C, H, W) view of the same memory."""
    return x.transpose(0, 3, 1, 2)


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


def _window(i, j, sh, sw, ho, wo):
    """Index of the input pixels that kernel offset (i, j) sees, for all output positions."""
    return (slice(None), slice(i, i + sh * (ho - 1) + 1, sh), slice(j, j + sw * (wo - 1) + 1, sw))


class Conv2d(Operator):
    """Cross-correlation. x (N, C, H, W), W (O, C, kh, kw), b (O,) -> (N, O, Ho, Wo)."""

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
        xp = _pad_nhwc(nhwc(x), pads)
        cols = np.empty((n, ho, wo, kh, kw, c), x.dtype)
        for i in range(kh):
            for j in range(kw):
                cols[:, :, :, i, j, :] = xp[_window(i, j, sh, sw, ho, wo)]
        cols = cols.reshape(n * ho * wo, kh * kw * c)
        wm = w.transpose(0, 2, 3, 1).reshape(o, kh * kw * c)
        y = cols @ wm.T
        if b is not None:
            y += b
        self.cols = cols if self.needs_grad[1] else None
        self.wm, self.geom = wm, (x.shape, xp.shape, pads, (kh, kw), (ho, wo))
        return nchw_view(y.reshape(n, ho, wo, o))

    def backward(self, gy):
        (n, c, h, wd), xp_shape, pads, (kh, kw), (ho, wo) = self.geom
        sh, sw = self.stride
        g2 = nhwc(gy).reshape(-1, gy.shape[1])
        gw = gb = gx = None
        if self.needs_grad[1]:
            gw = (g2.T @ self.cols).reshape(-1, kh, kw, c).transpose(0, 3, 1, 2)
            self.cols = None  # free it before the column gradient of the same size exists
        if len(self.needs_grad) == 3 and self.needs_grad[2]:
            gb = g2.sum(axis=0)
        if self.needs_grad[0]:
            gcols = (g2 @ self.wm).reshape(n, ho, wo, kh, kw, c)
            gxp = np.zeros(xp_shape, gy.dtype)
            for i in range(kh):
                for j in range(kw):
                    gxp[_window(i, j, sh, sw, ho, wo)] += gcols[:, :, :, i, j, :]
            t, _, l, _ = pads
            gx = nchw_view(np.ascontiguousarray(gxp[:, t:t + h, l:l + wd]) if any(pads) else gxp)
        return (gx, gw) if len(self.needs_grad) == 2 else (gx, gw, gb)


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

    The winner of each window is the first maximum in row-major window order, so ties send the
    whole gradient to one input, as in PyTorch.
    """

    def forward(self, x):
        ho, wo = self._geometry(x)
        xh = nhwc(x)
        offsets = self._offsets(ho, wo)
        best = xh[offsets[0]].copy()
        arg = np.zeros(best.shape, np.uint8)
        for t, idx in enumerate(offsets[1:], start=1):
            v = xh[idx]
            better = v > best
            np.copyto(best, v, where=better)
            arg[better] = t
        self.arg, self.x_shape = arg, xh.shape
        return nchw_view(best)

    def backward(self, gy):
        gyh = nhwc(gy)
        gx = np.zeros(self.x_shape, gy.dtype)
        for t, idx in enumerate(self._offsets(*gyh.shape[1:3])):
            gx[idx] += np.where(self.arg == t, gyh, 0)
        return nchw_view(gx)


class AvgPool2d(_Pool2d):
    """Mean over kh x kw windows moved by the stride. (N, C, H, W) -> (N, C, Ho, Wo)."""

    def forward(self, x):
        ho, wo = self._geometry(x)
        xh = nhwc(x)
        offsets = self._offsets(ho, wo)
        y = xh[offsets[0]].copy()
        for idx in offsets[1:]:
            y += xh[idx]
        y *= np.asarray(1.0 / len(offsets), y.dtype)
        self.x_shape = xh.shape
        return nchw_view(y)

    def backward(self, gy):
        gyh = nhwc(gy)
        offsets = self._offsets(*gyh.shape[1:3])
        share = gyh * np.asarray(1.0 / len(offsets), gy.dtype)
        gx = np.zeros(self.x_shape, gy.dtype)
        for idx in offsets:
            gx[idx] += share
        return nchw_view(gx)


def conv2d(x, w, b=None, stride=1, padding=0):
    """x (N, C, H, W), w (O, C, kh, kw), b (O,) -> (N, O, Ho, Wo)."""
    op = Conv2d(stride, padding)
    return op(x, w) if b is None else op(x, w, b)


def max_pool2d(x, kernel_size, stride=None):
    return MaxPool2d(kernel_size, stride)(x)


def avg_pool2d(x, kernel_size, stride=None):
    return AvgPool2d(kernel_size, stride)(x)

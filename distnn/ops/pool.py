"""Max and average pooling over kh x kw windows moved by a stride (windows may overlap).
(N, C, H, W) -> (N, C, Ho, Wo) at the interface; in memory whichever channels-last order the input
has (``layout.py``), and the input gradient comes back in that order.
"""
from __future__ import annotations

import numpy as np

from .. import kernels
from ..autograd import Operator
from .conv import out_size, pair
from .conv_algorithms import window
from .layout import image_view


def _rows_like(gy, back, x_shape):
    """gy (N, C, ho, wo) in the (B, ho, wo, K) layout that ``back`` (from image_view) undoes."""
    g = np.ascontiguousarray(gy.transpose(back.order))
    return g.reshape(x_shape[0], gy.shape[2], gy.shape[3], x_shape[3])


class _Pool2d(Operator):
    def __init__(self, kernel_size, stride=None):
        self.kernel = pair(kernel_size, "kernel_size")
        self.stride = self.kernel if stride is None else pair(stride, "stride")
        if min(self.kernel) < 1 or min(self.stride) < 1:
            raise ValueError(f"kernel_size and stride must be >= 1, got {kernel_size!r}, {stride!r}")

    def _geometry(self, x):
        n, c, h, w = x.shape
        (kh, kw), (sh, sw) = self.kernel, self.stride
        name = type(self).__name__
        return out_size(h, 0, kh, sh, name), out_size(w, 0, kw, sw, name)

    def _offsets(self, ho, wo):
        (kh, kw), (sh, sw) = self.kernel, self.stride
        return [window(i, j, sh, sw, ho, wo) for i in range(kh) for j in range(kw)]


class MaxPool2d(_Pool2d):
    """Max over kh x kw windows moved by the stride (windows may overlap). (N, C, H, W) -> (N, C, Ho, Wo).

    Exactly one input per window wins (the first maximum found), so ties, common after a ReLU, send
    the window's whole gradient to one input, as in PyTorch, never a copy to each. 2x2 windows that
    tile the image (LeNet-5's, the CIFAR network's) run a compiled kernel (``kernels``) where the
    numba path is on; ``_forward_tiled`` is its numpy reference.
    """

    def __init__(self, kernel_size, stride=None, relu: bool = False):
        super().__init__(kernel_size, stride)
        self.relu = relu

    def forward(self, x):
        y = self._max(x)
        if self.relu and not self.compiled:   # (not in place: a 1x1 window's max is a view of x)
            y = np.maximum(y, 0)
            self.kept = y > 0
        return y

    def _max(self, x):
        ho, wo = self._geometry(x)
        xh, self.back = image_view(x)
        self.x_shape = xh.shape
        self.tiled = self.kernel == self.stride and xh.shape[1] == ho * self.kernel[0] \
            and xh.shape[2] == wo * self.kernel[1]
        self.compiled = self.tiled and self.kernel == (2, 2) and kernels.compiled()
        if self.compiled:   # the same maths in one pass (kernels/fused.py)
            shape = (xh.shape[0], ho, wo, xh.shape[3])
            y, self.arg = np.empty(shape, xh.dtype), np.empty(shape, np.uint8)
            self.compiled.max_pool_2x2(xh, self.relu, y, self.arg)
            return self.back(y)
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
        if self.relu and not self.compiled:
            gy = gy * self.kept
        gyh = _rows_like(gy, self.back, self.x_shape)
        if self.compiled:
            gx = np.empty(self.x_shape, gy.dtype)
            self.compiled.max_pool_2x2_backward(gyh, self.arg, gx)
            return self.back(gx)
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


def max_pool2d(x, kernel_size, stride=None, relu: bool = False):
    """x (N, C, H, W) -> (N, C, Ho, Wo): the max of each window (stride defaults to the kernel size);
    ``relu``: max(., 0) of the result, which equals pooling the ReLU of x (the max of a window commutes
    with a rising function) without a pass over the whole input."""
    return MaxPool2d(kernel_size, stride, relu)(x)


def avg_pool2d(x, kernel_size, stride=None):
    """x (N, C, H, W) -> (N, C, Ho, Wo): the mean of each window (stride defaults to the kernel size)."""
    return AvgPool2d(kernel_size, stride)(x)

"""Memory layouts of images: how the convolution, pooling and batch-norm operators keep channels last.

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


def memory_order(x: np.ndarray) -> tuple:
    """x's axes from the outermost in memory to the innermost (by decreasing stride)."""
    return tuple(sorted(range(x.ndim), key=lambda a: -abs(x.strides[a])))


def empty_in_order(shape, dtype, order) -> np.ndarray:
    """An uninitialised array of ``shape`` whose memory runs through the axes in ``order`` (outermost
    first, as ``memory_order`` gives them): a layer's output laid out as its input is."""
    return np.empty([shape[a] for a in order], dtype).transpose(np.argsort(order))


def zeros_in_order(shape, dtype, order) -> np.ndarray:
    """``empty_in_order``, zeroed."""
    out = empty_in_order(shape, dtype, order)
    out[...] = 0
    return out


def zero_padded(values: np.ndarray, pads, axes=(0, 1)) -> np.ndarray:
    """A new C-contiguous array of ``values`` inside a border of zeros: pads (top, bottom, left,
    right) along two ``axes``. Only the border is zeroed (zeros, then the values, writes most of it
    twice)."""
    t, b, l, r = pads
    shape = list(values.shape)
    shape[axes[0]] += t + b
    shape[axes[1]] += l + r
    out = np.empty(shape, values.dtype)
    frame, inner = np.moveaxis(out, axes, (0, 1)), np.moveaxis(values, axes, (0, 1))
    h, w = inner.shape[:2]
    frame[:t], frame[t + h:], frame[t:t + h, :l], frame[t:t + h, l + w:] = 0, 0, 0, 0
    frame[t:t + h, l:l + w] = inner
    return out

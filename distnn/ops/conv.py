"""Convolution of images: the Conv2d operator, its padding and output-size rules. The algorithms
(im2col, Winograd F(2x2, 3x3) and F(4x4, 3x3), shifted products, direct compiled loops) are in
``conv_algorithms.py``, the choice of one per layer shape and pass in ``conv_choice.py``. (N, C, H, W)
at the interface, channels-last in memory (``layout.py``).
"""
from __future__ import annotations

import time

import numpy as np

from ..autograd import Operator
from . import conv_choice
from .basic import add_row_vector, column_sums
from .conv_algorithms import ALGORITHMS, Geometry
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


class Conv2d(Operator):
    """Cross-correlation. x (N, C, H, W), W (O, C, kh, kw), b (O,) -> (N, O, Ho, Wo).

    Forward, input gradient and weight gradient each run one of five algorithms (``conv_algorithms``:
    im2col, Winograd F(2x2, 3x3) and F(4x4, 3x3), shifted products, direct), chosen per layer shape on
    the host (``conv_choice``). The output is channels-last in memory ((N, H, W, C), or (H, W, N, C)
    from Winograd); the input gradient comes back in the memory order the input came in.
    """

    fresh_input_grads = True   # the input gradient is always made anew, whichever algorithm made it

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
        out = (out_size(h, pads[0] + pads[1], kh, self.stride[0], "conv2d"),
               out_size(wd, pads[2] + pads[3], kw, self.stride[1], "conv2d"))
        self.geo = geo = Geometry(x.shape, w.shape, self.stride, pads, out)
        if not hasattr(self, "choice"):   # (given beforehand when calibrating)
            shape = ConvShape(n, c, h, wd, o, (kh, kw), self.stride, pads, x.dtype.name)
            self.choice = conv_choice.choose(shape, lambda step, a, first: self._time(step, a, first, x, w))
        keep = self.needs_grad[1] and self.choice.weight_grad == self.choice.forward
        y, self.kept = ALGORITHMS[self.choice.forward].forward(x, w, geo, keep)
        self.x = x if self.needs_grad[1] and not keep else None   # the weight gradient builds its own inputs
        self.w, self.x_order = w, channels_last_order(x)
        if b is not None:
            add_row_vector(y.reshape(-1, o), b)
        return _to_nchw(y, ALGORITHMS[self.choice.forward].layout)

    def backward(self, gy):
        laid = {}   # the output gradient in each layout an algorithm reads it in

        def grad(layout):
            if layout not in laid:
                laid[layout] = _from_nchw(gy, layout)
            return laid[layout]
        gx = gw = gb = None
        if self.needs_grad[1]:
            algorithm = ALGORITHMS[self.choice.weight_grad]
            kept = self.kept if self.kept is not None else algorithm.inputs(self.x, self.geo)
            gw = algorithm.weight_grad(kept, grad(algorithm.layout), self.geo)
            self.kept = self.x = None
        if self.needs_grad[0]:
            algorithm = ALGORITHMS[self.choice.input_grad]
            gx = _to_nchw(algorithm.input_grad(grad(algorithm.layout), self.w, self.geo), algorithm.layout)
            # in the input's memory order, so that the element-wise backward passes before (ReLU,
            # batch norm) read arrays laid out alike
            gx = from_channel_rows(channel_rows(gx, self.x_order), self.x_order, gx.shape)
        if len(self.needs_grad) == 3 and self.needs_grad[2]:
            g = next(iter(laid.values())) if laid else grad("nhwc")
            gb = column_sums(g.reshape(-1, g.shape[-1]))
        return (gx, gw, gb)[:len(self.needs_grad)]

    def _time(self, step, algorithm, first, x, w) -> float:
        """Seconds of one ``step`` ("forward", "input_grad" or "weight_grad") of this convolution by
        ``algorithm``, the output gradient laid out as the ``first`` (forward) algorithm gives it, and
        a weight gradient by the forward's own algorithm reusing what that forward kept
        (calibration)."""
        geo, run = self.geo, ALGORITHMS[algorithm]
        if step == "forward":
            start = time.perf_counter()
            run.forward(x, w, geo, False)
            return time.perf_counter() - start
        y, kept = ALGORITHMS[first].forward(x, w, geo, step == "weight_grad" and algorithm == first)
        gy = _to_nchw(np.ones_like(y), ALGORITHMS[first].layout)
        start = time.perf_counter()
        g = _from_nchw(gy, run.layout)
        if step == "input_grad":
            run.input_grad(g, w, geo)
        else:
            run.weight_grad(kept if kept is not None else run.inputs(x, geo), g, geo)
        return time.perf_counter() - start


def _to_nchw(y, layout):
    """A channels-last array in ``layout`` -> its (N, C, H, W) view."""
    return nchw_view(y) if layout == "nhwc" else y.transpose(2, 3, 0, 1)


def _from_nchw(g, layout):
    """(N, C, H, W) -> a C-contiguous array in ``layout`` (free when g is laid out so already)."""
    return nhwc(g) if layout == "nhwc" else np.ascontiguousarray(g.transpose(2, 3, 0, 1))


def conv2d(x, w, b=None, stride=1, padding=0):
    """x (N, C, H, W), w (O, C, kh, kw), b (O,) -> (N, O, Ho, Wo)."""
    op = Conv2d(stride, padding)
    return op(x, w) if b is None else op(x, w, b)

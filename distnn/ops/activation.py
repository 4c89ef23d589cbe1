"""Element-wise activations and softmax. Each keeps the dtype and memory layout of its input."""
from __future__ import annotations

import math

import numpy as np

from .. import kernels
from ..autograd import Operator


def _c(value, like):
    return np.asarray(value, like.dtype)


class ReLU(Operator):
    def forward(self, x):
        y = np.maximum(x, 0)
        self.y = y
        return y

    def backward(self, gy):
        return relu_grad(gy, self.y)


class AddReLU(Operator):
    """max(a + b, 0): a residual connection and the ReLU after it, in one pass each way. The result
    has a's memory layout (the residual branch's), so that a chain of blocks keeps one layout."""

    def forward(self, a, b):
        if a.shape != b.shape:
            raise ValueError(f"add_relu: shapes {a.shape} and {b.shape} differ")
        y = np.empty_like(a)
        fused = kernels.compiled()
        if fused is not None and kernels.dense_flat(a, y) is not None:
            if b.strides != a.strides or b.dtype != a.dtype:   # the shortcut in another layout: into a's
                b = _copy_like(a, b)
            fused.add_relu(*kernels.dense_flat(a, b, y))
        else:
            np.add(a, b, out=y)
            np.maximum(y, 0, out=y)
        self.y = y
        return y

    def backward(self, gy):
        g = relu_grad(gy, self.y)
        return g, g


def _copy_like(like, x):
    """x's values in like's memory layout."""
    out = np.empty_like(like)
    np.copyto(out, x)
    return out


def relu_grad(gy, y):
    """gy where y > 0, else 0 (the gradient through a ReLU whose output was y). The kernel returns it
    in y's memory layout (gy arriving in another, from a strided convolution or a sum of two paths,
    is copied once here rather than in every operator before), numpy in gy's."""
    fused = kernels.compiled()
    if fused is None or kernels.dense_flat(y) is None:
        return gy * (y > 0)
    if gy.strides != y.strides:
        gy = _copy_like(y, gy)
    g = np.empty_like(y)
    fused.relu_grad(*kernels.dense_flat(gy, y, g))
    return g


class LeakyReLU(Operator):
    def __init__(self, slope=0.01):
        self.slope = slope

    def forward(self, x):
        self.pos = x > 0
        return np.where(self.pos, x, x * _c(self.slope, x))

    def backward(self, gy):
        return np.where(self.pos, gy, gy * _c(self.slope, gy))


class ELU(Operator):
    """x for x > 0, alpha (e^x - 1) otherwise."""

    def __init__(self, alpha=1.0):
        self.alpha = alpha

    def forward(self, x):
        self.pos = x > 0
        self.neg = _c(self.alpha, x) * np.expm1(np.minimum(x, 0))
        return np.where(self.pos, x, self.neg)

    def backward(self, gy):
        return np.where(self.pos, gy, gy * (self.neg + _c(self.alpha, gy)))


class SELU(Operator):
    """scale * ELU(x, alpha) with the self-normalising constants of Klambauer et al. (2017)."""

    alpha = 1.6732632423543772
    scale = 1.0507009873554805

    def forward(self, x):
        self.pos = x > 0
        self.neg = _c(self.scale * self.alpha, x) * np.expm1(np.minimum(x, 0))
        return np.where(self.pos, x * _c(self.scale, x), self.neg)

    def backward(self, gy):
        return np.where(self.pos, gy * _c(self.scale, gy), gy * (self.neg + _c(self.scale * self.alpha, gy)))


class PReLU(Operator):
    """max(x, 0) + a * min(x, 0) with a learned slope a: (1,) shared, or (C,) per channel (axis 1)."""

    def forward(self, x, a):
        if a.size not in (1, x.shape[1] if x.ndim > 1 else 1):
            raise ValueError(f"prelu: slope has {a.size} values; expected 1 or the {x.shape[1]} channels")
        self.shape = (1, -1) + (1,) * (x.ndim - 2) if x.ndim > 1 else (-1,)
        self.a_shape = a.shape
        self.x, self.a = x, a.reshape(self.shape)
        return np.where(x > 0, x, x * self.a)

    def backward(self, gy):
        x = self.x
        pos = x > 0
        gx = np.where(pos, gy, gy * self.a)
        ga = None
        if self.needs_grad[1]:
            contrib = np.where(pos, 0, gy * x)
            axes = tuple(i for i in range(x.ndim) if not (i == 1 and self.a.size > 1))
            ga = contrib.sum(axis=axes).reshape(self.a_shape)
        return gx, ga


class Sigmoid(Operator):
    def forward(self, x):
        # tanh form: stable for large |x| and one transcendental call
        y = np.tanh(x * _c(0.5, x))
        y += 1
        y *= _c(0.5, x)
        self.y = y
        return y

    def backward(self, gy):
        return gy * self.y * (1 - self.y)


class Tanh(Operator):
    def forward(self, x):
        self.y = np.tanh(x)
        return self.y

    def backward(self, gy):
        return gy * (1 - self.y * self.y)


class Softplus(Operator):
    """log(1 + e^x), computed stably."""

    def forward(self, x):
        self.x = x
        return np.logaddexp(x, _c(0, x))

    def backward(self, gy):
        return gy * sigmoid_array(self.x)


class GELU(Operator):
    """0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))): PyTorch's gelu(approximate='tanh')."""

    k = math.sqrt(2.0 / math.pi)

    def forward(self, x):
        self.x = x
        self.t = np.tanh(_c(self.k, x) * (x + _c(0.044715, x) * x ** 3))
        return _c(0.5, x) * x * (1 + self.t)

    def backward(self, gy):
        x, t = self.x, self.t
        dinner = _c(self.k, x) * (1 + _c(3 * 0.044715, x) * x * x)
        return gy * (_c(0.5, x) * (1 + t) + _c(0.5, x) * x * (1 - t * t) * dinner)


class Softmax(Operator):
    def __init__(self, axis=-1):
        self.axis = axis

    def forward(self, x):
        self.y = softmax_array(x, self.axis)
        return self.y

    def backward(self, gy):
        y = self.y
        return y * (gy - (gy * y).sum(axis=self.axis, keepdims=True))


class LogSoftmax(Operator):
    def __init__(self, axis=-1):
        self.axis = axis

    def forward(self, x):
        self.y = log_softmax_array(x, self.axis)
        return self.y

    def backward(self, gy):
        return gy - np.exp(self.y) * gy.sum(axis=self.axis, keepdims=True)


# -- array helpers shared with the losses ----------------------------------------------------------

def sigmoid_array(x):
    return (np.tanh(x * _c(0.5, x)) + 1) * _c(0.5, x)


def log_softmax_array(x, axis=-1):
    z = x - x.max(axis=axis, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=axis, keepdims=True))


def softmax_array(x, axis=-1):
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    e /= e.sum(axis=axis, keepdims=True)
    return e


# -- functional API ------------------------------------------------------------------------------

def relu(x):
    """max(x, 0) element-wise; any shape."""
    return ReLU()(x)


def add_relu(a, b):
    """max(a + b, 0) element-wise for a and b of one shape (a residual add and its ReLU, fused)."""
    return AddReLU()(a, b)


def leaky_relu(x, slope=0.01):
    """x where x > 0, else slope * x; any shape."""
    return LeakyReLU(slope)(x)


def elu(x, alpha=1.0):
    """x where x > 0, else alpha * (e^x - 1); any shape."""
    return ELU(alpha)(x)


def selu(x):
    """scale * elu(x, alpha) with the self-normalising constants of Klambauer et al. (2017); any shape."""
    return SELU()(x)


def prelu(x, a):
    """x where x > 0, else a * x, with a learned slope per channel: x (N, C, ...), a (C,)."""
    return PReLU()(x, a)


def sigmoid(x):
    """1 / (1 + e^-x) element-wise; any shape."""
    return Sigmoid()(x)


def tanh(x):
    """tanh(x) element-wise; any shape."""
    return Tanh()(x)


def softplus(x):
    """log(1 + e^x) element-wise, computed without overflow; any shape."""
    return Softplus()(x)


def gelu(x):
    """x * Phi(x) (the tanh approximation, as PyTorch's approximate='tanh'); any shape."""
    return GELU()(x)


def softmax(x, axis=-1):
    """e^x / sum(e^x) along ``axis``; any shape."""
    return Softmax(axis)(x)


def log_softmax(x, axis=-1):
    """x - log(sum(e^x)) along ``axis``, computed stably; any shape."""
    return LogSoftmax(axis)(x)

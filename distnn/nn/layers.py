"""Layers built from the operators. Parameter shapes follow PyTorch (Linear (out, in),
Conv2d (out, in, kh, kw)) so that weights can be exchanged with PyTorch state dicts."""
from __future__ import annotations

import numpy as np

from .. import init, ops
from ..autograd import Variable, as_variable, config
from .module import Module, Parameter


def _rng(rng):
    return rng if rng is not None else init.default_rng()


def check_input(layer: Module, x, ndim: int, what: str, dim: int | None = None, size: int | None = None):
    """Raise a ValueError naming the layer when x is not ``ndim``-dimensional with ``size`` at ``dim``
    or does not have the layer's dtype. Returns x as a Variable."""
    x = as_variable(x)
    bad_shape = x.ndim != ndim or (dim is not None and x.shape[dim] != size)
    if bad_shape:
        raise ValueError(f"{layer.describe()}: expected input {what}, got shape {x.shape}")
    params = layer.parameters()
    if params and x.dtype != params[0].dtype:
        raise ValueError(f"{layer.describe()}: expected {params[0].dtype} input, got {x.dtype}"
                         " (convert the input; distnn does not cast silently)")
    return x


class Linear(Module):
    """y = x W^T + b. x (N, in) -> (N, out); W (out, in), b (out,)."""

    def __init__(self, in_features, out_features, bias=True, init_fn="lecun_uniform", rng=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = Parameter(init.get(init_fn)((out_features, in_features), _rng(rng)))
        self.bias = Parameter(init.zeros(out_features)) if bias else None

    def forward(self, x):
        x = check_input(self, x, 2, f"(N, {self.in_features})", 1, self.in_features)
        return ops.linear(x, self.weight, self.bias)

    def extra_repr(self):
        return f"{self.in_features}, {self.out_features}"


class Conv2d(Module):
    """x (N, C_in, H, W) -> (N, C_out, Ho, Wo); W (C_out, C_in, kh, kw), b (C_out,)."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, bias=True,
                 init_fn="lecun_uniform", rng=None):
        super().__init__()
        kh, kw = (kernel_size, kernel_size) if isinstance(kernel_size, int) else tuple(kernel_size)
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride, self.padding = (kh, kw), stride, padding
        ops.conv.conv_padding(padding, (kh, kw), ops.conv.pair(stride, "stride"))  # validate early
        self.weight = Parameter(init.get(init_fn)((out_channels, in_channels, kh, kw), _rng(rng)))
        self.bias = Parameter(init.zeros(out_channels)) if bias else None

    def forward(self, x):
        x = check_input(self, x, 4, f"(N, {self.in_channels}, H, W)", 1, self.in_channels)
        return ops.conv2d(x, self.weight, self.bias, self.stride, self.padding)

    def extra_repr(self):
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding!r}")


class MaxPool2d(Module):
    """Max over kernel_size windows moved by ``stride`` (default: the kernel size): (N, C, H, W) -> (N, C, Ho, Wo)."""

    def __init__(self, kernel_size, stride=None):
        super().__init__()
        self.kernel_size, self.stride = kernel_size, stride

    takes_relu = True

    def forward(self, x, relu=False):
        """``relu``: pool the ReLU of x (a ReLU layer before this one in a Sequential asks for it)."""
        return ops.max_pool2d(check_input(self, x, 4, "(N, C, H, W)"), self.kernel_size, self.stride, relu)

    def extra_repr(self):
        return f"kernel_size={self.kernel_size}, stride={self.stride}"


class AvgPool2d(MaxPool2d):
    """Mean over kernel_size windows moved by ``stride`` (default: the kernel size): (N, C, H, W) -> (N, C, Ho, Wo)."""

    takes_relu = False   # a mean does not commute with the ReLU

    def forward(self, x):
        return ops.avg_pool2d(check_input(self, x, 4, "(N, C, H, W)"), self.kernel_size, self.stride)


class GlobalAvgPool2d(Module):
    """The mean of each channel over the image: (N, C, H, W) -> (N, C)."""

    def forward(self, x):
        return ops.mean(check_input(self, x, 4, "(N, C, H, W)"), axis=(2, 3))


class _BatchNorm(Module):
    ndim = 2
    shape_text = "(N, C)"

    def __init__(self, num_features, momentum=0.1, eps=1e-5):
        super().__init__()
        self.num_features, self.momentum, self.eps = num_features, momentum, eps
        self.weight = Parameter(init.ones(num_features))
        self.bias = Parameter(init.zeros(num_features))
        self.register_buffer("running_mean", np.zeros(num_features, np.float32))
        self.register_buffer("running_var", np.ones(num_features, np.float32))

    fuses_relu = True

    def forward(self, x, relu=False):
        """``relu``: max(., 0) of the result, in the same pass (a ReLU layer after this one in a
        Sequential, or a model's own forward, asks for it)."""
        x = check_input(self, x, self.ndim, self.shape_text.replace("C", str(self.num_features)), 1,
                        self.num_features)
        return ops.batch_norm(x, self.weight, self.bias, self.running_mean, self.running_var,
                              config.train, self.momentum, self.eps, relu)

    def extra_repr(self):
        return f"{self.num_features}"


class BatchNorm1d(_BatchNorm):
    """Normalises (N, C) over the batch."""


class BatchNorm2d(_BatchNorm):
    """Normalises (N, C, H, W) per channel over N, H and W."""

    ndim = 4
    shape_text = "(N, C, H, W)"


class Dropout(Module):
    """Inverted dropout with probability p, drawing masks from its own Generator (``reseed``)."""

    def __init__(self, p=0.5, rng=None):
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"Dropout: p must be in [0, 1), got {p}")
        self.p, self.rng = p, _rng(rng)

    def forward(self, x):
        return ops.dropout(x, self.p, self.rng)

    def extra_repr(self):
        return f"p={self.p}"


class Flatten(Module):
    """(N, ...) -> (N, prod(...)) in the logical (N, C, H, W) order, as PyTorch flattens."""

    def forward(self, x):
        return ops.flatten(x)


class Reshape(Module):
    """(N, ...) -> (N, *shape)."""

    def __init__(self, *shape):
        super().__init__()
        self.shape = tuple(shape[0]) if len(shape) == 1 and isinstance(shape[0], (list, tuple)) else shape

    def forward(self, x):
        x = as_variable(x)
        if int(np.prod(x.shape[1:])) != int(np.prod(self.shape)):
            raise ValueError(f"{self.describe()}: cannot reshape {x.shape} to (N, {', '.join(map(str, self.shape))})")
        return ops.reshape(x, (x.shape[0],) + self.shape)


class Embedding(Module):
    """ids (...) integer -> (..., dim); W (num_embeddings, dim) ~ N(0, 1) as in PyTorch."""

    def __init__(self, num_embeddings, embedding_dim, rng=None):
        super().__init__()
        self.weight = Parameter(_rng(rng).standard_normal((num_embeddings, embedding_dim)).astype(np.float32))

    def forward(self, ids):
        return ops.embedding(ids.data if isinstance(ids, Variable) else np.asarray(ids), self.weight)


def _activation(name, fn, doc, **attrs):
    def forward(self, x):
        return fn(x, **self.kwargs)

    def __init__(self, **kwargs):
        Module.__init__(self)
        self.kwargs = kwargs

    return type(name, (Module,), {"__init__": __init__, "forward": forward, "__doc__": doc,
                                  "extra_repr": lambda self: ", ".join(f"{k}={v}" for k, v in self.kwargs.items()),
                                  **attrs})


ReLU = _activation("ReLU", ops.relu, "max(x, 0)", is_relu=True)
LeakyReLU = _activation("LeakyReLU", ops.leaky_relu, "x if x > 0 else slope x (slope=0.01)")
ELU = _activation("ELU", ops.elu, "x if x > 0 else alpha (e^x - 1) (alpha=1)")
SELU = _activation("SELU", ops.selu, "scaled ELU with the self-normalising constants")
Sigmoid = _activation("Sigmoid", ops.sigmoid, "1 / (1 + e^-x)")
Tanh = _activation("Tanh", ops.tanh, "tanh(x)")
Softplus = _activation("Softplus", ops.softplus, "log(1 + e^x)")
GELU = _activation("GELU", ops.gelu, "Gaussian error linear unit, tanh approximation")
Softmax = _activation("Softmax", ops.softmax, "softmax along axis (default -1)")
LogSoftmax = _activation("LogSoftmax", ops.log_softmax, "log softmax along axis (default -1)")


class PReLU(Module):
    """max(x, 0) + a min(x, 0) with learned slope(s) a: one shared, or one per channel (axis 1)."""

    def __init__(self, num_parameters=1, init_value=0.25):
        super().__init__()
        self.weight = Parameter(np.full(num_parameters, init_value, np.float32))

    def forward(self, x):
        return ops.prelu(x, self.weight)

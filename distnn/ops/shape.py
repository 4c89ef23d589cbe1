"""Shape operators: reshape, transpose, reductions, joins and splits, indexing, embedding lookup.
Each backward puts the gradient back into its input's shape."""
from __future__ import annotations

import numpy as np

from ..autograd import Operator, Variable, as_variable
from .layout import empty_in_order, memory_order, zeros_in_order


class Reshape(Operator):
    def __init__(self, shape):
        self.shape = tuple(shape)

    def forward(self, x):
        self.x_shape = x.shape
        return x.reshape(self.shape)

    def backward(self, gy):
        return gy.reshape(self.x_shape)


class Transpose(Operator):
    def __init__(self, axes=None):
        self.axes = None if axes is None else tuple(axes)

    def forward(self, x):
        self.ndim = x.ndim
        return np.transpose(x, self.axes)

    def backward(self, gy):
        if self.axes is None:
            return np.transpose(gy)
        return np.transpose(gy, np.argsort(self.axes))


class Sum(Operator):
    def __init__(self, axis=None, keepdims=False):
        self.axis, self.keepdims = axis, keepdims

    def forward(self, x):
        self.x_shape = x.shape
        return np.asarray(x.sum(axis=self.axis, keepdims=self.keepdims))

    def backward(self, gy):
        if not self.keepdims and self.axis is not None:
            gy = np.expand_dims(gy, self.axis)
        return np.broadcast_to(gy, self.x_shape)


class Mean(Operator):
    def __init__(self, axis=None, keepdims=False):
        self.axis, self.keepdims = axis, keepdims

    def forward(self, x):
        self.x_shape = x.shape
        y = np.asarray(x.mean(axis=self.axis, keepdims=self.keepdims))
        self.count = x.size // max(y.size, 1)
        return y

    def backward(self, gy):
        if not self.keepdims and self.axis is not None:
            gy = np.expand_dims(gy, self.axis)
        return np.broadcast_to(gy / np.asarray(self.count, gy.dtype), self.x_shape)


class Concat(Operator):
    """Arrays of one shape but along ``axis`` -> one array, laid out in memory as the largest of them
    (images that are channels-last stay so)."""

    def __init__(self, axis=0):
        self.axis = axis

    def forward(self, *xs):
        sizes = [x.shape[self.axis] for x in xs]
        self.splits = np.cumsum(sizes)[:-1]
        largest = max(xs, key=lambda x: x.size)
        shape = list(largest.shape)
        shape[self.axis] = int(np.sum(sizes))
        out = empty_in_order(shape, np.result_type(*xs), memory_order(largest))
        return np.concatenate(xs, axis=self.axis, out=out)

    def backward(self, gy):
        return tuple(np.split(gy, self.splits, axis=self.axis))


class Stack(Operator):
    """k arrays of one shape -> one array with a new axis of length k."""

    def __init__(self, axis=0):
        self.axis = axis

    def forward(self, *xs):
        return np.stack(xs, axis=self.axis)

    def backward(self, gy):
        return tuple(np.moveaxis(gy, self.axis, 0))


class Unstack(Operator):
    """One array -> the tuple of its slices along ``axis`` (views; the inverse of Stack)."""

    def __init__(self, axis=0):
        self.axis = axis

    def forward(self, x):
        return tuple(np.moveaxis(x, self.axis, 0))

    def backward(self, *gys):
        return np.stack(gys, axis=self.axis)


def _is_basic_index(index):
    items = index if isinstance(index, tuple) else (index,)
    return all(i is None or i is Ellipsis or isinstance(i, (slice, int, np.integer)) for i in items)


class GetItem(Operator):
    """x[index] for basic and advanced numpy indices; repeated indices accumulate in backward."""

    def __init__(self, index):
        self.index = index

    def forward(self, x):
        self.x_shape, self.x_dtype, self.x_order = x.shape, x.dtype, memory_order(x)
        return x[self.index]

    def backward(self, gy):
        gx = zeros_in_order(self.x_shape, self.x_dtype, self.x_order)   # in x's memory order
        if _is_basic_index(self.index):
            gx[self.index] += gy
        else:
            np.add.at(gx, self.index, gy)
        return gx


class Embedding(Operator):
    """Rows of a table: ids (...) integer, W (V, D) -> (..., D). The ids get no gradient."""

    def forward(self, ids, w):
        if not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"embedding: ids must be integers, got dtype {ids.dtype}")
        if ids.size and (ids.min() < 0 or ids.max() >= w.shape[0]):
            raise ValueError(f"embedding: ids must lie in [0, {w.shape[0]}), got [{ids.min()}, {ids.max()}]")
        self.ids, self.w_shape, self.w_dtype = ids, w.shape, w.dtype
        return w[ids]

    def backward(self, gy):
        gw = np.zeros(self.w_shape, self.w_dtype)
        np.add.at(gw, self.ids.reshape(-1), gy.reshape(-1, self.w_shape[1]))
        return None, gw


# -- functional API ------------------------------------------------------------------------------

def reshape(x, *shape):
    """x with a new shape of the same size (one axis may be -1); ``reshape(x, 2, 3)`` or ``reshape(x, (2, 3))``."""
    if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
        shape = shape[0]
    return Reshape(shape)(x)


def flatten(x):
    """(N, ...) -> (N, prod(...)) in C order of the logical shape."""
    x = as_variable(x)
    return Reshape((x.shape[0], -1))(x)


def transpose(x, *axes):
    """x with its axes permuted (reversed when none are given), as ``numpy.transpose``."""
    if len(axes) == 1 and isinstance(axes[0], (tuple, list)):
        axes = axes[0]
    return Transpose(axes or None)(x)


def sum(x, axis=None, keepdims=False):
    """Sum over ``axis`` (an int, a tuple, or None for all)."""
    return Sum(axis, keepdims)(x)


def mean(x, axis=None, keepdims=False):
    """Mean over ``axis`` (an int, a tuple, or None for all)."""
    return Mean(axis, keepdims)(x)


def concat(xs, axis=0):
    """Join arrays along an existing axis: shapes equal except along ``axis``."""
    return Concat(axis)(*xs)


def stack(xs, axis=0):
    """k arrays of one shape S -> one array with a new axis of length k at ``axis``."""
    return Stack(axis)(*xs)


def unstack(x, axis=0):
    """The tuple of x's slices along ``axis`` (the inverse of ``stack``)."""
    return Unstack(axis)(x)


def getitem(x, index):
    """x[index] with numpy's basic or advanced indexing; repeated indices accumulate gradients."""
    if isinstance(index, Variable):
        index = index.data
    return GetItem(index)(x)


def embedding(ids, w):
    """Rows of the table W (V, D) picked by integer ``ids`` (...) -> (..., D)."""
    return Embedding()(ids, w)

"""Batch normalisation and inverted dropout."""
from __future__ import annotations

import numpy as np

from .. import kernels
from ..autograd import Operator, as_variable, config
from .basic import add_row_vector, column_sums
from .layout import channel_rows, channels_last_order, from_channel_rows


def _as_rows(x, order=None):
    """(N, C) or (N, C, H, W) -> (M, C) rows, how to undo it, and the axis order of the rows (for
    images the order x is laid out in, so that the rows are a view; ``order`` forces one)."""
    if x.ndim == 2:
        return x, lambda r: r, None
    if x.ndim == 4:
        order = channels_last_order(x) if order is None else order
        return channel_rows(x, order), lambda r: from_channel_rows(r, order, x.shape), order
    raise ValueError(f"batch_norm: input must be (N, C) or (N, C, H, W), got {x.shape}")


class BatchNorm(Operator):
    """y = gamma (x - mean) / sqrt(var + eps) + beta over all axes but the channel axis 1, followed by
    max(y, 0) when ``relu`` (the pair a network has after most convolutions, in one pass).

    x (N, C) or (N, C, H, W); gamma, beta (C,). In training the batch statistics are used and the
    running statistics (plain arrays, updated in place) move towards them by ``momentum``; the
    running variance is the unbiased one, as in PyTorch. In evaluation the running statistics are
    used and nothing is updated. The numpy code here is the reference; ``kernels.fused`` does the
    same in two passes each way, the statistics in one (``DISTNN_KERNELS``).
    """

    def __init__(self, running_mean, running_var, training, momentum=0.1, eps=1e-5, relu=False):
        self.running_mean, self.running_var = running_mean, running_var
        self.training, self.momentum, self.eps, self.relu = training, momentum, eps, relu

    def forward(self, x, gamma, beta):
        rows, back, self.order = _as_rows(x)
        m = rows.shape[0]
        fused = kernels.compiled()
        if self.training:
            if m < 2:
                raise ValueError(f"batch_norm: training needs more than one value per channel, got input {x.shape}")
            if fused is not None:
                mean, var = (a.astype(x.dtype) for a in fused.batch_stats(np.ascontiguousarray(rows)))
            else:
                mean = column_sums(rows) / m
                centered = rows - mean
                var = np.einsum("ij,ij->j", centered, centered) / m
            mom = self.momentum
            self.running_mean *= 1 - mom
            self.running_mean += mom * mean.astype(self.running_mean.dtype, copy=False)
            self.running_var *= 1 - mom
            self.running_var += (mom * m / (m - 1)) * var.astype(self.running_var.dtype, copy=False)
        else:
            mean = self.running_mean.astype(x.dtype, copy=False)
            var = self.running_var.astype(x.dtype, copy=False)
        invstd = 1.0 / np.sqrt(var + np.asarray(self.eps, x.dtype))
        scale = gamma * invstd
        if fused is not None:
            rows = np.ascontiguousarray(rows)
            y = np.empty_like(rows)
            self.shift = beta - mean * scale
            fused.scale_shift(rows, scale, self.shift, self.relu, y)
            # x itself: the kernel's backward recomputes x - mean and the ReLU's mask from it
            self.rows = rows
            self.y = None
        else:
            # xhat = centered * invstd is never stored: y and the gradients fold invstd into per-channel
            # factors, which saves a pass over the activations each way.
            self.centered = centered if self.training else rows - mean
            y = np.multiply(self.centered, scale)
            add_row_vector(y, beta)
            if self.relu:
                np.maximum(y, 0, out=y)
            self.y = y if self.relu else None
        self.mean, self.invstd, self.scale, self.back, self.fused = mean, invstd, scale, back, fused
        self.running_mean = self.running_var = None
        return back(y)

    def backward(self, gy):
        g, _, _ = _as_rows(gy, self.order)  # rows in the forward's order
        if self.fused is not None:
            gx = np.empty_like(self.rows)
            ggamma, gbeta = self.fused.batch_norm_backward(np.ascontiguousarray(g), self.rows, self.mean,
                                                           self.invstd, self.scale, self.shift, self.relu,
                                                           self.training, gx)
            return self.back(gx), ggamma.astype(gx.dtype), gbeta.astype(gx.dtype)
        if self.relu:
            g = g * (self.y > 0)
        centered, invstd, scale = self.centered, self.invstd, self.scale
        gbeta = column_sums(g)
        ggamma = np.einsum("ij,ij->j", g, centered) * invstd
        if self.training:
            # gx = scale * (g - gbeta / m - xhat * ggamma / m), with xhat = centered * invstd
            m = g.shape[0]
            gx = np.multiply(centered, -scale * invstd * ggamma / m)
            gx -= scale * gbeta / m
            gx += g * scale
        else:
            gx = g * scale
        return self.back(gx), ggamma, gbeta


class Dropout(Operator):
    """y = x * mask, the mask already holding 0 or 1 / (1 - p) (inverted dropout)."""

    def forward(self, x, mask):
        self.mask = mask
        return x * mask

    def backward(self, gy):
        return gy * self.mask, None


def batch_norm(x, gamma, beta, running_mean, running_var, training=None, momentum=0.1, eps=1e-5, relu=False):
    """(x - mean) / sqrt(var + eps) * gamma + beta per channel: x (N, C) or (N, C, H, W); gamma, beta,
    running_mean, running_var (C,). Training uses the batch's statistics and updates the running ones
    (momentum as in PyTorch); evaluation uses the running ones. ``relu``: then max(., 0), fused."""
    training = config.train if training is None else training
    return BatchNorm(running_mean, running_var, training, momentum, eps, relu)(x, gamma, beta)


def dropout_mask(shape, p, rng: np.random.Generator, dtype=np.float32) -> np.ndarray:
    """A keep mask of ``shape``: Bernoulli(1 - p) entries scaled by 1 / (1 - p)."""
    keep = rng.random(shape, dtype=np.float32) >= p
    return keep.astype(dtype) * np.asarray(1.0 / (1.0 - p), dtype)


def dropout(x, p, rng: np.random.Generator, training=None, mask=None):
    """Inverted dropout: identity in evaluation, x * mask in training (mask: ``dropout_mask``, of x's
    shape, drawn from ``rng`` unless given)."""
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout probability must be in [0, 1), got {p}")
    training = config.train if training is None else training
    x = as_variable(x)
    if not training or p == 0.0:
        return x
    if mask is None:
        mask = dropout_mask(x.shape, p, rng, x.dtype)
    return Dropout()(x, mask)

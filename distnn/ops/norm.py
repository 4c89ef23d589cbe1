"""Batch normalisation and inverted dropout."""
from __future__ import annotations

import numpy as np

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
    """y = gamma (x - mean) / sqrt(var + eps) + beta over all axes but the channel axis 1.

    x (N, C) or (N, C, H, W); gamma, beta (C,). In training the batch statistics are used and the
    running statistics (plain arrays, updated in place) move towards them by ``momentum``; the
    running variance is the unbiased one, as in PyTorch. In evaluation the running statistics are
    used and nothing is updated.
    """

    def __init__(self, running_mean, running_var, training, momentum=0.1, eps=1e-5):
        self.running_mean, self.running_var = running_mean, running_var
        self.training, self.momentum, self.eps = training, momentum, eps

    def forward(self, x, gamma, beta):
        rows, back, self.order = _as_rows(x)
        m = rows.shape[0]
        if self.training:
            if m < 2:
                raise ValueError(f"batch_norm: training needs more than one value per channel, got input {x.shape}")
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
            centered = rows - mean
        invstd = 1.0 / np.sqrt(var + np.asarray(self.eps, x.dtype))
        # xhat = centered * invstd is never stored: y and the gradients fold invstd into per-channel
        # factors, which saves a pass over the activations each way.
        y = np.multiply(centered, gamma * invstd)
        add_row_vector(y, beta)
        self.centered, self.invstd, self.gamma, self.back = centered, invstd, gamma, back
        self.running_mean = self.running_var = None
        return back(y)

    def backward(self, gy):
        g, _, _ = _as_rows(gy, self.order)  # rows in the forward's order
        centered, invstd = self.centered, self.invstd
        gbeta = column_sums(g)
        ggamma = np.einsum("ij,ij->j", g, centered) * invstd
        scale = self.gamma * invstd
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


def batch_norm(x, gamma, beta, running_mean, running_var, training=None, momentum=0.1, eps=1e-5):
    """(x - mean) / sqrt(var + eps) * gamma + beta per channel: x (N, C) or (N, C, H, W); gamma, beta,
    running_mean, running_var (C,). Training uses the batch's statistics and updates the running ones
    (momentum as in PyTorch); evaluation uses the running ones."""
    training = config.train if training is None else training
    return BatchNorm(running_mean, running_var, training, momentum, eps)(x, gamma, beta)


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

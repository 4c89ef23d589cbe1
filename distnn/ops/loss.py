"""Losses, each the mean over the batch, returning a scalar Variable."""
from __future__ import annotations

import numpy as np

from ..autograd import Operator
from .activation import log_softmax_array, sigmoid_array


class SoftmaxCrossEntropy(Operator):
    """Cross-entropy of softmax(logits) against integer labels, from the logits.

    logits (N, K), labels (N,) in [0, K). With label smoothing s the target is
    (1 - s) onehot + s / K. loss = -1/N sum_n sum_k target_nk log_softmax(logits)_nk; finite for any
    finite logits (the max is subtracted before exp).
    """

    def __init__(self, label_smoothing=0.0):
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        self.smoothing = label_smoothing

    def forward(self, logits, labels):
        if logits.ndim != 2:
            raise ValueError(f"softmax_cross_entropy: logits must be (N, K), got {logits.shape}")
        n, k = logits.shape
        labels = np.asarray(labels)
        if labels.shape != (n,) or not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(f"softmax_cross_entropy: labels must be {n} integers, got {labels.dtype} {labels.shape}")
        if n and (labels.min() < 0 or labels.max() >= k):
            raise ValueError(f"softmax_cross_entropy: labels must lie in [0, {k}), got [{labels.min()}, {labels.max()}]")
        logp = log_softmax_array(logits, axis=1)
        rows = np.arange(n)
        s = self.smoothing
        nll = -logp[rows, labels]
        if s:
            nll = (1 - s) * nll - s * logp.mean(axis=1)
        self.logp, self.labels = logp, labels
        return np.asarray(nll.mean(), logits.dtype)

    def backward(self, gy):
        n, k = self.logp.shape
        g = np.exp(self.logp)
        s = self.smoothing
        g[np.arange(n), self.labels] -= 1 - s
        if s:
            g -= s / k
        g *= gy / n
        return g, None


class MSE(Operator):
    """mean((x - t)^2) over all elements."""

    def forward(self, x, t):
        if x.shape != t.shape:
            raise ValueError(f"mse: prediction {x.shape} and target {t.shape} differ in shape")
        self.d = x - t
        return np.asarray((self.d * self.d).mean(), x.dtype)

    def backward(self, gy):
        g = self.d * (2 * gy / self.d.size)
        return g, -g


class BCEWithLogits(Operator):
    """Binary cross-entropy of sigmoid(x) against targets t in [0, 1], from the logits x, stably:
    mean(max(x, 0) - x t + log(1 + e^-|x|))."""

    def forward(self, x, t):
        if x.shape != t.shape:
            raise ValueError(f"bce_with_logits: logits {x.shape} and targets {t.shape} differ in shape")
        self.x, self.t = x, t
        loss = np.maximum(x, 0) - x * t + np.log1p(np.exp(-np.abs(x)))
        return np.asarray(loss.mean(), x.dtype)

    def backward(self, gy):
        g = (sigmoid_array(self.x) - self.t) * (gy / self.x.size)
        gt = -self.x * (gy / self.x.size) if self.needs_grad[1] else None
        return g, gt


def softmax_cross_entropy(logits, labels, label_smoothing=0.0):
    """Mean cross-entropy of logits (N, K) against integer labels (N,), from the log-softmax (stable);
    ``label_smoothing`` mixes the one-hot target with the uniform one. Returns a scalar."""
    return SoftmaxCrossEntropy(label_smoothing)(logits, labels)


def mse(x, t):
    """Mean of (x - t)^2 over all elements; x and t of one shape. Returns a scalar."""
    return MSE()(x, t)


def bce_with_logits(x, t):
    """Mean binary cross-entropy of logits x against targets t in [0, 1], computed stably; x and t
    of one shape. Returns a scalar."""
    return BCEWithLogits()(x, t)

"""Optimizers on flat vectors (the learning-rate schedules are in ``distnn.schedules``, re-exported here).

An optimizer updates a flat parameter vector in place from a flat gradient vector of the same size:
``opt.step(params, grads, lr=None)``. Its state is a dict of flat arrays and a step count
(``state_dict`` / ``load_state_dict``), so a checkpoint restores it exactly, and a parameter-server
shard can own the optimizer of one contiguous slice (``part``: the same optimizer over a chunk of it,
which a shard updates chunk by chunk as a link brings them). Every update is a handful of element-wise
numpy expressions over the whole vector: SGD, momentum, Nesterov, Adam and AdamW work in place in
preallocated scratch space; AdaGrad, RMSProp and AdaDelta allocate temporaries for some terms. Adam's
expressions also run as one compiled pass (``kernels.fused.adam_update``, equal bit for bit).

Weight decay: ``weight_decay`` is L2 (added to the gradient; for AdamW it is decoupled, applied to the
parameters directly). ``decay_mask`` (1 for weights, 0 for biases and normalisation parameters; see
``Module.decay_mask``) selects where it applies; without a mask it applies everywhere.
"""
from __future__ import annotations

import copy
import inspect
import math

import numpy as np

from . import kernels
from .schedules import SCHEDULES, constant, cosine, exponential, make_schedule, step_decay, warmup  # noqa: F401


class Optimizer:
    hyper = ("lr", "weight_decay")
    slots: tuple = ()

    def __init__(self, size: int, lr: float, weight_decay: float = 0.0, decay_mask=None, dtype=np.float32):
        if lr < 0 or not math.isfinite(lr):
            raise ValueError(f"{type(self).__name__}: lr must be a finite number >= 0, got {lr}")
        if weight_decay < 0:
            raise ValueError(f"{type(self).__name__}: weight_decay must be >= 0, got {weight_decay}")
        self.size, self.lr, self.weight_decay, self.dtype = size, lr, weight_decay, np.dtype(dtype)
        if decay_mask is not None and np.shape(decay_mask) != (size,):
            raise ValueError(f"decay_mask must have {size} values, got {np.shape(decay_mask)}")
        self.decay_mask = None if decay_mask is None else np.asarray(decay_mask, self.dtype)
        self.state = {name: np.zeros(size, self.dtype) for name in self.slots}
        self.t = 0
        self._tmp = np.empty(size, self.dtype)   # L2-decayed gradient
        self._step = np.empty(size, self.dtype)  # the update

    def _l2(self, params, grads):
        """grads + weight_decay * mask * params, into scratch space (the caller's grads stay intact)."""
        if not self.weight_decay:
            return grads
        g = np.multiply(params, self.weight_decay, out=self._tmp)
        if self.decay_mask is not None:
            g *= self.decay_mask
        g += grads
        return g

    def _divide_by_rms(self, params, g, s, lr):
        """params -= lr g / (sqrt(s) + eps), through the preallocated step buffer."""
        step = np.sqrt(s, out=self._step)
        step += self.eps
        np.divide(g, step, out=step)
        step *= lr
        params -= step

    def step(self, params: np.ndarray, grads: np.ndarray, lr: float | None = None) -> None:
        if params.shape != (self.size,) or grads.shape != (self.size,):
            raise ValueError(f"{type(self).__name__}: expected flat vectors of {self.size}, got "
                             f"{params.shape} and {grads.shape}")
        self.t += 1
        self._update(params, grads, self.lr if lr is None else lr)

    def _update(self, params, grads, lr):
        raise NotImplementedError

    def warm_up(self) -> None:
        """One step of this optimizer's kind on a few scratch values (this one's state untouched), so
        that a compiled kernel it runs is built or loaded now, not inside the first timed step."""
        type(self)(4, dtype=self.dtype).step(np.zeros(4, self.dtype), np.ones(4, self.dtype))

    def part(self, lo: int, hi: int) -> "Optimizer":
        """This optimizer over elements [lo, hi): its slots, scratch space and mask are views of this
        one's, so ``update_part`` of every part in turn is exactly one ``step`` of the whole (every
        update is element-wise)."""
        part = copy.copy(self)
        part.size = hi - lo
        part.state = {k: v[lo:hi] for k, v in self.state.items()}
        part._tmp, part._step = self._tmp[lo:hi], self._step[lo:hi]
        part.decay_mask = None if self.decay_mask is None else self.decay_mask[lo:hi]
        return part

    def update_part(self, params: np.ndarray, grads: np.ndarray, lr: float, t: int) -> None:
        """The update of step count ``t`` on this part's elements (the whole's count is the caller's)."""
        self.t = t
        self._update(params, grads, lr)

    def state_dict(self) -> dict:
        out = {f"slot.{k}": v.copy() for k, v in self.state.items()}
        out["t"] = np.asarray(self.t)
        return out

    def load_state_dict(self, state: dict) -> None:
        for k in self.state:
            value = np.asarray(state[f"slot.{k}"], self.dtype)
            if value.shape != (self.size,):
                raise ValueError(f"optimizer state {k}: expected {self.size} values, got {value.shape}")
            self.state[k][...] = value
        self.t = int(state["t"])


class SGD(Optimizer):
    """p -= lr g; with momentum mu: v = mu v + g, p -= lr v; Nesterov: p -= lr (g + mu v)."""

    slots = ("velocity",)

    def __init__(self, size, lr=0.01, momentum=0.0, nesterov=False, weight_decay=0.0, decay_mask=None,
                 dtype=np.float32):
        if nesterov and not momentum:
            raise ValueError("Nesterov momentum needs momentum > 0")
        self.slots = ("velocity",) if momentum else ()
        super().__init__(size, lr, weight_decay, decay_mask, dtype)
        self.momentum, self.nesterov = momentum, nesterov

    def _update(self, params, grads, lr):
        g = self._l2(params, grads)
        step = self._step
        if self.momentum:
            v = self.state["velocity"]
            v *= self.momentum
            v += g
            if self.nesterov:
                np.multiply(v, self.momentum, out=step)
                step += g
            else:
                step[...] = v
        else:
            step[...] = g
        step *= lr
        params -= step


class Momentum(SGD):
    """SGD with momentum (0.9 unless given)."""

    def __init__(self, size, lr=0.01, momentum=0.9, weight_decay=0.0, decay_mask=None, dtype=np.float32):
        super().__init__(size, lr, momentum, False, weight_decay, decay_mask, dtype)


class Nesterov(SGD):
    """SGD with Nesterov momentum (0.9 unless given)."""

    def __init__(self, size, lr=0.01, momentum=0.9, weight_decay=0.0, decay_mask=None, dtype=np.float32):
        super().__init__(size, lr, momentum, True, weight_decay, decay_mask, dtype)


class AdaGrad(Optimizer):
    """s += g^2; p -= lr g / (sqrt(s) + eps) (Duchi et al., 2011)."""

    slots = ("sum_sq",)

    def __init__(self, size, lr=0.01, eps=1e-10, weight_decay=0.0, decay_mask=None, dtype=np.float32):
        super().__init__(size, lr, weight_decay, decay_mask, dtype)
        self.eps = eps

    def _update(self, params, grads, lr):
        g = self._l2(params, grads)
        s = self.state["sum_sq"]
        s += g * g
        self._divide_by_rms(params, g, s, lr)


class RMSProp(Optimizer):
    """s = rho s + (1 - rho) g^2; p -= lr g / (sqrt(s) + eps) (Tieleman and Hinton, 2012)."""

    slots = ("mean_sq",)

    def __init__(self, size, lr=0.001, rho=0.9, eps=1e-8, weight_decay=0.0, decay_mask=None, dtype=np.float32):
        super().__init__(size, lr, weight_decay, decay_mask, dtype)
        self.rho, self.eps = rho, eps

    def _update(self, params, grads, lr):
        g = self._l2(params, grads)
        s = self.state["mean_sq"]
        s *= self.rho
        s += (1 - self.rho) * (g * g)
        self._divide_by_rms(params, g, s, lr)


class AdaDelta(Optimizer):
    """Zeiler (2012): s = rho s + (1-rho) g^2; d = sqrt(u + eps) / sqrt(s + eps) g;
    u = rho u + (1-rho) d^2; p -= lr d (lr = 1 in the paper)."""

    slots = ("mean_sq", "mean_sq_update")

    def __init__(self, size, lr=1.0, rho=0.9, eps=1e-6, weight_decay=0.0, decay_mask=None, dtype=np.float32):
        super().__init__(size, lr, weight_decay, decay_mask, dtype)
        self.rho, self.eps = rho, eps

    def _update(self, params, grads, lr):
        g = self._l2(params, grads)
        s, u = self.state["mean_sq"], self.state["mean_sq_update"]
        s *= self.rho
        s += (1 - self.rho) * (g * g)
        d = np.sqrt(u + self.eps) / np.sqrt(s + self.eps)
        d *= g
        u *= self.rho
        u += (1 - self.rho) * (d * d)
        d *= lr
        params -= d


class Adam(Optimizer):
    """Kingma and Ba (2015): m = b1 m + (1-b1) g; v = b2 v + (1-b2) g^2;
    p -= lr sqrt(1-b2^t) / (1-b1^t) m / (sqrt(v) + eps'), eps' = eps sqrt(1-b2^t).

    ``decoupled=True`` is AdamW (Loshchilov and Hutter, 2019): p -= lr wd p, outside the moments.
    """

    slots = ("m", "v")
    decoupled = False

    def __init__(self, size, lr=0.001, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, decay_mask=None,
                 dtype=np.float32):
        super().__init__(size, lr, weight_decay, decay_mask, dtype)
        self.b1, self.b2 = betas
        self.eps = eps

    def _update(self, params, grads, lr):
        if self.decoupled and self.weight_decay:
            shrink = np.multiply(params, lr * self.weight_decay, out=self._step)
            if self.decay_mask is not None:
                shrink *= self.decay_mask
            params -= shrink
            g = grads
        else:
            g = self._l2(params, grads)
        m, v, tmp = self.state["m"], self.state["v"], self._step
        bc1, bc2 = 1 - self.b1 ** self.t, 1 - self.b2 ** self.t
        fused = kernels.compiled()
        if fused is not None and params.dtype == g.dtype == m.dtype:   # the lines below in one pass, bit for bit
            c = params.dtype.type
            fused.adam_update(params, g, m, v, c(self.b1), c(1 - self.b1), c(self.b2), c(1 - self.b2),
                              c(self.eps * math.sqrt(bc2)), c(lr * math.sqrt(bc2) / bc1))
            return
        m *= self.b1
        m += np.multiply(g, 1 - self.b1, out=tmp)
        v *= self.b2
        np.multiply(g, g, out=tmp)
        tmp *= 1 - self.b2
        v += tmp
        step = np.sqrt(v, out=tmp)
        step += self.eps * math.sqrt(bc2)
        np.divide(m, step, out=step)
        step *= lr * math.sqrt(bc2) / bc1
        params -= step


class AdamW(Adam):
    decoupled = True

    def __init__(self, size, lr=0.001, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01, decay_mask=None,
                 dtype=np.float32):
        super().__init__(size, lr, betas, eps, weight_decay, decay_mask, dtype)


OPTIMIZERS = {"sgd": SGD, "momentum": Momentum, "nesterov": Nesterov, "adagrad": AdaGrad,
              "rmsprop": RMSProp, "adadelta": AdaDelta, "adam": Adam, "adamw": AdamW}


def hyperparameters(name: str) -> dict:
    """{hyperparameter: default} of an optimizer, as its class declares them (its ``__init__``): the one
    place a hyperparameter is named; the config's ``optimizer_options`` are checked against it."""
    cls = OPTIMIZERS[name.lower()]
    return {p.name: p.default for p in inspect.signature(cls.__init__).parameters.values()
            if p.name not in ("self", "size", "decay_mask", "dtype")}


def make_optimizer(name: str, size: int, **options) -> Optimizer:
    """An optimizer by name (sgd, momentum, nesterov, adagrad, rmsprop, adadelta, adam, adamw)."""
    try:
        cls = OPTIMIZERS[name.lower()]
    except (KeyError, AttributeError):
        raise ValueError(f"unknown optimizer {name!r}; known: {', '.join(OPTIMIZERS)}") from None
    try:
        return cls(size, **options)
    except TypeError as e:
        raise ValueError(f"optimizer {name!r}: {e}") from None


def clip_grad_norm(grads: np.ndarray, max_norm: float) -> float:
    """Scale ``grads`` in place so that its global L2 norm is at most ``max_norm``; returns the norm
    before clipping."""
    norm = float(np.sqrt(np.dot(grads, grads)))
    if norm > max_norm > 0:
        grads *= max_norm / (norm + 1e-6)
    return norm

"""Weight initialisers. Each returns a new float32 array (or ``dtype``) of ``shape`` drawn from ``rng``.

fan_in / fan_out follow PyTorch: for a weight (out, in, *kernel) fan_in = in * prod(kernel) and
fan_out = out * prod(kernel).
"""
from __future__ import annotations

import math
from contextlib import contextmanager

import numpy as np


def fans(shape) -> tuple[int, int]:
    if len(shape) < 2:
        raise ValueError(f"fan-in/fan-out need a weight of 2 or more dimensions, got shape {tuple(shape)}")
    receptive = int(np.prod(shape[2:])) if len(shape) > 2 else 1
    return shape[1] * receptive, shape[0] * receptive


def zeros(shape, rng=None, dtype=np.float32):
    return np.zeros(shape, dtype)


def ones(shape, rng=None, dtype=np.float32):
    return np.ones(shape, dtype)


def constant(value):
    def init(shape, rng=None, dtype=np.float32):
        return np.full(shape, value, dtype)
    return init


def he_normal(shape, rng, dtype=np.float32, gain=math.sqrt(2.0)):
    """N(0, gain^2 / fan_in): He et al. (2015) for ReLU layers."""
    return (rng.standard_normal(shape) * (gain / math.sqrt(fans(shape)[0]))).astype(dtype)


def he_uniform(shape, rng, dtype=np.float32, gain=math.sqrt(2.0)):
    """U(-b, b) with b = gain sqrt(3 / fan_in)."""
    bound = gain * math.sqrt(3.0 / fans(shape)[0])
    return rng.uniform(-bound, bound, shape).astype(dtype)


def lecun_uniform(shape, rng, dtype=np.float32):
    """U(-b, b) with b = 1 / sqrt(fan_in): PyTorch's default for Linear and Conv2d weights
    (kaiming_uniform with a = sqrt(5)); smaller than He by sqrt(6)."""
    return he_uniform(shape, rng, dtype, gain=math.sqrt(1.0 / 3.0))


def glorot_normal(shape, rng, dtype=np.float32, gain=1.0):
    """N(0, 2 gain^2 / (fan_in + fan_out)): Glorot and Bengio (2010)."""
    fan_in, fan_out = fans(shape)
    return (rng.standard_normal(shape) * (gain * math.sqrt(2.0 / (fan_in + fan_out)))).astype(dtype)


def glorot_uniform(shape, rng, dtype=np.float32, gain=1.0):
    """U(-b, b) with b = gain sqrt(6 / (fan_in + fan_out))."""
    fan_in, fan_out = fans(shape)
    bound = gain * math.sqrt(6.0 / (fan_in + fan_out))
    return rng.uniform(-bound, bound, shape).astype(dtype)


def orthogonal(shape, rng, dtype=np.float32, gain=1.0):
    """A (semi-)orthogonal matrix (Saxe et al., 2014) of shape (rows, cols...), via QR of a Gaussian.

    For stacked recurrent weights (4H, H) each H x H gate block is made orthogonal on its own.
    """
    rows, cols = shape[0], int(np.prod(shape[1:]))
    if rows > cols and rows % cols == 0:
        return np.concatenate([orthogonal((cols, cols), rng, dtype, gain) for _ in range(rows // cols)]
                              ).reshape(shape)
    a = rng.standard_normal((max(rows, cols), min(rows, cols)))
    q, r = np.linalg.qr(a)
    q *= np.sign(np.diag(r))
    if rows < cols:
        q = q.T
    return (gain * q[:rows, :cols]).reshape(shape).astype(dtype)


def lstm_bias(hidden_size, forget_bias=1.0, dtype=np.float32):
    """An LSTM bias (4H,) in gate order i, f, g, o: zeros, with the forget gate at ``forget_bias``."""
    b = np.zeros(4 * hidden_size, dtype)
    b[hidden_size:2 * hidden_size] = forget_bias
    return b


INITIALIZERS = {f.__name__: f for f in (zeros, ones, he_normal, he_uniform, lecun_uniform, glorot_normal,
                                        glorot_uniform, orthogonal)}


_SEEDED: list = []


@contextmanager
def seeded(seed):
    """Inside the block, layers built without an ``rng`` draw their initial weights from one
    ``numpy.random.default_rng(seed)`` in the order they are built, so a user's builder function gives
    the same network every time (``models.build_model`` uses it)."""
    _SEEDED.append(np.random.default_rng(seed))
    try:
        yield
    finally:
        _SEEDED.pop()


def default_rng() -> np.random.Generator:
    """The generator of the innermost ``seeded`` block, else a fresh unseeded one."""
    return _SEEDED[-1] if _SEEDED else np.random.default_rng()


def get(name):
    try:
        return INITIALIZERS[name]
    except KeyError:
        raise ValueError(f"unknown initializer {name!r}; known: {', '.join(sorted(INITIALIZERS))}") from None

"""Turning a user's arrays into what a dataset holds, with one-line errors naming the file and field:
images as uint8 (N, C, H, W), features as float32 (N, D), labels as integers 0..K-1 with class names,
and a held-out test split when the source has none."""
from __future__ import annotations

import numpy as np

from .errors import DataError

CHANNELS = (1, 3, 4)


def as_images(x: np.ndarray, name: str, layout: str | None = None) -> np.ndarray:
    """uint8 images (N, H, W), (N, H, W, C) or (N, C, H, W) -> (N, C, H, W). The channel axis is the one
    of 1, 3 or 4 (the smaller, if both are); ``layout`` ('nhwc' or 'nchw') settles a shape such as
    (N, 3, 8, 3)."""
    if x.dtype != np.uint8:
        raise DataError(f"{name}: images must be uint8 (0-255), got {x.dtype}; scale and convert them, or give "
                        "2-D float features")
    if x.ndim == 3:
        return np.ascontiguousarray(x[:, None])
    if x.ndim != 4:
        raise DataError(f"{name}: images must be (N, H, W), (N, H, W, C) or (N, C, H, W), got shape {x.shape}")
    if layout is None:
        first, last = x.shape[1] in CHANNELS, x.shape[3] in CHANNELS
        if first and last and x.shape[1] != x.shape[3]:   # both could be: the fewer are the channels
            first, last = x.shape[1] < x.shape[3], x.shape[3] < x.shape[1]
        if first == last:
            raise DataError(f"{name}: cannot tell the channel axis of shape {x.shape}; pass --layout nhwc or nchw")
        layout = "nchw" if first else "nhwc"
    if layout not in ("nhwc", "nchw"):
        raise DataError(f"{name}: layout must be 'nhwc' or 'nchw', got {layout!r}")
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2) if layout == "nhwc" else x)


def as_features(x: np.ndarray, name: str) -> np.ndarray:
    """Numeric (N, D) -> float32 (N, D); NaN or infinite values are refused."""
    if x.ndim != 2 or not (np.issubdtype(x.dtype, np.number) and not np.issubdtype(x.dtype, np.complexfloating)):
        raise DataError(f"{name}: features must be a numeric (N, D) array, got {x.dtype} {x.shape}")
    out = x.astype(np.float32)
    bad = ~np.isfinite(out)
    if bad.any():
        row = int(np.argwhere(bad)[0][0])
        raise DataError(f"{name}: {int(bad.sum())} NaN or infinite values (the first in row {row}); "
                        "remove or impute them first")
    return out


def as_examples(x: np.ndarray, name: str, layout: str | None = None) -> np.ndarray:
    """Images when uint8 of 3 or 4 dimensions, features when 2-D."""
    if x.ndim == 2:
        return as_features(x, name)
    return as_images(x, name, layout)


def as_labels(ys: list[np.ndarray], names: list[str]) -> tuple[list[np.ndarray], list[str]]:
    """Labels of each split -> (uint8 or int32 arrays of class indices, class names). Integers must be
    >= 0 and name the classes 0..K-1 (K = the largest + 1); strings are mapped through their sorted set,
    the same for every split."""
    if all(y.dtype.kind in "USO" for y in ys):
        strings = [y.astype(str) for y in ys]
        classes = sorted(set().union(*(set(s.tolist()) for s in strings)))
        index = {c: i for i, c in enumerate(classes)}
        return [_narrow(np.array([index[v] for v in s.tolist()], np.int64)) for s in strings], classes
    out = []
    for y, name in zip(ys, names):
        if y.ndim != 1:
            raise DataError(f"{name}: labels must be one per example (N,), got shape {y.shape}")
        if y.dtype.kind == "f":
            if not np.isfinite(y).all() or (y != np.round(y)).any():
                raise DataError(f"{name}: labels must be integers 0..K-1 or strings, got non-integer values "
                                f"such as {y[~np.isfinite(y) | (y != np.round(y))][0]!r}")
        elif y.dtype.kind not in "iub":
            raise DataError(f"{name}: labels must be integers 0..K-1 or strings, got dtype {y.dtype}")
        y = y.astype(np.int64)
        if y.size and y.min() < 0:
            raise DataError(f"{name}: labels must be integers 0..K-1, got {int(y.min())}")
        out.append(y)
    k = max(int(y.max()) + 1 if y.size else 0 for y in out)
    return [_narrow(y) for y in out], [str(i) for i in range(k)]


def _narrow(y: np.ndarray) -> np.ndarray:
    return y.astype(np.uint8 if y.size == 0 or y.max() < 256 else np.int32)


def check_pair(x: np.ndarray, y: np.ndarray, name: str):
    if len(x) != len(y):
        raise DataError(f"{name}: {len(x)} examples but {len(y)} labels; x and y must have one row each")
    if len(x) == 0:
        raise DataError(f"{name}: no examples")


def hold_out(x: np.ndarray, y: np.ndarray, fraction: float, seed: int, name: str):
    """A random ``fraction`` of the rows as the test split: ((x_train, y_train), (x_test, y_test))."""
    if not 0 < fraction < 1:
        raise DataError(f"--test-fraction must be in (0, 1), got {fraction}")
    n_test = int(round(len(x) * fraction))
    if n_test < 1 or n_test >= len(x):
        raise DataError(f"{name}: {len(x)} examples are too few to hold out {fraction:.0%} for testing")
    order = np.random.default_rng(seed).permutation(len(x))
    test, train = np.sort(order[:n_test]), np.sort(order[n_test:])
    return (x[train], y[train]), (x[test], y[test])

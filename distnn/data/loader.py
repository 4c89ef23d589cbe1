"""Minibatches for one worker: its own part of a split, shuffled per epoch, normalised, augmented,
with the next batch prepared in a background thread while the current one is used."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from .dataset import ShardedDataset


class Loader:
    """Iterate minibatches ``(x float32 (B, C, H, W) or (B, D), y int64 (B,))`` for worker ``rank`` of
    ``world_size``.

    - Each worker reads only its part (``ShardedDataset.part``), once, into memory, on first use.
    - Epoch e shuffles the part with ``default_rng((seed, rank, e))``; batch b of epoch e augments with
      ``default_rng((seed, rank, e, b))``, so a run resumed at any batch sees the same data.
    - Pixels become (x - mean) / std per channel, features per feature, with the manifest's statistics.
    - ``augment``: 'crop+flip' (random crop of the image padded by ``pad`` pixels, then a horizontal
      flip), 'crop' (digits must not be mirrored) or 'none'; by default 'crop+flip' for a training
      split of 3-channel images (CIFAR) and 'none' otherwise. True and False mean the default and 'none'.
    - The last, smaller batch is kept unless ``drop_last``.
    The object is picklable; its data cache and thread are not pickled.
    """

    def __init__(self, dataset, split="train", rank=0, world_size=1, batch_size=64, seed=0, shuffle=None,
                 augment=None, drop_last=False, labels=None, prefetch=True, pad=4):
        self.dataset = dataset if isinstance(dataset, ShardedDataset) else ShardedDataset(dataset)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.split, self.rank, self.world_size = split, rank, world_size
        self.batch_size, self.seed, self.drop_last, self.prefetch, self.pad = batch_size, seed, drop_last, prefetch, pad
        self.labels = self.dataset.label_field(labels)
        self.shuffle = (split == "train") if shuffle is None else shuffle
        images = self.dataset.kind == "images"
        default = "crop+flip" if split == "train" and images and self.dataset.image_shape[0] == 3 else "none"
        augment = {None: default, True: "crop+flip", False: "none"}.get(augment, augment)
        if augment not in ("none", "crop", "crop+flip"):
            raise ValueError(f"augment must be 'none', 'crop' or 'crop+flip', got {augment!r}")
        if augment != "none" and not images:
            raise ValueError(f"augment {augment!r} applies to images; {self.dataset.path} holds features")
        self.augment = None if augment == "none" else augment
        self.pieces = self.dataset.part(split, rank, world_size)
        self.size = sum(p.stop - p.start for p in self.pieces)
        self._scale, self._shift = normalisation(self.dataset.kind, self.dataset.mean, self.dataset.std)
        self._data = None

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_data"] = None
        return state

    def __len__(self):
        full, rest = divmod(self.size, self.batch_size)
        return full if self.drop_last or rest == 0 else full + 1

    @property
    def data(self):
        """(images uint8, labels int64) of this worker's part, read on first use."""
        if self._data is None:
            self._data = self.dataset.read(self.split, self.pieces, self.labels)
        return self._data

    def order(self, epoch: int) -> np.ndarray:
        """The permutation of this worker's rows used in ``epoch``."""
        if not self.shuffle:
            return np.arange(self.size)
        return np.random.default_rng((self.seed, self.rank, epoch)).permutation(self.size)

    def epoch(self, epoch: int = 0, start: int = 0):
        """Iterate the batches of ``epoch`` from batch index ``start``."""
        images, labels = self.data
        order = self.order(epoch)
        batches = range(start, len(self))

        def make(b):
            idx = order[b * self.batch_size:(b + 1) * self.batch_size]
            return self.transform(images[idx], epoch, b), labels[idx]

        if not self.prefetch:
            for b in batches:
                yield make(b)
            return
        with ThreadPoolExecutor(max_workers=1) as pool:
            pending = pool.submit(make, batches[0]) if len(batches) else None
            for b in batches:
                current = pending.result()
                pending = pool.submit(make, b + 1) if b + 1 < len(self) else None
                yield current

    __iter__ = epoch

    def transform(self, x: np.ndarray, epoch: int, batch: int) -> np.ndarray:
        """uint8 (B, C, H, W) or float32 (B, D) -> normalised float32, augmented when ``self.augment``."""
        if self.augment:
            x = augment(x, np.random.default_rng((self.seed, self.rank, epoch, batch)), self.pad,
                        flip=self.augment == "crop+flip")
        out = x.astype(np.float32)
        out *= self._scale
        out += self._shift
        return out


def normalisation(kind: str, mean, std) -> tuple[np.ndarray, np.ndarray]:
    """float32 (scale, shift) so that x * scale + shift = (x - mean) / std, per channel of images
    ((C, 1, 1) against (N, C, H, W)) or per feature ((D,) against (N, D))."""
    shape = (-1, 1, 1) if kind == "images" else (-1,)
    mean, std = np.asarray(mean, np.float32), np.asarray(std, np.float32)
    return (1.0 / std).reshape(shape).astype(np.float32), (-mean / std).reshape(shape).astype(np.float32)


def augment(x: np.ndarray, rng: np.random.Generator, pad: int = 4, flip: bool = True) -> np.ndarray:
    """Random crop of each image zero-padded by ``pad`` pixels, then (``flip``) a horizontal flip with
    p = 1/2.
    x (B, C, H, W) -> (B, C, H, W), vectorised over the batch."""
    b, c, h, w = x.shape
    padded = np.zeros((b, c, h + 2 * pad, w + 2 * pad), x.dtype)
    padded[:, :, pad:pad + h, pad:pad + w] = x
    dy = rng.integers(0, 2 * pad + 1, b)
    dx = rng.integers(0, 2 * pad + 1, b)
    windows = sliding_window_view(padded, (h, w), axis=(2, 3))  # (B, C, 2p+1, 2p+1, H, W)
    out = windows[np.arange(b), :, dy, dx]                     # (B, C, H, W), a copy
    if flip:
        mirrored = rng.random(b) < 0.5
        out[mirrored] = out[mirrored, :, :, ::-1]
    return out

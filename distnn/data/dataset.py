"""A prepared dataset on disk: its manifest, its shards, and which part each worker reads."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from .errors import DataError
from .formats import file_digest
from .writer import FORMAT_VERSION, MANIFEST


@dataclass(frozen=True)
class Piece:
    """Rows [start, stop) of one shard file."""

    file: str
    start: int
    stop: int


class ShardedDataset:
    """A prepared dataset folder (``datasets/mnist``). Picklable: it holds paths and the manifest, never
    an open h5py handle; every read opens and closes its own."""

    def __init__(self, path, verify: bool = True, manifest: str | None = None):
        """``manifest``: the manifest's text as read elsewhere (the driver's machine), for a worker
        whose machine may not hold the folder; None reads ``path/manifest.json``."""
        self.path = Path(path)
        self.verify = verify
        self.found = {}   # shard file -> its copy on this machine, checked against the manifest
        manifest_path = self.path / MANIFEST
        if manifest is not None:
            self.manifest_text = manifest
        elif not manifest_path.is_file():
            from .sources import SOURCES
            how = (f"`python scripts/prepare_data.py {self.path.name} --out {self.path.parent}`"
                   if self.path.name in SOURCES else
                   f"`distnn prepare idx|npz|folder|hdf5 --source YOUR_DATA --name {self.path.name} "
                   f"--out {self.path.parent}`")
            raise DataError(f"{manifest_path}: no prepared dataset here; run {how}")
        else:
            self.manifest_text = manifest_path.read_text()
        try:
            self.manifest = json.loads(self.manifest_text)
        except ValueError as e:
            raise DataError(f"{manifest_path}: not valid JSON ({e}); prepare the dataset again with --force") from None
        if self.manifest.get("format_version") != FORMAT_VERSION:
            raise DataError(f"{manifest_path}: format version {self.manifest.get('format_version')!r}, this distnn "
                            f"reads {FORMAT_VERSION}; prepare the dataset again with --force")
        for key in ("splits", "mean", "std", "label_fields", "image_shape"):
            if key not in self.manifest:
                raise DataError(f"{manifest_path}: missing field {key!r}; prepare the dataset again with --force")

    @property
    def name(self) -> str:
        return self.manifest.get("dataset", self.path.name)

    @property
    def kind(self) -> str:
        """'images' (uint8 (N, C, H, W) in the shards) or 'features' (float32 (N, D))."""
        return self.manifest.get("kind", "images")

    @property
    def image_shape(self) -> tuple:
        """The shape of one example: (C, H, W) images or (D,) features."""
        return tuple(self.manifest["image_shape"])

    input_shape = image_shape

    def class_names(self, labels: str | None = None) -> list[str]:
        return self.manifest["label_fields"][self.label_field(labels)]["names"]

    @property
    def mean(self) -> np.ndarray:
        return np.asarray(self.manifest["mean"], np.float32)

    @property
    def std(self) -> np.ndarray:
        return np.asarray(self.manifest["std"], np.float32)

    def label_field(self, labels: str | None) -> str:
        fields = self.manifest["label_fields"]
        if labels is None:
            return next(iter(fields))
        key = labels if labels in fields else f"{labels}_labels"
        if key not in fields:
            raise DataError(f"{self.path}: no labels {labels!r}; this dataset has "
                            f"{', '.join(f.replace('_labels', '') for f in fields)}")
        return key

    def num_classes(self, labels: str | None = None) -> int:
        return self.manifest["label_fields"][self.label_field(labels)]["num_classes"]

    def split(self, split: str) -> dict:
        try:
            return self.manifest["splits"][split]
        except KeyError:
            raise DataError(f"{self.path}: no split {split!r}; it has {', '.join(self.manifest['splits'])}") from None

    def count(self, split: str) -> int:
        return self.split(split)["count"]

    def part(self, split: str, rank: int, world_size: int) -> list[Piece]:
        """The pieces worker ``rank`` of ``world_size`` reads: whole shards, dealt round-robin, when there
        are at least as many shards as workers; otherwise a contiguous range of the concatenated rows.
        Across all ranks every row appears exactly once."""
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, {world_size})")
        shards = self.split(split)["shards"]
        if len(shards) >= world_size:
            return [Piece(s["file"], 0, s["count"]) for s in shards[rank::world_size]]
        total = sum(s["count"] for s in shards)
        lo, hi = rank * total // world_size, (rank + 1) * total // world_size
        pieces, offset = [], 0
        for s in shards:
            a, b = max(lo, offset), min(hi, offset + s["count"])
            if a < b:
                pieces.append(Piece(s["file"], a - offset, b - offset))
            offset += s["count"]
        return pieces

    def entries(self) -> dict:
        """Every shard file of every split -> its manifest entry (``count``, ``sha256``)."""
        return {s["file"]: s for split in self.manifest["splits"].values() for s in split["shards"]}

    def read(self, split: str, pieces: list[Piece], labels: str | None = None):
        """(x, labels int64 (N,)) of the given pieces, checked against the manifest: x uint8 images
        (N, C, H, W) or float32 features (N, D)."""
        field = self.label_field(labels)
        entries = {s["file"]: s for s in self.split(split)["shards"]}
        k = self.num_classes(labels)
        dtype = np.uint8 if self.kind == "images" else np.float32
        xs, ys = [], []
        for piece in pieces:
            path = self.found.get(piece.file, self.path / piece.file)
            entry = entries[piece.file]
            if not path.is_file():
                raise DataError(f"{path}: shard missing; prepare the dataset again with --force")
            if self.verify and piece.file not in self.found and file_digest(path) != entry["sha256"]:
                raise DataError(f"{path}: checksum differs from the manifest (corrupt or modified shard); "
                                "prepare the dataset again with --force")
            try:
                with h5py.File(path, "r") as f:
                    images, y = f[self.kind], f[field]
                    if len(images) != entry["count"] or len(y) != entry["count"]:
                        raise DataError(f"{path}: holds {len(images)} images and {len(y)} labels, the manifest "
                                        f"says {entry['count']}; prepare the dataset again with --force")
                    if images.shape[1:] != self.image_shape or images.dtype != dtype:
                        raise DataError(f"{path}: {self.kind} are {images.dtype} {images.shape[1:]}, the manifest "
                                        f"says {np.dtype(dtype)} {self.image_shape}")
                    xs.append(images[piece.start:piece.stop])
                    ys.append(y[piece.start:piece.stop].astype(np.int64))
            except (OSError, KeyError) as e:
                raise DataError(f"{path}: unreadable HDF5 shard ({e}); prepare the dataset again with --force") from None
            if ys[-1].size and (ys[-1].min() < 0 or ys[-1].max() >= k):
                raise DataError(f"{path}: label {int(ys[-1].max())} out of range [0, {k}); prepare the dataset again")
        if not xs:
            return np.zeros((0,) + self.image_shape, dtype), np.zeros(0, np.int64)
        return np.concatenate(xs), np.concatenate(ys)


def open_dataset(path, verify: bool = True, manifest: str | None = None) -> ShardedDataset:
    return ShardedDataset(path, verify, manifest)

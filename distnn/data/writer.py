"""Writing a dataset: HDF5 shards of rows and the manifest, into a temporary folder renamed into place
only when complete, so an interrupted run leaves the previous good state (or nothing), never half a
dataset.

Every format ends here as ``splits``: {"train": (x, {field: labels}), "test": ...} with x uint8 images
(N, C, H, W) or float32 features (N, D), and ``label_fields``: {field: [class names]}.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import h5py
import numpy as np
from tqdm import tqdm

from .._io import WriteFailed, atomic_write_text
from .formats import file_digest

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
CHUNK_ROWS = 1024


def shard_name(split: str, index: int, count: int) -> str:
    return f"{split}-{index:05d}-of-{count:05d}.h5"


def kind_of(x: np.ndarray) -> str:
    """'images' for uint8 (N, C, H, W), 'features' for float32 (N, D)."""
    return "images" if x.ndim == 4 else "features"


def channel_stats(images: np.ndarray):
    """Per-channel mean and std (0-255 scale) of uint8 images (N, C, H, W), exact, in float64."""
    c = images.shape[1]
    mean, sq = np.zeros(c), np.zeros(c)
    for start in range(0, len(images), 4096):
        block = images[start:start + 4096].astype(np.float64)
        mean += block.sum(axis=(0, 2, 3))
        sq += np.einsum("nchw,nchw->c", block, block)
    count = images.shape[0] * images.shape[2] * images.shape[3]
    mean /= count
    return mean, np.sqrt(np.maximum(sq / count - mean * mean, 0.0))


def feature_stats(x: np.ndarray):
    """Per-feature mean and std of (N, D) features in float64; a constant feature gets std 1."""
    x64 = x.astype(np.float64)
    mean, std = x64.mean(axis=0), x64.std(axis=0)
    return mean, np.where(std > 0, std, 1.0)


def write_dataset(out: Path, name: str, splits: dict, label_fields: dict, source_sums: dict, shards: int,
                  compression=None, progress=True, extra: dict | None = None) -> dict:
    """Write ``out/name`` (shards and manifest) atomically; returns the manifest."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    remove_stale(out, name)
    tmp = out / f".{name}.tmp-{os.getpid()}"
    try:
        tmp.mkdir()
        manifest = _write(tmp, name, splits, label_fields, source_sums, shards, compression, progress, extra)
        _replace_dir(tmp, out / name)
    except WriteFailed:
        raise
    except OSError as e:  # a full disk: the dataset is all there or not at all
        needed = sum(x.nbytes + sum(y.nbytes for y in labels.values()) for x, labels in splits.values())
        raise WriteFailed(out / name, e, needed) from None
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return manifest


def _write(folder: Path, name, splits, label_fields, source_sums, shards, compression, progress, extra=None):
    train = splits["train"][0]
    kind = kind_of(train)
    manifest = {"format_version": FORMAT_VERSION, "dataset": name, "kind": kind,
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "image_shape": list(train.shape[1:]),
                "label_fields": {}, "splits": {}, "source": source_sums, "compression": compression, **(extra or {})}
    for field, names in label_fields.items():
        manifest["label_fields"][field] = {"num_classes": len(names), "names": list(names)}
    mean, std = channel_stats(train) if kind == "images" else feature_stats(train)
    manifest["mean"], manifest["std"] = mean.tolist(), std.tolist()
    total = sum(len(x) for x, _ in splits.values())
    with tqdm(total=total, unit="row", desc=f"writing {name}", disable=not progress, leave=False) as bar:
        for split, (x, labels) in splits.items():
            bounds = np.linspace(0, len(x), shards + 1).astype(int)
            entries = []
            for i in range(shards):
                lo, hi = bounds[i], bounds[i + 1]
                file = shard_name(split, i, shards)
                _write_shard(folder / file, kind, x[lo:hi], {k: v[lo:hi] for k, v in labels.items()}, compression)
                entries.append({"file": file, "count": int(hi - lo), "sha256": file_digest(folder / file)})
                bar.update(hi - lo)
            manifest["splits"][split] = {"count": int(len(x)), "shards": entries}
    atomic_write_text(folder / MANIFEST, json.dumps(manifest, indent=1))
    return manifest


def _write_shard(path: Path, kind: str, x: np.ndarray, labels: dict, compression):
    if len(x) == 0:  # more shards than rows: an empty shard, unchunked
        compression = None
    rows = min(CHUNK_ROWS, len(x))
    with h5py.File(path, "w") as f:
        f.create_dataset(kind, data=x, chunks=(rows,) + x.shape[1:] if rows else None, compression=compression)
        for key, y in labels.items():
            f.create_dataset(key, data=y, chunks=(min(len(y), 1 << 16),) if rows else None, compression=compression)
        f.attrs["count"] = len(x)


def _replace_dir(tmp: Path, final: Path):
    """Rename ``tmp`` to ``final``; an existing ``final`` is moved aside first and removed after."""
    old = final.with_name(f".{final.name}.old-{os.getpid()}")
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    if old.exists():
        shutil.rmtree(old, ignore_errors=True)


def remove_stale(out: Path, name: str):
    """Temporary folders left by a killed run (their process is gone)."""
    for p in out.glob(f".{name}.tmp-*"):
        pid = p.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(p, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def up_to_date(final: Path, name: str, shards: int) -> bool:
    """Whether ``final`` already holds dataset ``name`` in ``shards`` shards per split."""
    try:
        manifest = json.loads((final / MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    if manifest.get("format_version") != FORMAT_VERSION or manifest.get("dataset") != name:
        return False
    for split in manifest.get("splits", {}).values():
        if len(split["shards"]) != shards or not all((final / s["file"]).is_file() for s in split["shards"]):
            return False
    return bool(manifest.get("splits"))

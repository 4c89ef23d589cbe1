"""Turn raw MNIST / CIFAR-100 files into verified HDF5 shards with a manifest.

The dataset is written into a temporary folder next to its destination and renamed into place only
when every shard and the manifest are complete, so an interrupted run leaves the previous good state
(or nothing) behind, never half a dataset. A rerun whose manifest already matches does nothing.
"""
from __future__ import annotations

import json
import os
import shutil
import tarfile
import time
from pathlib import Path

import h5py
import numpy as np
from tqdm import tqdm

from .._io import atomic_write_text
from .errors import DataError
from .formats import (check_labels, cifar_split, file_digest, load_cifar_pickle, md5, parse_idx, read_bytes,
                      sha256)
from .sources import SOURCES, Source, download

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
CHUNK_ROWS = 1024


def shard_name(split: str, index: int, count: int) -> str:
    return f"{split}-{index:05d}-of-{count:05d}.h5"


def prepare(name: str, out="datasets", source=None, shards: int = 8, force: bool = False, progress: bool = True,
            sources: dict | None = None, compression: str | None = None, log=print) -> Path:
    """Prepare dataset ``name`` ('mnist' or 'cifar100') under ``out/name``; returns that folder.

    ``source``: a folder holding the raw files (else they are downloaded into ``out/.downloads``).
    ``sources`` overrides the file list, checksums and mirrors (tests use it).
    """
    sources = sources or SOURCES
    if name not in sources:
        raise DataError(f"unknown dataset {name!r}; choose one of {', '.join(sources)}")
    if not isinstance(shards, int) or shards < 1:
        raise DataError(f"--shards must be a positive integer, got {shards!r}")
    spec = sources[name]
    out = Path(out)
    final = out / name
    if not force and _up_to_date(final, name, shards):
        log(f"{final}: already prepared ({shards} shards, manifest matches); nothing to do (--force rebuilds)")
        return final
    started = time.perf_counter()
    raw = _raw_files(spec, source, out, progress)
    if name == "cifar100":
        splits, label_fields, source_sums = _read_cifar(spec, raw)
    else:
        splits, label_fields, source_sums = _read_mnist(spec, raw)
    out.mkdir(parents=True, exist_ok=True)
    _remove_stale(out, name)
    tmp = out / f".{name}.tmp-{os.getpid()}"
    try:
        tmp.mkdir()
        manifest = _write(tmp, name, splits, label_fields, source_sums, shards, compression, progress)
        _replace_dir(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    counts = ", ".join(f"{s} {manifest['splits'][s]['count']}" for s in manifest["splits"])
    log(f"{final}: wrote {shards} shards per split ({counts}) in {time.perf_counter() - started:.1f} s; "
        f"mean {np.round(manifest['mean'], 4).tolist()} std {np.round(manifest['std'], 4).tolist()}")
    return final


# -- raw files ----------------------------------------------------------------------------------------

def _raw_files(spec: Source, source, out: Path, progress) -> dict:
    """name -> path of each raw file, from ``source`` or downloaded."""
    paths = {}
    if source is not None:
        folder = Path(source)
        if not folder.is_dir():
            raise DataError(f"--source {folder}: not a folder")
        for f in spec.files:
            paths[f.name] = _find_in(folder, f.name, spec)
        return paths
    cache = out / ".downloads" / spec.name
    cache.mkdir(parents=True, exist_ok=True)
    for f in spec.files:
        dest = cache / f.name
        if dest.exists() and _verify_file(f, dest, raise_error=False):
            paths[f.name] = dest
            continue
        download(spec.mirrors, f.name, dest, progress)
        _verify_file(f, dest)
        paths[f.name] = dest
    return paths


def _find_in(folder: Path, name: str, spec: Source) -> Path:
    candidates = [folder / name]
    if name.endswith(".gz"):
        candidates.append(folder / name[:-3])  # IDX uncompressed
    if name.endswith(".tar.gz"):
        stem = name[:-7]
        candidates += [folder / stem, folder]  # an extracted archive, or the folder itself
    for c in candidates:
        if c.is_file() or (c.is_dir() and spec.members and all((c / m).is_file() for m in spec.members)):
            return c
    raise DataError(f"{folder / name}: file not found in --source {folder} "
                    f"(expected {' or '.join(str(c.name) for c in candidates[:2])})")


def _verify_file(f, path: Path, content: bytes | None = None, raise_error=True) -> bool:
    """A raw file matches when the md5 of the file as published or the sha256 of its content does."""
    if path.is_dir():
        return True  # an extracted archive: its members are checked one by one
    if f.md5 and file_digest(path, "md5") == f.md5:
        return True
    if f.sha256:
        content = read_bytes(path) if content is None else content
        if sha256(content) == f.sha256:
            return True
    if raise_error:
        expect = f"sha256 of content {f.sha256}" if f.sha256 else f"md5 {f.md5}"
        raise DataError(f"{path}: checksum mismatch (expected {expect}); the file is corrupt or not the "
                        "original: delete it and download it again")
    return False


def _read_mnist(spec: Source, raw: dict):
    arrays, sums = {}, {}
    for f in spec.files:
        data = read_bytes(raw[f.name])
        _verify_file(f, raw[f.name], data)
        arrays[f.name] = parse_idx(data, str(raw[f.name]), 3 if "images" in f.name else 1)
        sums[f.name] = {"sha256_content": sha256(data)}
    splits = {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        images = arrays[f"{prefix}-images-idx3-ubyte.gz"]
        labels = arrays[f"{prefix}-labels-idx1-ubyte.gz"]
        if images.dtype != np.uint8:
            raise DataError(f"{raw[f'{prefix}-images-idx3-ubyte.gz']}: images must be unsigned bytes")
        if len(images) != len(labels):
            raise DataError(f"{raw[f'{prefix}-labels-idx1-ubyte.gz']}: {len(labels)} labels for "
                            f"{len(images)} images in {split}; the files do not belong together")
        check_labels(labels.astype(np.int64), 10, str(raw[f"{prefix}-labels-idx1-ubyte.gz"]))
        splits[split] = (images[:, None], {"labels": labels.astype(np.uint8)})
    return splits, {"labels": [str(i) for i in range(10)]}, sums


def _read_cifar(spec: Source, raw: dict):
    path = raw[spec.files[0].name]
    members = {}
    if path.is_dir():
        for m in spec.members:
            members[m] = read_bytes(path / m)
    else:
        _verify_file(spec.files[0], path)
        try:
            with tarfile.open(path, "r:*") as tar:
                for m in spec.members:
                    try:
                        members[m] = tar.extractfile(f"cifar-100-python/{m}").read()
                    except KeyError:
                        raise DataError(f"{path}: cifar-100-python/{m} missing from the archive") from None
        except (tarfile.TarError, EOFError, OSError) as e:
            raise DataError(f"{path}: truncated or corrupt archive ({e}); download it again") from None
    sums = {spec.files[0].name: {"md5": file_digest(path, "md5")} if path.is_file() else {}}
    for m, expected in spec.members.items():
        got = md5(members[m])
        if got != expected:
            raise DataError(f"{path}: {m} checksum mismatch (md5 {got}, expected {expected}); the archive is "
                            "corrupt or not the original: delete it and download it again")
        sums[m] = {"md5": got}
    meta = load_cifar_pickle(members["meta"], f"{path}:meta")
    names = {}
    for key, field in (("fine_label_names", "fine_labels"), ("coarse_label_names", "coarse_labels")):
        if key not in meta:
            raise DataError(f"{path}:meta: missing {key!r}; not a CIFAR-100 meta file")
        names[field] = [n.decode() if isinstance(n, bytes) else str(n) for n in meta[key]]
    splits = {}
    for split in ("train", "test"):
        obj = load_cifar_pickle(members[split], f"{path}:{split}")
        images, fine, coarse = cifar_split(obj, f"{path}:{split}",
                                           (len(names["fine_labels"]), len(names["coarse_labels"])))
        splits[split] = (images, {"fine_labels": fine.astype(np.uint8), "coarse_labels": coarse.astype(np.uint8)})
    return splits, names, sums


# -- writing ------------------------------------------------------------------------------------------

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
    return mean, np.sqrt(sq / count - mean * mean)


def _write(folder: Path, name, splits, label_fields, source_sums, shards, compression, progress):
    manifest = {"format_version": FORMAT_VERSION, "dataset": name, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "image_shape": list(splits["train"][0].shape[1:]), "label_fields": {}, "splits": {},
                "source": source_sums, "compression": compression}
    for field, names in label_fields.items():
        manifest["label_fields"][field] = {"num_classes": len(names), "names": names}
    mean, std = channel_stats(splits["train"][0])
    manifest["mean"], manifest["std"] = mean.tolist(), std.tolist()
    total = sum(len(images) for images, _ in splits.values())
    with tqdm(total=total, unit="img", desc=f"writing {name}", disable=not progress, leave=False) as bar:
        for split, (images, labels) in splits.items():
            bounds = np.linspace(0, len(images), shards + 1).astype(int)
            entries = []
            for i in range(shards):
                lo, hi = bounds[i], bounds[i + 1]
                file = shard_name(split, i, shards)
                _write_shard(folder / file, images[lo:hi], {k: v[lo:hi] for k, v in labels.items()}, compression)
                entries.append({"file": file, "count": int(hi - lo), "sha256": file_digest(folder / file)})
                bar.update(hi - lo)
            manifest["splits"][split] = {"count": int(len(images)), "shards": entries}
    atomic_write_text(folder / MANIFEST, json.dumps(manifest, indent=1))
    return manifest


def _write_shard(path: Path, images: np.ndarray, labels: dict, compression):
    rows = max(1, min(CHUNK_ROWS, len(images)))
    with h5py.File(path, "w") as f:
        f.create_dataset("images", data=images, chunks=(rows,) + images.shape[1:], compression=compression)
        for key, y in labels.items():
            f.create_dataset(key, data=y, chunks=(max(1, min(len(y), 1 << 16)),), compression=compression)
        f.attrs["count"] = len(images)


def _replace_dir(tmp: Path, final: Path):
    """Rename ``tmp`` to ``final``; an existing ``final`` is moved aside first and removed after."""
    old = final.with_name(f".{final.name}.old-{os.getpid()}")
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    if old.exists():
        shutil.rmtree(old, ignore_errors=True)


def _remove_stale(out: Path, name: str):
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


def _up_to_date(final: Path, name: str, shards: int) -> bool:
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

"""Turn raw data into verified HDF5 shards with a manifest (``writer.py``): the named sources (MNIST,
Fashion-MNIST, KMNIST, CIFAR-100; files verified by their published checksums, downloaded when no
``--source`` is given) and a user's data in the formats of ``readers.py`` (``prepare_from``). A rerun
whose manifest already matches does nothing.
"""
from __future__ import annotations

import tarfile
import time
from pathlib import Path

import numpy as np

from . import readers
from .errors import DataError
from .formats import check_labels, cifar_split, file_digest, load_cifar_pickle, md5, parse_idx, read_bytes, sha256
from .sources import SOURCES, Source, download
from .writer import MANIFEST, up_to_date, write_dataset  # noqa: F401  (MANIFEST: where readers look)

FORMATS = ("idx", "npz", "folder", "hdf5")


def prepare(name: str, out="datasets", source=None, shards: int = 8, force: bool = False, progress: bool = True,
            sources: dict | None = None, compression: str | None = None, log=print) -> Path:
    """Prepare a named source (``SOURCES``: mnist, fashion_mnist, kmnist, cifar100) under ``out/name``;
    returns that folder.

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
    if not force and up_to_date(final, name, shards):
        log(f"{final}: already prepared ({shards} shards, manifest matches); nothing to do (--force rebuilds)")
        return final
    started = time.perf_counter()
    raw = _raw_files(spec, source, out, progress)
    read = _read_cifar if spec.members else _read_idx_source
    manifest = write_dataset(out, name, *read(spec, raw), shards, compression, progress)
    return _report(final, manifest, shards, started, log)


def prepare_from(fmt: str, source, name: str | None = None, out="datasets", shards: int = 8, force=False,
                 progress=True, compression=None, log=print, test=None, test_fraction=None, seed=0, size=None,
                 layout=None, keys: dict | None = None) -> Path:
    """Prepare a user's data under ``out/name`` from ``source`` in format ``fmt``:

    - 'idx': a folder of IDX files (train-images/-labels, t10k- or test- images/labels);
    - 'npz': arrays x, y (and x_test, y_test) of an .npz file, or ``test``: another .npz;
    - 'folder': one subfolder of images per class (or train/ and test/ so laid out); ``size`` (H, W);
    - 'hdf5': datasets of an HDF5 file, named by ``keys`` {"x", "y", "x_test", "y_test"}.
    Without a test split, ``test_fraction`` (default 0.1) of the rows is held out, drawn with ``seed``.
    ``layout`` ('nhwc' / 'nchw') settles an ambiguous 4-D image shape. ``name``: default the source's
    stem."""
    if fmt not in FORMATS:
        raise DataError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if source is None:
        raise DataError(f"format {fmt}: give the data with --source")
    source = Path(source)
    name = name or source.stem
    if not name or name.startswith(".") or "/" in name:
        raise DataError(f"--name {name!r}: give a plain folder name")
    if not isinstance(shards, int) or shards < 1:
        raise DataError(f"--shards must be a positive integer, got {shards!r}")
    started = time.perf_counter()
    keys = {k: v for k, v in (keys or {}).items() if v}
    if fmt == "idx":
        parts = readers.read_idx_set(source, test_fraction, seed)
    elif fmt == "npz":
        names = (keys.get("x", "x"), keys.get("y", "y"), keys.get("x_test", "x_test"), keys.get("y_test", "y_test"))
        parts = readers.read_npz(source, test, test_fraction, seed, layout, names)
    elif fmt == "folder":
        parts = readers.read_image_folder(source, size, test_fraction, seed, progress)
    else:
        parts = readers.read_hdf5(source, keys.get("x", "x"), keys.get("y", "y"), keys.get("x_test"),
                                  keys.get("y_test"), test_fraction, seed, layout)
    manifest = write_dataset(Path(out), name, *parts, shards, compression, progress, extra={"format": fmt})
    return _report(Path(out) / name, manifest, shards, started, log)


def _report(final: Path, manifest: dict, shards: int, started: float, log) -> Path:
    counts = ", ".join(f"{s} {manifest['splits'][s]['count']}" for s in manifest["splits"])
    stats = "" if len(manifest["mean"]) > 8 else (f"; mean {np.round(manifest['mean'], 4).tolist()} "
                                                  f"std {np.round(manifest['std'], 4).tolist()}")
    log(f"{final}: wrote {shards} shards per split ({counts}) in {time.perf_counter() - started:.1f} s{stats}")
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


def _read_idx_source(spec: Source, raw: dict):
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
    return splits, {"labels": spec.classes or [str(i) for i in range(10)]}, sums


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



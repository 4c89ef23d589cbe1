"""Readers of a user's data: any IDX image + label set, numpy .npz arrays, a folder of images with one
subfolder per class, and an existing HDF5 file. Each returns ``(splits, label_fields, source_sums)``
for ``writer.write_dataset``; bad input raises a DataError naming the file and what is wrong, before
anything is written."""
from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np

from .arrays import as_examples, as_images, as_labels, check_pair, hold_out
from .errors import DataError
from .formats import file_digest, parse_idx, read_bytes

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")


def _splits(parts: dict, names: dict, test_fraction, seed, name, layout=None):
    """{"train": (x, y), "test": (x, y) or None} -> the writer's splits and label fields. Examples are
    checked before a test split is held out, so an error names the row as the source has it."""
    xs, ys = {}, {}
    for split, pair in parts.items():
        if pair is not None:
            check_pair(pair[0], pair[1], names[split])
            xs[split], ys[split] = as_examples(np.asarray(pair[0]), names[split], layout), np.asarray(pair[1])
    if "test" not in xs:
        (xs["train"], ys["train"]), (xs["test"], ys["test"]) = hold_out(xs["train"], ys["train"], test_fraction or 0.1,
                                                                        seed, names["train"])
    if xs["train"].shape[1:] != xs["test"].shape[1:]:
        raise DataError(f"{names['test']}: examples of shape {xs['test'].shape[1:]}, the training ones "
                        f"{xs['train'].shape[1:]}")
    labels, classes = as_labels([ys["train"], ys["test"]], [names["train"], names["test"]])
    splits = {s: (xs[s], {"labels": y}) for s, y in zip(("train", "test"), labels)}
    return splits, {"labels": classes}


def read_idx_set(folder, test_fraction=None, seed=0):
    """train-images / train-labels and t10k- (or test-) images / labels IDX files (.gz or raw) in
    ``folder``; without test files a ``test_fraction`` of the training rows is held out."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"--source {folder}: not a folder")
    found = {}
    for split, prefixes in (("train", ("train",)), ("test", ("t10k", "test"))):
        for what, ndim in (("images", 3), ("labels", 1)):
            paths = [p for pre in prefixes for p in sorted(folder.glob(f"{pre}-{what}*")) if p.is_file()]
            found[split, what] = paths[0] if paths else None
    for what in ("images", "labels"):
        if found["train", what] is None:
            raise DataError(f"{folder}: no train-{what}-* IDX file (expected train-images-idx3-ubyte[.gz], "
                            "train-labels-idx1-ubyte[.gz] and optionally t10k-* test files)")
    parts, names, sums = {}, {}, {}
    for split in ("train", "test"):
        if found[split, "images"] is None or found[split, "labels"] is None:
            parts[split] = None
            continue
        arrays = []
        for what, ndim in (("images", 3), ("labels", 1)):
            path = found[split, what]
            data = read_bytes(path)
            arrays.append(parse_idx(data, str(path), ndim) if what == "labels" else _idx_images(data, path))
            sums[path.name] = {"sha256": file_digest(path)}
        parts[split], names[split] = tuple(arrays), str(found[split, "labels"])
    names.setdefault("test", names["train"])
    splits, fields = _splits(parts, names, test_fraction, seed, folder.name)
    return splits, fields, sums


def _idx_images(data: bytes, path: Path) -> np.ndarray:
    """(N, H, W) or (N, H, W, C) IDX images."""
    ndim = data[3] if len(data) > 3 else 3
    return parse_idx(data, str(path), 4 if ndim == 4 else 3)


def read_npz(path, test=None, test_fraction=None, seed=0, layout=None, keys=("x", "y", "x_test", "y_test")):
    """Arrays ``x``, ``y`` (and ``x_test``, ``y_test``) of an .npz file; the test split from those, from
    another .npz with ``x``, ``y`` (``test``), or held out (``test_fraction``)."""
    path = Path(path)
    arrays = _load_npz(path)
    kx, ky, kxt, kyt = keys
    for key in (kx, ky):
        if key not in arrays:
            raise DataError(f"{path}: no array {key!r}; it holds {', '.join(arrays) or 'nothing'}")
    parts = {"train": (arrays[kx], arrays[ky]), "test": None}
    names = {"train": f"{path}:{kx}", "test": f"{path}:{kxt}"}
    if test is not None:
        other = _load_npz(Path(test))
        if kx not in other or ky not in other:
            raise DataError(f"{test}: needs arrays {kx!r} and {ky!r}")
        parts["test"], names["test"] = (other[kx], other[ky]), f"{test}:{kx}"
    elif kxt in arrays or kyt in arrays:
        if kxt not in arrays or kyt not in arrays:
            raise DataError(f"{path}: has only one of {kxt!r} and {kyt!r}")
        parts["test"] = (arrays[kxt], arrays[kyt])
    splits, fields = _splits(parts, names, test_fraction, seed, path.stem, layout)
    sums = {Path(p).name: {"sha256": file_digest(p)} for p in [path] + ([test] if test else [])}
    return splits, fields, sums


def _load_npz(path: Path) -> dict:
    try:
        with np.load(path, allow_pickle=False) as f:
            return {k: f[k] for k in f.files}
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: not a readable .npz file ({e})") from None


def read_hdf5(path, x="x", y="y", x_test=None, y_test=None, test_fraction=None, seed=0, layout=None):
    """Datasets ``x`` and ``y`` (paths inside the file) and optionally ``x_test``, ``y_test``."""
    path = Path(path)
    try:
        with h5py.File(path, "r") as f:
            def get(key):
                if key not in f or not isinstance(f[key], h5py.Dataset):
                    raise DataError(f"{path}: no dataset {key!r}; give its path with --x / --y / --x-test / --y-test")
                value = f[key][()]
                return value.astype(str) if value.dtype.kind == "O" else value
            parts = {"train": (get(x), get(y)), "test": None}
            if x_test or y_test:
                if not (x_test and y_test):
                    raise DataError(f"{path}: give both --x-test and --y-test")
                parts["test"] = (get(x_test), get(y_test))
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except OSError as e:
        raise DataError(f"{path}: not a readable HDF5 file ({e})") from None
    names = {"train": f"{path}:{x}", "test": f"{path}:{x_test}"}
    splits, fields = _splits(parts, names, test_fraction, seed, path.stem, layout)
    return splits, fields, {path.name: {"sha256": file_digest(path)}}


def read_image_folder(folder, size=None, test_fraction=None, seed=0, progress=True):
    """One subfolder per class of image files (PNG, JPEG, ...); or ``train/`` and ``test/`` folders
    each laid out so. All images of one size, or resized to ``size`` (H, W); grey images stay one
    channel, colour ones become RGB."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"--source {folder}: not a folder")
    roots = {"train": folder / "train", "test": folder / "test"}
    if not (roots["train"].is_dir() and roots["test"].is_dir()):
        roots = {"train": folder, "test": None}
    classes = sorted(p.name for p in roots["train"].iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DataError(f"{roots['train']}: no class subfolders (expected one folder of images per class)")
    parts, names = {}, {}
    for split, root in roots.items():
        if root is None:
            parts[split] = None
            continue
        files, labels = [], []
        for k, c in enumerate(classes):
            found = sorted(p for p in (root / c).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES) \
                if (root / c).is_dir() else []
            if not found:
                raise DataError(f"{root / c}: no images (PNG or JPEG files) in this class folder")
            files += found
            labels += [k] * len(found)
        parts[split] = (read_images(files, size, progress), np.array(labels))
        names[split] = str(root)
    names.setdefault("test", names["train"])
    splits, _ = _splits(parts, names, test_fraction, seed, folder.name)
    sums = {"files": len(files)}
    return splits, {"labels": classes}, sums


def read_images(files: list[Path], size=None, progress=True) -> np.ndarray:
    """uint8 (N, C, H, W) of image files: grey ones one channel, colour ones RGB; all of one size, or
    resized to ``size`` (H, W)."""
    from PIL import Image, UnidentifiedImageError
    from tqdm import tqdm
    images, shape, first = [], None, None
    for path in tqdm(files, unit="img", desc="reading images", disable=not progress, leave=False):
        try:
            with Image.open(path) as im:
                im = im.convert("L" if im.mode in ("1", "L", "I;16", "I", "F") else "RGB")
                if size is not None:
                    im = im.resize((size[1], size[0]), Image.BILINEAR)
                a = np.asarray(im, np.uint8)
        except (UnidentifiedImageError, OSError, ValueError) as e:
            raise DataError(f"{path}: not a readable image ({e})") from None
        a = a[:, :, None] if a.ndim == 2 else a
        if shape is None:
            shape, first = a.shape, path
        elif a.shape != shape:
            if a.shape[:2] != shape[:2]:
                raise DataError(f"{path}: {a.shape[0]}x{a.shape[1]} pixels, but {first} has {shape[0]}x{shape[1]}; "
                                f"pass --size HxW to resize all images")
            raise DataError(f"{path}: {'colour' if a.shape[2] == 3 else 'grey'} image among "
                            f"{'colour' if shape[2] == 3 else 'grey'} ones (like {first}); convert them to one kind")
        images.append(a)
    return as_images(np.stack(images), str(files[0].parent.parent), "nhwc")

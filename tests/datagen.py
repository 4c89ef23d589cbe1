"""Small inputs in the exact real formats: MNIST IDX files and a cifar-100-python tarball."""
from __future__ import annotations

import gzip
import hashlib
import io
import pickle
import struct
import tarfile
from pathlib import Path

import numpy as np

from distnn.data import RawFile, Source


def idx_bytes(array: np.ndarray) -> bytes:
    """IDX: magic 0x00 0x00 0x08 ndim (unsigned bytes), big-endian uint32 sizes, then the data."""
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(">" + "I" * array.ndim, *array.shape)
    return header + np.ascontiguousarray(array, np.uint8).tobytes()


def make_mnist(folder: Path, n_train=300, n_test=60, seed=0, gz=True):
    """Write the four MNIST files; returns (arrays, a Source whose checksums match them)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": rng.integers(0, 10, n_train).astype(np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test).astype(np.uint8),
    }
    files = []
    for stem, a in arrays.items():
        content = idx_bytes(a)
        raw = gzip.compress(content) if gz else content
        (folder / (stem + (".gz" if gz else ""))).write_bytes(raw)
        files.append(RawFile(stem + ".gz", hashlib.sha256(content).hexdigest(), hashlib.md5(raw).hexdigest()))
    return arrays, Source("mnist", files, [])


def prepared_mnist(folder: Path, n_train, n_test, seed, shards) -> Path:
    """Generated MNIST files under folder/raw, prepared into folder/datasets (returned)."""
    from distnn.data import prepare
    _, source = make_mnist(folder / "raw", n_train=n_train, n_test=n_test, seed=seed)
    prepare("mnist", out=folder / "datasets", source=folder / "raw", sources={"mnist": source}, shards=shards,
            progress=False, log=lambda *a: None)
    return folder / "datasets"


def make_cifar100(folder: Path, n_train=120, n_test=40, seed=0):
    """Write cifar-100-python.tar.gz with train/test/meta pickles of the real keys and channel-planar
    rows; returns (dict of arrays, a Source whose checksums match)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    out, members = {}, {}
    fine_names = [f"fine_{i}" for i in range(100)]
    coarse_names = [f"coarse_{i}" for i in range(20)]
    for split, n in (("train", n_train), ("test", n_test)):
        images = rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8)
        fine = rng.integers(0, 100, n)
        coarse = fine // 5
        obj = {b"filenames": [f"img_{i}.png".encode() for i in range(n)], b"batch_label": split.encode(),
               b"fine_labels": fine.tolist(), b"coarse_labels": coarse.tolist(),
               b"data": images.reshape(n, 3072)}  # R plane, G plane, B plane, row by row
        members[split] = pickle.dumps(obj, protocol=2)
        out[split] = (images, fine, coarse)
    members["meta"] = pickle.dumps({b"fine_label_names": [n.encode() for n in fine_names],
                                    b"coarse_label_names": [n.encode() for n in coarse_names]}, protocol=2)
    raw = write_cifar_tar(folder / "cifar-100-python.tar.gz", members)
    source = Source("cifar100", [RawFile("cifar-100-python.tar.gz", None, hashlib.md5(raw).hexdigest())], [],
                    members={k: hashlib.md5(v).hexdigest() for k, v in members.items()})
    out["names"] = (fine_names, coarse_names)
    return out, source, members


def write_cifar_tar(path: Path, members: dict) -> bytes:
    """A gzipped tar with cifar-100-python/<name> for each member; returns its bytes."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(f"cifar-100-python/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    path.write_bytes(buf.getvalue())
    return buf.getvalue()


def prepared_rule(folder: Path) -> Path:
    """3,000 feature rows labelled by a linear rule (so that accuracy shows learning, where the
    generated MNIST is noise), prepared as dataset ``rule`` under folder/ds (returned)."""
    from distnn.data import prepare_from
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3000, 12)).astype(np.float32)
    np.savez(folder / "rule.npz", x=x, y=(x @ rng.normal(size=(12, 3))).argmax(axis=1))
    prepare_from("npz", folder / "rule.npz", out=folder / "ds", shards=2, progress=False, log=lambda *a: None)
    return folder / "ds"

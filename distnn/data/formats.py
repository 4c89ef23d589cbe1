"""Readers for the raw formats: IDX (MNIST) and the CIFAR-100 python pickles."""
from __future__ import annotations

import gzip
import hashlib
import io
import pickle
import zlib
from pathlib import Path

import numpy as np

from .errors import DataError

IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_bytes(path: Path) -> bytes:
    """The content of ``path``, decompressed when it is gzip (by its magic bytes, not its name)."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: file not found; check --source or download the data") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror})") from None
    if raw[:2] == b"\x1f\x8b":
        try:
            return gzip.decompress(raw)
        except (EOFError, OSError, zlib.error) as e:
            raise DataError(f"{path}: truncated or corrupt gzip file ({e}); download it again") from None
    return raw


def parse_idx(data: bytes, name: str, expect_ndim: int) -> np.ndarray:
    """An IDX array: magic 0x0000 TT DD (type, number of dimensions), DD big-endian uint32 sizes, data."""
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise DataError(f"{name}: not an IDX file (bad magic number {data[:4].hex()}); is it the right file?")
    dtype, ndim = data[2], data[3]
    if dtype not in IDX_DTYPES:
        raise DataError(f"{name}: unknown IDX data type 0x{dtype:02x}")
    if ndim != expect_ndim:
        raise DataError(f"{name}: expected an IDX file of {expect_ndim} dimensions, got {ndim} "
                        f"(magic {data[:4].hex()}); are images and labels swapped?")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"{name}: truncated IDX header")
    shape = tuple(int(v) for v in np.frombuffer(data, ">u4", ndim, 4))
    dt = np.dtype(IDX_DTYPES[dtype])
    expected = int(np.prod(shape)) * dt.itemsize
    if len(data) - header != expected:
        raise DataError(f"{name}: IDX header says {shape} ({expected} bytes) but the file holds "
                        f"{len(data) - header} bytes; the file is truncated or corrupt, download it again")
    return np.frombuffer(data, dt, offset=header).reshape(shape)


class _CifarUnpickler(pickle.Unpickler):
    """Admits only what the real CIFAR pickles contain: dicts, lists, strings, bytes, ints and numpy
    arrays. Anything else (a crafted pickle that would call os.system, say) is refused."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
               ("numpy._core.multiarray", "scalar"), ("_codecs", "encode")}

    def __init__(self, data, name):
        super().__init__(io.BytesIO(data), encoding="bytes")
        self.name = name

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise DataError(f"{self.name}: refused to unpickle {module}.{name}: not part of a CIFAR file "
                        "(the file may be malicious); use the official cifar-100-python archive")


def load_cifar_pickle(data: bytes, name: str) -> dict:
    try:
        obj = _CifarUnpickler(data, name).load()
    except DataError:
        raise
    except Exception as e:  # pickle raises many types on corrupt input
        raise DataError(f"{name}: not a readable CIFAR pickle ({type(e).__name__}: {e})") from None
    if not isinstance(obj, dict):
        raise DataError(f"{name}: expected a dict in the CIFAR pickle, got {type(obj).__name__}")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in obj.items()}


def cifar_split(obj: dict, name: str, classes: tuple[int, int]):
    """(images (N, 3, 32, 32) uint8, fine (N,), coarse (N,)) from a CIFAR-100 train/test dict.

    The rows are channel-planar: 1024 red, then 1024 green, then 1024 blue values, each plane row by
    row, so (N, 3072) reshapes straight to (N, 3, 32, 32).
    """
    for key in ("data", "fine_labels", "coarse_labels"):
        if key not in obj:
            raise DataError(f"{name}: missing key {key!r}; not a CIFAR-100 train/test file")
    data = np.asarray(obj["data"])
    if data.ndim != 2 or data.shape[1] != 3072 or data.dtype != np.uint8:
        raise DataError(f"{name}: 'data' must be uint8 (N, 3072), got {data.dtype} {data.shape}")
    images = data.reshape(-1, 3, 32, 32)
    labels = []
    for key, k in zip(("fine_labels", "coarse_labels"), classes):
        y = np.asarray(obj[key], dtype=np.int64)
        if y.shape != (len(images),):
            raise DataError(f"{name}: {len(images)} images but {y.size} {key}")
        check_labels(y, k, f"{name} {key}")
        labels.append(y)
    return images, labels[0], labels[1]


def check_labels(y: np.ndarray, num_classes: int, name: str):
    if y.size and (y.min() < 0 or y.max() >= num_classes):
        bad = int(y[(y < 0) | (y >= num_classes)][0])
        raise DataError(f"{name}: label {bad} out of range [0, {num_classes}); the file is corrupt")


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def file_digest(path: Path, algorithm: str = "sha256") -> str:
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()

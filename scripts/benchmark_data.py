"""Data benchmarks: preparing the real MNIST, reading shards with and without compression, and
streaming normalised (MNIST) and augmented (CIFAR-shaped) batches of 64 through one worker's Loader.

    python scripts/benchmark_data.py --source ../shared/data/mnist [--out benchmarks/data.json]
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np


from distnn._io import atomic_write_text

from distnn.data import Loader, open_dataset, prepare
from distnn.data.writer import FORMAT_VERSION, _write


def stream(loader, seconds=3.0):
    n, start, epoch = 0, time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
        for x, y in loader.epoch(epoch):
            n += len(y)
            if time.perf_counter() - start > seconds:
                break
        epoch += 1
    return n / (time.perf_counter() - start)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--source", required=True, help="folder with the real MNIST files")
    ap.add_argument("--out", default="benchmarks/data.json")
    args = ap.parse_args(argv)
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        t = time.perf_counter()
        path = prepare("mnist", out=tmp / "ds", source=args.source, shards=8, progress=False, log=lambda *a: None)
        rows["prepare_mnist_s"] = round(time.perf_counter() - t, 2)
        ds = open_dataset(path)
        rows["mnist_mean"], rows["mnist_std"] = round(ds.manifest["mean"][0], 4), round(ds.manifest["std"][0], 4)

        # reading one worker's part (of 2) into memory, by compression
        x_all, y_all = ds.read("train", ds.part("train", 0, 1))
        for comp in (None, "lzf", "gzip"):
            folder = tmp / f"c-{comp}"
            folder.mkdir()
            _write(folder, "mnist", {"train": (x_all, {"labels": y_all.astype(np.uint8)}),
                                     "test": (x_all[:10], {"labels": y_all[:10].astype(np.uint8)})},
                   {"labels": [str(i) for i in range(10)]}, {}, 8, comp, False)
            size = sum(f.stat().st_size for f in folder.glob("train-*.h5"))
            t = time.perf_counter()
            for f in sorted(folder.glob("train-*.h5")):
                with h5py.File(f) as h:
                    h["images"][:]
            rows[f"read_train_{comp or 'none'}_s"] = round(time.perf_counter() - t, 3)
            rows[f"size_train_{comp or 'none'}_mb"] = round(size / 2 ** 20, 1)

        loader = Loader(ds, "train", 0, 2, batch_size=64, seed=0)
        _ = loader.data
        rows["mnist_batch64_images_per_s"] = round(stream(loader))

        # CIFAR-shaped: 3x32x32 uint8, augmented
        rng = np.random.default_rng(0)
        images = rng.integers(0, 256, (20000, 3, 32, 32), dtype=np.uint8)
        labels = rng.integers(0, 100, 20000)
        folder = tmp / "cifar100"
        folder.mkdir()
        manifest = _write(folder, "cifar100", {"train": (images, {"fine_labels": labels.astype(np.uint8)}),
                                               "test": (images[:100], {"fine_labels": labels[:100].astype(np.uint8)})},
                          {"fine_labels": [str(i) for i in range(100)]}, {}, 8, None, False)
        assert manifest["format_version"] == FORMAT_VERSION
        loader = Loader(folder, "train", 0, 1, batch_size=64, seed=0)
        assert loader.augment
        _ = loader.data
        rows["cifar_augmented_batch64_images_per_s"] = round(stream(loader))
    print(f"{'measure':<40}{'value':>12}")
    for k, v in rows.items():
        print(f"{k:<40}{v:>12}")
    rows["command"] = "python scripts/benchmark_data.py " + " ".join(sys.argv[1:] if argv is None else argv)
    out = Path(args.out)
    atomic_write_text(out, json.dumps(rows, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

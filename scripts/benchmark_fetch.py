"""Shards that travel (``data.fetch``), measured: (1) the rate at which a machine that lacks the dataset
gets its shards, on two emulated machines (``distnn.testbed``; machine 1's view of the file system
hides the dataset folder) joined by a link of ``--rate``, beside that rate; (2) with the data present,
the start of a run against another tree of distnn (``--baseline``, e.g. a git worktree of the commit
before shards travelled), alternating, on a local Ray cluster. Generated uint8 images in the real
shard format; needs root for (1).

    sudo python scripts/benchmark_fetch.py [--mb 50] [--rate 1gbit] [--repeat 3]
        [--baseline /tmp/distnn-before --pairs 5] [--out benchmarks/fetch.json]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from distnn import testbed
from distnn._hardware import describe as describe_host
from distnn._io import atomic_write_text
from distnn.data import prepare_from


def images(folder: Path, mb: float) -> Path:
    """A prepared dataset of random 28x28 images whose 8 train shards hold 2 x ``mb`` MB: worker 1 of 2
    reads half of them."""
    rng = np.random.default_rng(0)
    n = int(2 * mb * 1e6 / 784)
    file = folder / "noise.npz"
    np.savez(file, x=rng.integers(0, 256, (n, 28, 28), np.uint8), y=rng.integers(0, 10, n),
             x_test=rng.integers(0, 256, (512, 28, 28), np.uint8), y_test=rng.integers(0, 10, 512))
    path = prepare_from("npz", file, "noise", out=folder / "datasets", shards=8, progress=False, log=lambda *a: None)
    file.unlink()
    return path


def train_args(data: Path, out: Path, *extra) -> list:
    return [sys.executable, "-m", "distnn.cli", "train", "--model", "mlp", "--dataset", str(data), "--workers", "2",
            "--batch-size", "32", "--max-steps", "1", "--epochs", "1", "--out", str(out), "--overwrite", "remove",
            "--quiet", *extra]


def fetch_rates(data: Path, tmp: Path, rate: str, repeat: int) -> list[dict]:
    rows = []
    with testbed.Machines(2, rate=rate, hide={1: [data.parent]}) as m:
        for i in range(repeat):
            shutil.rmtree(m.cache(1), ignore_errors=True)
            out = tmp / f"fetch-{i}"
            done = m.run(0, train_args(data, out, "--address", m.address), timeout=900)
            if done.returncode != 0:
                raise RuntimeError(f"the run failed: {done.stderr[-2000:]}")
            [f] = json.loads((out / "summary.json").read_text())["data_fetched"]
            link = testbed.parse_rate(rate) / 8
            rows.append({"rate": rate, "bytes": f["bytes"], "seconds": round(f["seconds"], 3),
                         "MB_per_s": round(f["bytes"] / f["seconds"] / 1e6, 1),
                         "of_link": round(f["bytes"] / f["seconds"] / link, 3)})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def start_times(data: Path, tmp: Path, baseline: str, pairs: int) -> list[dict]:
    """Alternating runs of this tree and ``baseline`` (--max-steps 1 on a local cluster, the data present):
    the wall time of each process."""
    rows = []
    for i in range(pairs):
        for who, tree in (("this tree", None), ("baseline", baseline)):
            env = dict(os.environ, PYTHONPATH=tree) if tree else {k: v for k, v in os.environ.items()
                                                                 if k != "PYTHONPATH"}
            start = time.perf_counter()
            done = subprocess.run(train_args(data, tmp / f"start-{who}-{i}", "--address", "local"), env=env,
                                  capture_output=True, text=True, timeout=600)
            if done.returncode != 0:
                raise RuntimeError(f"the run ({who}) failed: {done.stderr[-2000:]}")
            rows.append({"who": who, "pair": i, "wall_s": round(time.perf_counter() - start, 3)})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mb", type=float, default=50.0, help="MB of shards machine 1 fetches")
    ap.add_argument("--rate", default="1gbit")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--baseline", help="a tree of distnn to compare the start of a run with (PYTHONPATH)")
    ap.add_argument("--pairs", type=int, default=5)
    ap.add_argument("--out", default="benchmarks/fetch.json")
    args = ap.parse_args(argv)
    host = describe_host()
    print(f"host: {host}", flush=True)
    result = {"host": host, "date": time.strftime("%Y-%m-%d"), "fetch": [], "start": []}
    with tempfile.TemporaryDirectory(prefix="distnn-fetch-") as tmp:
        tmp = Path(tmp)
        data = images(tmp, args.mb)
        why = testbed.unavailable()
        if why:
            print(f"fetch rates left out: {why}")
        else:
            result["fetch"] = fetch_rates(data, tmp, args.rate, args.repeat)
        if args.baseline:
            result["start"] = start_times(data, tmp, args.baseline, args.pairs)
    atomic_write_text(args.out, json.dumps(result, indent=1))
    if result["fetch"]:
        print(f"\n{'rate':8} {'MB':>7} {'s':>7} {'MB/s':>7} {'of link':>8}")
        for r in result["fetch"]:
            print(f"{r['rate']:8} {r['bytes'] / 1e6:7.1f} {r['seconds']:7.3f} {r['MB_per_s']:7.1f} {r['of_link']:8.1%}")
    if result["start"]:
        print(f"\n{'who':10} {'median wall s':>14} {'runs':>30}")
        for who in ("this tree", "baseline"):
            walls = [r["wall_s"] for r in result["start"] if r["who"] == who]
            print(f"{who:10} {statistics.median(walls):14.3f} {' '.join(f'{w:.2f}' for w in walls):>30}")
    print(f"written {args.out}")


if __name__ == "__main__":
    main()

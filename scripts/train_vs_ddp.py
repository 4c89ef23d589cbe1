"""The default training against its PyTorch DDP twin on this machine: ``distnn train`` (the default
recipe, Ray workers) and ``scripts/ddp_twin.py`` with as many ranks of 1 thread over gloo on loopback,
the same shards, network and recipe, alternating ``--pairs`` times. Training seconds are the training
loop's on both sides (distnn's ``summary.json`` leaves its evaluations out; the twin evaluates after
its clock). Prints a table and writes JSON. PyTorch is optional: without it, distnn's runs only.

    python scripts/train_vs_ddp.py --source ../shared/data/mnist | --data DATASET [--model lenet5]
                                   [--epochs 3] [--workers 2] [--pairs 3] [--out benchmarks/train_vs_ddp.json]
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

from distnn._hardware import describe as describe_host
from distnn._io import atomic_write_text

HERE = Path(__file__).resolve().parent
DEADLINE = 3600.0   # seconds any one run may take


def distnn_run(folder: Path, args, k: int) -> dict:
    out = folder / f"run{k}"
    data = ["--source", args.source] if args.source else ["--dataset", args.data]
    subprocess.run([sys.executable, "-c", "import sys; from distnn.cli import main; sys.exit(main())", "train", *data,
                    "--model", args.model, "--epochs", str(args.epochs), "--workers", str(args.workers),
                    "--out", str(out), "--quiet"], cwd=folder, check=True, timeout=DEADLINE)
    summary = json.loads((out / "summary.json").read_text())
    return {"train_seconds": summary["train_seconds"], "test_accuracy": summary["final"]["test_accuracy"]}


def ddp_run(folder: Path, args) -> dict:
    with socket.socket() as s:   # a free port for rank 0
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo"}
    common = ["--world", str(args.workers), "--master", f"127.0.0.1:{port}",
              "--data", args.data or str(folder / "datasets" / "mnist"),
              "--model", args.model, "--epochs", str(args.epochs)]
    ranks = [subprocess.Popen([sys.executable, str(HERE / "ddp_twin.py"), "--rank", str(r), *common],
                              stdout=subprocess.PIPE, text=True, env=env) for r in range(args.workers)]
    try:
        outputs = [p.communicate(timeout=DEADLINE)[0] for p in ranks]
    finally:
        for p in ranks:
            p.kill()
    if any(p.returncode for p in ranks):
        raise SystemExit(f"the DDP twin failed (exit codes {[p.returncode for p in ranks]})")
    result = json.loads(outputs[0].strip().splitlines()[-1])
    return {"train_seconds": result["train_seconds"], "test_accuracy": result["test_accuracy"]}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    given = ap.add_mutually_exclusive_group(required=True)
    given.add_argument("--source", help="the raw MNIST files (IDX, .gz), prepared in a temporary folder")
    given.add_argument("--data", help="a prepared dataset folder")
    ap.add_argument("--model", default="lenet5")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--workers", type=int, default=2, help="distnn's workers and the twin's ranks")
    ap.add_argument("--pairs", type=int, default=3)
    ap.add_argument("--no-ddp", action="store_true")
    ap.add_argument("--out", default="benchmarks/train_vs_ddp.json")
    args = ap.parse_args(argv)
    args.source = args.source and str(Path(args.source).resolve())
    args.data = args.data and str(Path(args.data).resolve())
    ddp = not args.no_ddp
    if ddp and importlib.util.find_spec("torch") is None:
        print("PyTorch is not installed: distnn's runs only (pip install torch==2.13.0)")
        ddp = False
    rows = []
    with tempfile.TemporaryDirectory(prefix="distnn-vs-ddp-") as tmp:
        folder = Path(tmp)
        for k in range(args.pairs):
            row = {"distnn": distnn_run(folder, args, k)}
            if ddp:
                row["ddp"] = ddp_run(folder, args)
            rows.append(row)
            print(json.dumps(row), flush=True)
    host = describe_host()
    print(f"CPU: {host['cpu']}; BLAS: {host['blas']}; {args.model}, {args.epochs} epochs, {args.workers} workers")
    print(f"{'pair':<6}{'distnn s':>10}{'acc':>8}{'DDP s':>9}{'acc':>8}{'ratio':>7}")
    for k, row in enumerate(rows, 1):
        d, t = row["distnn"], row.get("ddp")
        print(f"{k:<6}{d['train_seconds']:>10.2f}{d['test_accuracy']:>8.4f}" + (
            f"{t['train_seconds']:>9.2f}{t['test_accuracy']:>8.4f}{d['train_seconds'] / t['train_seconds']:>7.2f}"
            if t else ""))
    atomic_write_text(Path(args.out), json.dumps({"benchmark": "train_vs_ddp", "host": host, "model": args.model,
                                                  "epochs": args.epochs, "workers": args.workers, "rows": rows,
                                                  "command": "python scripts/train_vs_ddp.py " + " ".join(
                                                      argv if argv is not None else sys.argv[1:])}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

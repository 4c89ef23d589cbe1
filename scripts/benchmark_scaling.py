"""Scaling benchmark: training throughput of the local backend (1 worker x 1 thread) against Ray sync
(N workers x 1 thread), with a per-step breakdown, and PyTorch with N threads at the same global batch.

    python scripts/benchmark_scaling.py --source ../shared/data/mnist [--workers 2] [--out benchmarks/scaling.json]

lenet5 runs on the real MNIST (batch 128 per worker); cifar_convnet and resnet20 on generated
CIFAR-shaped data (batch 64 per worker), since no real CIFAR-100 is reachable offline.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from distnn._io import atomic_write_text  # noqa: E402

from distnn.config import TrainConfig  # noqa: E402
from distnn.data import prepare  # noqa: E402
from distnn.data.writer import _write  # noqa: E402
from distnn.train import Trainer  # noqa: E402

CASES = {"lenet5": {"dataset": "mnist", "batch_size": 128, "steps": 600},
         "cifar_convnet": {"dataset": "cifar100", "batch_size": 64, "steps": 40},
         "resnet20": {"dataset": "cifar100", "batch_size": 64, "steps": 30}}


def fake_cifar(root: Path, n=8192):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8)
    fine = rng.integers(0, 100, n)
    folder = root / "cifar100"
    folder.mkdir(parents=True)
    labels = {"fine_labels": fine.astype(np.uint8), "coarse_labels": (fine // 5).astype(np.uint8)}
    _write(folder, "cifar100", {"train": (images, labels), "test": (images[:256], {k: v[:256] for k, v in labels.items()})},
           {"fine_labels": [str(i) for i in range(100)], "coarse_labels": [str(i) for i in range(20)]}, {}, 8, None, False)


def run(model, case, data, backend, workers, out, backend_obj=None):
    cfg = TrainConfig(model=model, dataset=case["dataset"], labels="coarse" if case["dataset"] == "cifar100" else None,
                      data=str(data), workers=workers, backend=backend, batch_size=case["batch_size"], epochs=100,
                      max_steps=case["steps"], out=str(out), log_every=1000, warmup=0).validate()
    trainer = Trainer(cfg, backend=backend_obj, log=lambda *a: None, progress=False)
    try:
        summary = trainer.run()
    finally:
        trainer.close()
    samples = summary["steps"] * case["batch_size"] * workers
    return {"samples_per_s": round(samples / summary["train_seconds"], 1), **summary["per_step_ms"]}


def torch_rate(model, global_batch, threads, seconds=4.0):
    try:
        import torch
    except ImportError:
        return None
    from scripts.benchmark_core import measure, torch_stepper
    torch.set_num_threads(threads)
    return round(measure(torch_stepper(model, global_batch), global_batch, seconds), 1)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--source", required=True, help="folder with the real MNIST files")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--models", nargs="+", default=list(CASES), choices=list(CASES))
    ap.add_argument("--out", default="benchmarks/scaling.json")
    args = ap.parse_args(argv)
    from distnn.parallel import RayBackend
    ray = RayBackend(num_cpus=os.cpu_count())
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        prepare("mnist", out=tmp, source=args.source, progress=False, log=lambda *a: None)
        fake_cifar(tmp)
        for model in args.models:
            case = CASES[model]
            local = run(model, case, tmp, "local", 1, tmp / f"{model}-local")
            dist = run(model, case, tmp, "ray", args.workers, tmp / f"{model}-ray", ray)
            ref = torch_rate(model, case["batch_size"] * args.workers, args.workers)
            rows.append({"model": model, "batch_per_worker": case["batch_size"], "local_1x1": local,
                         f"ray_{args.workers}x1": dist, "speedup": round(dist["samples_per_s"] / local["samples_per_s"], 2),
                         f"torch_{args.workers}_threads": ref,
                         "ray_vs_torch": None if ref is None else round(dist["samples_per_s"] / ref, 2)})
    ray.shutdown()
    print(f"{'model':<15}{'local 1x1':>11}{f'ray {args.workers}x1':>10}{'speedup':>9}{'torch':>9}{'vs torch':>9}"
          f"   ray step ms: total / compute / server / wait+transfer")
    for r in rows:
        d = r[f"ray_{args.workers}x1"]
        t = r[f"torch_{args.workers}_threads"]
        ts = "-" if t is None else f"{t:.0f}"
        vs = "-" if t is None else f"{r['ray_vs_torch']:.2f}"
        print(f"{r['model']:<15}{r['local_1x1']['samples_per_s']:>11.0f}{d['samples_per_s']:>10.0f}{r['speedup']:>9.2f}"
              f"{ts:>9}{vs:>9}"
              f"   {d['total']} / {d['compute']} / {d['server_update']} / {d['wait_and_transfer']}")
    out = Path(args.out)
    result = {"rows": rows, "cpus": os.cpu_count(),
              "command": "python scripts/benchmark_scaling.py " + " ".join(sys.argv[1:] if argv is None else argv)}
    atomic_write_text(out, json.dumps(result, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

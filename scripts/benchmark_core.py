"""Training-step throughput of the zoo models: forward + backward + Adam step, float32.

For each model, batch size and BLAS thread count, times steps on random inputs of the model's shape
and reports samples/s (median of several timed rounds). When PyTorch is installed, the same
architectures are timed in PyTorch with the same shapes and threads, and the ratio distnn / PyTorch is
reported. Peak resident memory of a distnn cifar_convnet step at batch 256 is measured in a fresh
process. Prints a table and writes JSON.

    python scripts/benchmark_core.py [--models mlp lenet5 ...] [--batches 64 256] [--threads 1 2]
                                     [--seconds 3] [--out benchmarks/core.json] [--no-torch]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from threadpoolctl import threadpool_limits

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from distnn._io import atomic_write_text  # noqa: E402
from distnn._hardware import describe as describe_host  # noqa: E402

from distnn import ops, tune_allocator  # noqa: E402
from distnn.interchange import torch_twin  # noqa: E402
from distnn.models import ZOO, build_model, input_shape  # noqa: E402
from distnn.optim import Adam  # noqa: E402

MODELS = list(ZOO)


def spec_for(name):
    return {"model": name, "num_classes": 20 if name == "cifar_convnet" else 10, "seed": 0}  # resnet20: CIFAR-10


def batch(name, n, rng):
    x = rng.standard_normal((n, *input_shape(spec_for(name)))).astype(np.float32)
    y = rng.integers(0, spec_for(name)["num_classes"], n)
    return x, y


def distnn_stepper(name, n):
    model = build_model(spec_for(name))
    opt = Adam(model.flat_params.size, lr=1e-3)
    x, y = batch(name, n, np.random.default_rng(0))

    def step():
        model.zero_grad()
        loss = ops.softmax_cross_entropy(model(x), y)
        loss.backward()
        opt.step(model.flat_params, model.flat_grads)
    return step


def torch_stepper(name, n):
    import torch
    from torch import nn

    net = torch_twin(spec_for(name))
    net.train()
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    x, y = batch(name, n, np.random.default_rng(0))
    x, y = torch.from_numpy(x), torch.from_numpy(y)
    loss_fn = nn.CrossEntropyLoss()

    def step():
        opt.zero_grad(set_to_none=False)
        loss_fn(net(x), y).backward()
        opt.step()
    return step


def measure(step, n, seconds):
    step()
    step()  # warm up: first calls allocate
    rounds = []
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline or len(rounds) < 3:
        t = time.perf_counter()
        reps = 0
        while time.perf_counter() - t < seconds / 5 or reps == 0:
            step()
            reps += 1
        rounds.append(reps * n / (time.perf_counter() - t))
    return float(np.median(rounds))


def peak_memory_mb(name, n):
    """Peak RSS of a fresh process that builds the model and runs 3 training steps."""
    code = (f"import sys, resource; sys.path.insert(0, {str(Path(__file__).resolve().parents[1])!r});"
            f"from scripts.benchmark_core import distnn_stepper, tune_allocator; tune_allocator();"
            f"s = distnn_stepper({name!r}, {n});"
            "[s() for _ in range(3)];"
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=MODELS, choices=MODELS)
    ap.add_argument("--batches", nargs="+", type=int, default=[64, 256])
    ap.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    ap.add_argument("--seconds", type=float, default=3.0, help="time per measurement")
    ap.add_argument("--out", default="benchmarks/core.json")
    ap.add_argument("--no-torch", action="store_true", help="skip the PyTorch reference")
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    args = ap.parse_args(argv)
    tune_allocator()  # as the distnn command and its workers run

    torch = None
    if not args.no_torch:
        try:
            import torch
        except ImportError:
            print("PyTorch not installed: distnn only (pip install torch==2.13.0 for the reference)")

    rows = []
    host = describe_host()
    print(f"CPU: {host['cpu']}, L2 {host['l2_bytes'] >> 10} kB per core; BLAS: {host['blas']}")
    header = f"{'model':<16}{'batch':>6}{'threads':>8}{'distnn/s':>11}{'torch/s':>10}{'ratio':>7}"
    print(header)
    print("-" * len(header))
    for name in args.models:
        for n in args.batches:
            for threads in args.threads:
                with threadpool_limits(limits=threads, user_api="blas"):
                    ours = measure(distnn_stepper(name, n), n, args.seconds)
                ref = None
                if torch is not None:
                    torch.set_num_threads(threads)
                    ref = measure(torch_stepper(name, n), n, args.seconds)
                row = {"model": name, "batch": n, "threads": threads, "distnn_samples_per_s": round(ours, 1),
                       "torch_samples_per_s": None if ref is None else round(ref, 1),
                       "ratio": None if ref is None else round(ours / ref, 3)}
                rows.append(row)
                print(f"{name:<16}{n:>6}{threads:>8}{ours:>11.0f}"
                      f"{'-' if ref is None else f'{ref:.0f}':>10}{'-' if ref is None else f'{ours / ref:.2f}':>7}",
                      flush=True)
    result = {"benchmark": "core", "host": host, "rows": rows, "python": platform.python_version(), "numpy": np.__version__,
              "torch": None if torch is None else torch.__version__, "cpus": os.cpu_count(),
              "command": "python scripts/benchmark_core.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    if not args.no_memory and "cifar_convnet" in args.models:
        result["cifar_convnet_batch256_peak_rss_mb"] = round(peak_memory_mb("cifar_convnet", 256), 1)
        print(f"cifar_convnet batch 256 peak resident memory: {result['cifar_convnet_batch256_peak_rss_mb']:.0f} MB")
    out = Path(args.out)
    atomic_write_text(out, json.dumps(result, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

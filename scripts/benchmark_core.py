"""Training-step throughput of the zoo models: forward + backward + Adam step, float32.

For each model, batch size and BLAS thread count, times steps on random inputs of the model's shape
and reports samples/s. When PyTorch is installed, the same architectures are timed in PyTorch with the
same shapes and threads, in turns with distnn (``measure_alternating``: the best of six rounds each),
and the ratio distnn / PyTorch is reported. Each row also gives the step's GFLOP/s (from the model's
multiply-adds) beside this core's sgemm rate measured in the same run, and the convolution algorithm
of each conv layer. Peak resident memory of a distnn cifar_convnet step at batch 256 is measured in
a fresh process. Prints a table and writes JSON. DISTNN_KERNELS=numpy times the numpy reference
kernels.

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


from distnn._io import atomic_write_text
from distnn._hardware import describe as describe_host

from distnn import kernels, ops, tune_allocator
from distnn.interchange import torch_twin
from distnn.models import ZOO, build_model, input_shape
from distnn.ops import conv_choice
from distnn.optim import Adam

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


def forward_macs(x, w, y, kind):
    """Multiply-adds of one operator call from its input, weight and output shapes."""
    if kind == "Conv2d":                       # (N, O, Ho, Wo) outputs, each C * kh * kw products
        return int(np.prod(y.shape)) * int(np.prod(w.shape[1:]))
    if kind in ("Linear", "MatMul"):           # (..., K) @ (K, M) or x (..., in) with w (out, in)
        return int(np.prod(x.shape[:-1])) * int(np.prod(w.shape))
    return int(np.prod(y.shape[:-1])) * int(np.prod(w.shape))   # recurrent: (..., H) outputs, each w (G, H or F)


WEIGHTS_AT = {"RNNCell": (2,), "LSTMCell": (3,), "LSTMSequence": (3, 4)}   # the weights' positions among the inputs


def forward_macs_per_sample(name, n=8):
    """Multiply-adds of one sample's forward pass of a zoo model, from one forward pass in evaluation
    mode with the operators watched (after one unwatched pass, in which the convolutions choose their
    algorithm)."""
    from distnn.autograd import eval_mode, no_grad
    model, x = build_model(spec_for(name)), batch(name, n, np.random.default_rng(0))[0]
    with eval_mode(), no_grad():
        model(x)
    classes = {"Conv2d": ops.conv.Conv2d, "Linear": ops.basic.Linear, "MatMul": ops.basic.MatMul,
               "RNNCell": ops.recurrent.RNNCell, "LSTMCell": ops.recurrent.LSTMCell,
               "LSTMSequence": ops.recurrent.LSTMSequence}
    macs, saved = [0], {}
    for kind, cls in classes.items():
        def forward(self, *arrays, _kind=kind, _inner=cls.forward):
            y = _inner(self, *arrays)
            out = y[0] if isinstance(y, tuple) else y
            for k in WEIGHTS_AT.get(_kind, (1,)):
                w = arrays[k]
                macs[0] += forward_macs(arrays[0], w.T if _kind == "MatMul" else w, out, _kind)
            return y
        saved[cls] = cls.forward
        cls.forward = forward
    try:
        with eval_mode(), no_grad():
            model(x)
    finally:
        for cls, fn in saved.items():
            cls.forward = fn
    return macs[0] / n


def sgemm_gflops(threads: int, size: int = 1024) -> float:
    """This core's (or these cores') float32 matrix-product rate: the best of several
    (size x size) @ (size x size) products in numpy."""
    rng = np.random.default_rng(0)
    a, b = (rng.standard_normal((size, size)).astype(np.float32) for _ in range(2))
    out = np.empty_like(a)
    best = float("inf")
    with threadpool_limits(limits=threads, user_api="blas"):
        np.matmul(a, b, out=out)
        for _ in range(10):
            t = time.perf_counter()
            np.matmul(a, b, out=out)
            best = min(best, time.perf_counter() - t)
    return 2 * size ** 3 / best / 1e9


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


def measure_alternating(steps: dict, n: int, seconds: float, rounds: int = 6) -> dict:
    """Samples/s of each step function in ``steps`` (name -> step of batch ``n``), timed in turns:
    every round gives each one ``seconds / rounds`` of steps, one after the other, and each keeps its
    best round. A neighbour that slows the host for a while then slows every contender's rounds
    alike, and the best round is the least disturbed one: on a shared host the ratio of two rates
    holds far better than that of two medians taken seconds apart."""
    for step in steps.values():
        step()
        step()  # warm up: first calls allocate (and calibrate)
    best = dict.fromkeys(steps, 0.0)
    for _ in range(rounds):
        for name, step in steps.items():
            t, reps = time.perf_counter(), 0
            while time.perf_counter() - t < seconds / rounds or reps == 0:
                step()
                reps += 1
            best[name] = max(best[name], reps * n / (time.perf_counter() - t))
    return best


def on_numpy_kernels(step):
    """``step`` run with the numpy reference kernels (DISTNN_KERNELS=numpy) for its duration."""
    def run():
        kernels.use("numpy")
        try:
            step()
        finally:
            kernels.use(None)
    return run


def peak_memory_mb(name, n):
    """Peak RSS of a fresh process that builds the model and runs 3 training steps."""
    code = (f"import sys, resource; sys.path.insert(0, {str(Path(__file__).resolve().parent)!r});"
            f"from benchmark_core import distnn_stepper, tune_allocator; tune_allocator();"
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
    ap.add_argument("--ab-kernels", action="store_true",
                    help="also time each row on the numpy reference kernels (DISTNN_KERNELS=numpy), right after")
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
    sgemm = {t: sgemm_gflops(t) for t in args.threads}
    print(f"CPU: {host['cpu']}, L2 {host['l2_bytes'] >> 10} kB per core; BLAS: {host['blas']}; kernels: "
          f"{kernels.mode()}; sgemm 1024^3: " + ", ".join(f"{g:.0f} GFLOP/s on {t} thread(s)" for t, g in sgemm.items()))
    print("step GFLOP/s = 6 x forward multiply-adds x samples/s (2 FLOPs per multiply-add, backward twice the "
          "forward); eff = that / sgemm")
    header = (f"{'model':<16}{'batch':>6}{'threads':>8}{'distnn/s':>11}{'torch/s':>10}{'ratio':>7}"
              f"{'GFLOP/s':>9}{'eff':>6}{'torch eff':>10}  conv algorithm per layer shape (forward/input grad/weight grad)")
    print(header)
    print("-" * len(header))
    for name in args.models:
        macs = forward_macs_per_sample(name)
        for n in args.batches:
            for threads in args.threads:
                steps = {"distnn": distnn_stepper(name, n)}
                with threadpool_limits(limits=threads, user_api="blas"), conv_choice.recording() as layers:
                    steps["distnn"]()   # the first step calibrates the convolutions: recorded here
                if args.ab_kernels:
                    steps["numpy"] = on_numpy_kernels(distnn_stepper(name, n))
                if torch is not None:
                    torch.set_num_threads(threads)
                    steps["torch"] = torch_stepper(name, n)
                with threadpool_limits(limits=threads, user_api="blas"):
                    rates = measure_alternating(steps, n, args.seconds)
                ours, ref, reference = rates["distnn"], rates.get("torch"), rates.get("numpy")
                algorithms = sorted(c if isinstance(c, str) else "/".join(c[s] for s in conv_choice.STEPS)
                                    for c in layers.values())
                convs = ", ".join(f"{a} x{algorithms.count(a)}" for a in sorted(set(algorithms))) or "-"
                gflops = 6 * macs * ours / 1e9
                row = {"model": name, "batch": n, "threads": threads, "distnn_samples_per_s": round(ours, 1),
                       "torch_samples_per_s": None if ref is None else round(ref, 1),
                       "ratio": None if ref is None else round(ours / ref, 3), "forward_macs_per_sample": macs,
                       "step_gflops": round(gflops, 2), "sgemm_gflops": round(sgemm[threads], 1),
                       "efficiency": round(gflops / sgemm[threads], 3),
                       "torch_efficiency": None if ref is None else round(6 * macs * ref / 1e9 / sgemm[threads], 3),
                       "convolutions": layers, "numpy_kernels_samples_per_s": reference}
                rows.append(row)
                print(f"{name:<16}{n:>6}{threads:>8}{ours:>11.0f}"
                      f"{'-' if ref is None else f'{ref:.0f}':>10}{'-' if ref is None else f'{ours / ref:.2f}':>7}"
                      f"{gflops:>9.1f}{row['efficiency']:>6.0%}"
                      f"{'-' if ref is None else format(row['torch_efficiency'], '.0%'):>10}  {convs}"
                      + ("" if reference is None else f"; numpy kernels {reference:.0f}/s ({ours / reference:.2f}x)"),
                      flush=True)
    result = {"benchmark": "core", "host": host, "kernels": kernels.mode(), "sgemm_gflops": sgemm, "rows": rows,
              "python": platform.python_version(), "numpy": np.__version__,
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

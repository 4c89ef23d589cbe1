"""The compiled kernels against their numpy reference, one operator at a time, in one process:
each case runs on both paths in alternation (``--pairs`` times), the best of ``--repeats`` calls each
time, so that a noisy machine moves both alike. Prints a table and writes JSON.

    python scripts/ab_kernels.py [--batch 64] [--pairs 3] [--out benchmarks/ab_kernels.json]

Cases (float32, one BLAS thread): batch norm + ReLU forward and backward and the residual add + ReLU
on (N, 16, 32, 32) in Winograd's (H, W, N, C) memory, a Winograd F(2x2, 3x3) and F(4x4, 3x3)
convolution (16 -> 16 channels, 32 x 32) forward (its tile transforms compiled or numpy's),
lstm_classifier's recurrence (T = 28, H = 128) forward and backward, and Adam's update of the mlp's
235,146 parameters.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
from threadpoolctl import threadpool_limits


from distnn import kernels, ops, optim
from distnn._hardware import describe as describe_host
from distnn._io import atomic_write_text
from distnn.autograd import Variable, train_mode
from distnn.ops import winograd
from distnn.ops.recurrent import LSTMSequence


def hwnc(rng, n, c, h):
    """Random (N, C, H, W) values laid out (H, W, N, C) in memory, as after a Winograd convolution."""
    return np.ascontiguousarray(rng.standard_normal((h, h, n, c)).astype(np.float32)).transpose(2, 3, 0, 1)


def cases(n: int) -> dict:
    """name -> a function of no arguments that runs the case once on the selected kernels."""
    rng = np.random.default_rng(0)
    x, shortcut = hwnc(rng, n, 16, 32), hwnc(rng, n, 16, 32)
    gamma, beta = rng.uniform(0.5, 2, 16).astype(np.float32), rng.normal(0, 1, 16).astype(np.float32)
    grad = np.ones_like(x)

    def batch_norm_relu():
        with train_mode():
            y = ops.batch_norm(Variable(x, requires_grad=True), Variable(gamma, requires_grad=True),
                               Variable(beta, requires_grad=True), np.zeros(16, np.float32),
                               np.ones(16, np.float32), relu=True)
            y.backward(grad)

    def add_relu():
        y = ops.add_relu(Variable(x, requires_grad=True), Variable(shortcut, requires_grad=True))
        y.backward(grad)

    xh = np.ascontiguousarray(x.transpose(2, 3, 0, 1))   # (H, W, N, C); the padding of 1 is read as zeros
    w = rng.standard_normal((16, 16, 3, 3)).astype(np.float32)

    t, features, hidden = 28, 28, 128
    op = LSTMSequence()
    op.needs_grad = (False, True, True, True, True)
    lstm_inputs = (rng.standard_normal((n, t, features)).astype(np.float32), np.zeros((n, hidden), np.float32),
                   np.zeros((n, hidden), np.float32),
                   *((rng.standard_normal((4 * hidden, k)) * 0.1).astype(np.float32) for k in (features, hidden)))
    op.forward(*lstm_inputs)
    size = 235_146
    params, grads = rng.standard_normal(size).astype(np.float32), rng.standard_normal(size).astype(np.float32)
    adam = optim.Adam(size)
    g_seq, g_last = rng.standard_normal((n, t, hidden)).astype(np.float32), np.zeros((n, hidden), np.float32)
    return {"batch norm + ReLU, forward and backward": batch_norm_relu,
            "residual add + ReLU, forward and backward": add_relu,
            "Winograd F(2x2) 16 -> 16, forward": lambda: winograd.conv3x3(xh, w, (1, 1, 1, 1)),
            "Winograd F(4x4) 16 -> 16, forward": lambda: winograd.conv3x3(xh, w, (1, 1, 1, 1), m=4),
            "LSTM recurrence forward (T 28, H 128)": lambda: LSTMSequence().forward(*lstm_inputs),
            "LSTM recurrence backward (T 28, H 128)": lambda: op.backward(g_seq, g_last, g_last),
            "Adam update, 235,146 parameters": lambda: adam.step(params, grads)}


def best_ms(fn, repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return 1e3 * best


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--pairs", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--out", default="benchmarks/ab_kernels.json")
    args = ap.parse_args(argv)
    host = describe_host()
    print(f"CPU: {host['cpu']}; BLAS: {host['blas']}; batch {args.batch}; ms, best of {args.repeats}, "
          f"{args.pairs} alternating pairs")
    rows = []
    with threadpool_limits(limits=1, user_api="blas"):
        for name, fn in cases(args.batch).items():
            ms = {"numpy": [], "numba": []}
            for _ in range(args.pairs):
                for path in ("numpy", "numba"):
                    kernels.use(path)
                    ms[path].append(round(best_ms(fn, args.repeats), 3))
            kernels.use(None)
            rows.append({"case": name, **ms})
            print(f"{name:<45} numpy {min(ms['numpy']):8.2f}  numba {min(ms['numba']):8.2f}  "
                  f"({min(ms['numpy']) / min(ms['numba']):.2f}x)", flush=True)
    result = {"benchmark": "ab_kernels", "host": host, "batch": args.batch, "rows": rows,
              "command": "python scripts/ab_kernels.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    atomic_write_text(Path(args.out), json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

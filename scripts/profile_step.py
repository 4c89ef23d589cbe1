"""Where a training step's time goes: forward and backward time of every operator class, summed over
one forward + backward + Adam step of a zoo model and averaged over several steps.

    python scripts/profile_step.py cifar_convnet [--batch 64] [--threads 1] [--steps 20]
                                   [--out benchmarks/profile-cifar_convnet.json]

The timer wraps each operator's forward and backward, so the step itself runs a little slower than in
benchmark_core.py; the shares are what this is for. Prints a table and writes JSON.
"""
from __future__ import annotations

import argparse
import collections
import functools
import json
import sys
import time
from pathlib import Path

from threadpoolctl import threadpool_limits


from distnn._io import atomic_write_text
from distnn import ops, tune_allocator
from benchmark_core import MODELS, distnn_stepper


def timed(method, key: str, totals: dict):
    """``method`` that adds the seconds of each call to ``totals[key]``."""
    @functools.wraps(method)
    def run(*args, **kwargs):
        start = time.perf_counter()
        try:
            return method(*args, **kwargs)
        finally:
            totals[key] += time.perf_counter() - start
    return run


def instrument(totals: dict) -> None:
    """Make every operator class add the time of its forward and backward to ``totals``, and the
    parts of a step outside the operators under their own rows: the optimizer's update, zeroing the
    gradients, the engine's topological sort and its accumulation of leaf gradients."""
    from distnn import autograd, optim
    from distnn.nn.module import Module
    for cls in ops.all_operators():
        for name in ("forward", "backward"):
            if name in cls.__dict__:
                setattr(cls, name, timed(cls.__dict__[name], f"{cls.__name__}.{name}", totals))
    for owner, name, key in ((optim.Optimizer, "step", "(optimizer step)"), (Module, "zero_grad", "(zero_grad)"),
                             (autograd, "_topological_order", "(engine: topological sort)"),
                             (autograd, "_accumulate", "(engine: leaf gradients)")):
        setattr(owner, name, timed(getattr(owner, name), key, totals))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", choices=MODELS)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--out", default=None, help="JSON output (default benchmarks/profile-MODEL.json)")
    args = ap.parse_args(argv)
    tune_allocator()  # as the distnn command and its workers run

    totals = collections.defaultdict(float)
    instrument(totals)
    with threadpool_limits(limits=args.threads, user_api="blas"):
        step = distnn_stepper(args.model, args.batch)
        for _ in range(3):  # warm up
            step()
        totals.clear()
        start = time.perf_counter()
        for _ in range(args.steps):
            step()
        step_ms = (time.perf_counter() - start) / args.steps * 1e3
    rows = sorted(((k, v / args.steps * 1e3) for k, v in totals.items()), key=lambda kv: -kv[1])
    ops_ms = sum(ms for _, ms in rows)
    print(f"{args.model}, batch {args.batch}, {args.threads} thread(s): {step_ms:.2f} ms per step")
    print(f"{'operator.method':<32}{'ms':>9}{'share':>8}")
    for key, ms in rows:
        print(f"{key:<32}{ms:>9.2f}{ms / step_ms:>8.1%}")
    print(f"{'(engine: the rest)':<32}{step_ms - ops_ms:>9.2f}{(step_ms - ops_ms) / step_ms:>8.1%}")
    out = Path(args.out or f"benchmarks/profile-{args.model}.json")
    atomic_write_text(out, json.dumps({"model": args.model, "batch": args.batch, "threads": args.threads,
                                       "step_ms": round(step_ms, 3), "ms": {k: round(v, 3) for k, v in rows},
                                       "command": "python scripts/profile_step.py " + " ".join(
                                           sys.argv[1:] if argv is None else argv)}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

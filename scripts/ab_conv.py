"""A zoo model's training step with its convolutions pinned to one algorithm (or to the fixed rule)
against the choices this host's calibration makes, alternating in one process (best of ``--repeats`` steps each time,
``--pairs`` times), so that a noisy machine moves both alike. Prints a table and writes JSON.

    python scripts/ab_conv.py lenet5 [--batch 64] [--baseline im2col] [--pairs 5]
                              [--out benchmarks/ab_conv-lenet5.json]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from threadpoolctl import threadpool_limits

from ab_kernels import best_ms
from benchmark_core import MODELS, distnn_stepper
from distnn import tune_allocator
from distnn._hardware import describe as describe_host
from distnn._io import atomic_write_text
from distnn.ops import conv_choice


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", choices=MODELS)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--baseline", default="im2col", choices=(*conv_choice.ALGORITHMS, "rule"),
                    help="the algorithm every convolution step runs in the baseline ('rule': the fixed rule "
                         "a shape takes where nothing was measured)")
    ap.add_argument("--pairs", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--out", default=None, help="JSON output (default benchmarks/ab_conv-MODEL.json)")
    args = ap.parse_args(argv)
    tune_allocator()
    with threadpool_limits(limits=1, user_api="blas"):
        with conv_choice.recording() as calibrated:
            step = distnn_stepper(args.model, args.batch)
            step()
        baseline = {} if args.baseline == "rule" else {layer: args.baseline for layer in calibrated}
        tables = {"calibrated": dict(calibrated), args.baseline: baseline}   # pinned {}: the fixed rule
        ms = {name: [] for name in tables}
        for _ in range(args.pairs):
            for name, table in tables.items():
                conv_choice.pin(table)
                step = distnn_stepper(args.model, args.batch)   # a new model: the pinned choices apply
                ms[name].append(round(best_ms(step, args.repeats), 3))
        conv_choice.pin(None)
    host = describe_host()
    print(f"CPU: {host['cpu']}; BLAS: {host['blas']}; {args.model}, batch {args.batch}, 1 thread; "
          f"ms per step, best of {args.repeats}, {args.pairs} alternating pairs")
    for layer, choice in calibrated.items():
        print(f"  {layer}: {choice}")
    for name, values in ms.items():
        print(f"{name:<12} best {min(values):8.2f}   all {values}")
    print(f"calibrated / {args.baseline}: {min(ms['calibrated']) / min(ms[args.baseline]):.2f}")
    out = Path(args.out or f"benchmarks/ab_conv-{args.model}.json")
    atomic_write_text(out, json.dumps({"benchmark": "ab_conv", "host": host, "model": args.model,
                                       "batch": args.batch, "choices": calibrated, "ms": ms,
                                       "command": "python scripts/ab_conv.py " + " ".join(
                                           argv if argv is not None else sys.argv[1:])}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

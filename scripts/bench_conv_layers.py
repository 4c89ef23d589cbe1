"""Each convolution layer of a zoo model, forward plus backward (the weight gradient, and the input
gradient where the layer's input needs one), distnn with this host's calibrated algorithms against
PyTorch's conv2d on the same shapes, one thread, alternating, best of ``--repeats`` each time. Prints a
table and writes JSON. PyTorch is optional (``--no-torch``; pip install torch==2.13.0).

    python scripts/bench_conv_layers.py lenet5 [--batch 64] [--pairs 3] [--repeats 10]
                                        [--out benchmarks/conv_layers-lenet5.json]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from threadpoolctl import threadpool_limits

from ab_kernels import best_ms
from benchmark_core import MODELS, batch, spec_for
from distnn import ops, tune_allocator
from distnn._hardware import describe as describe_host
from distnn._io import atomic_write_text
from distnn.autograd import Variable
from distnn.models import build_model
from distnn.ops.conv import Conv2d
from distnn.ops.layout import channels_last_order


def conv_layers(name: str, n: int) -> list[dict]:
    """The convolutions one forward of the model runs: input and weight shapes, the input's memory
    order (``layout.channels_last_order``), bias, stride, padding, whether the input needs a gradient,
    and the algorithms chosen on this host."""
    found, forward = [], Conv2d.forward

    def record(self, x, w, b=None):
        y = forward(self, x, w, b)
        found.append({"x": x.shape, "order": channels_last_order(x), "w": w.shape, "bias": b is not None,
                      "stride": self.stride,
                      "padding": self.padding, "x_grad": bool(self.needs_grad[0]),
                      "choice": self.choice.record()})
        return y
    Conv2d.forward = record
    try:
        build_model(spec_for(name))(batch(name, n, np.random.default_rng(0))[0])
    finally:
        Conv2d.forward = forward
    return found


def distnn_step(layer, rng):
    """Forward and backward of one layer with its input laid out in memory as in the network, and the
    output gradient laid out as the output (as the layer after it gives it back)."""
    x = rng.standard_normal(layer["x"]).astype(np.float32)
    if layer["x_grad"]:   # inside the network a layer's input is channels-last in memory
        order = layer["order"]
        x = np.ascontiguousarray(x.transpose(order)).transpose(np.argsort(order))
    w = rng.standard_normal(layer["w"]).astype(np.float32)
    b = rng.standard_normal(layer["w"][0]).astype(np.float32) if layer["bias"] else None

    def step():
        xv, wv = Variable(x, requires_grad=layer["x_grad"]), Variable(w, requires_grad=True)
        y = ops.conv2d(xv, wv, None if b is None else Variable(b, requires_grad=True), layer["stride"],
                       layer["padding"])
        y.backward(np.ones_like(y.data))
    return step


def torch_step(layer, rng):
    import torch
    x = torch.from_numpy(rng.standard_normal(layer["x"]).astype(np.float32)).requires_grad_(layer["x_grad"])
    w = torch.from_numpy(rng.standard_normal(layer["w"]).astype(np.float32)).requires_grad_(True)
    b = torch.zeros(layer["w"][0], requires_grad=True) if layer["bias"] else None
    padding = layer["padding"] if isinstance(layer["padding"], str) else tuple(np.broadcast_to(layer["padding"], 2))

    def step():
        y = torch.nn.functional.conv2d(x, w, b, layer["stride"], padding)
        y.backward(torch.ones_like(y))
    return step


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", choices=MODELS)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--pairs", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument("--out", default=None, help="JSON output (default benchmarks/conv_layers-MODEL.json)")
    args = ap.parse_args(argv)
    tune_allocator()
    use_torch = not args.no_torch
    if use_torch:
        try:
            import torch
            torch.set_num_threads(1)
        except ImportError:
            print("PyTorch is not installed: distnn's times only (pip install torch==2.13.0)")
            use_torch = False
    rng = np.random.default_rng(0)
    rows = []
    with threadpool_limits(limits=1, user_api="blas"):
        layers = conv_layers(args.model, args.batch)
        for layer in layers:
            steps = {"distnn": distnn_step(layer, rng)}
            if use_torch:
                steps["torch"] = torch_step(layer, rng)
            ms = {who: [] for who in steps}
            for _ in range(args.pairs):
                for who, step in steps.items():
                    ms[who].append(round(best_ms(step, args.repeats), 3))
            rows.append({**{k: (list(v) if isinstance(v, tuple) else v) for k, v in layer.items()}, "ms": ms})
    host = describe_host()
    print(f"CPU: {host['cpu']}; BLAS: {host['blas']}; {args.model}, batch {args.batch}, 1 thread; forward + "
          f"backward, ms, best of {args.repeats}, {args.pairs} alternating pairs")
    print(f"{'input':<18}{'weight':<16}{'x grad':>7}{'distnn':>9}{'torch':>9}{'ratio':>7}  algorithms")
    for r in rows:
        d = min(r["ms"]["distnn"])
        t = min(r["ms"]["torch"]) if "torch" in r["ms"] else None
        print(f"{str(tuple(r['x'])):<18}{str(tuple(r['w'])):<16}{str(r['x_grad']):>7}{d:>9.3f}"
              f"{'-' if t is None else f'{t:.3f}':>9}{'-' if t is None else f'{d / t:.2f}':>7}  {r['choice']}")
    out = Path(args.out or f"benchmarks/conv_layers-{args.model}.json")
    atomic_write_text(out, json.dumps({"benchmark": "conv_layers", "host": host, "model": args.model,
                                       "batch": args.batch, "rows": rows, "command": "python scripts/"
                                       "bench_conv_layers.py " + " ".join(argv if argv is not None else sys.argv[1:])},
                                      indent=2, default=str))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

"""PyTorch reference for the README's accuracy table: LeNet-5 on the prepared MNIST shards with distnn's
default recipe (global batch 128, Adam lr 0.006, 100 warmup steps, cosine decay), N threads. Reports the
test accuracy after each epoch and the wall time to reach a target accuracy; compare with the epoch
lines of a distnn run's metrics.jsonl. Needs PyTorch (pip install torch==2.13.0).

    python scripts/torch_reference.py --data datasets/mnist [--epochs 10] [--threads 2] [--target 0.99]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np


from distnn._io import atomic_write_text
from distnn.data import Loader, open_dataset
from distnn.interchange import torch_twin
from distnn.schedules import make_schedule


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default="datasets/mnist")
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=128, help="global batch")
    ap.add_argument("--lr", type=float, default=0.006)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--target", type=float, default=0.99)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="benchmarks/torch_reference.json")
    args = ap.parse_args(argv)
    import torch
    from torch import nn
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    ds = open_dataset(args.data)
    train = Loader(ds, "train", batch_size=args.batch_size, seed=args.seed, drop_last=True)
    test = Loader(ds, "test", batch_size=1000, shuffle=False)
    net = torch_twin({"model": "lenet5"})
    opt = torch.optim.Adam(net.parameters(), lr=args.lr)
    total = len(train) * args.epochs

    # distnn's own schedule function: the recipe is the same code, not a copy of its formula
    sched = torch.optim.lr_scheduler.LambdaLR(opt, make_schedule("cosine", total, args.warmup))
    loss_fn = nn.CrossEntropyLoss()
    start, epochs, reached = time.perf_counter(), [], None
    for epoch in range(args.epochs):
        net.train()
        for x, y in train.epoch(epoch):
            opt.zero_grad()
            loss_fn(net(torch.from_numpy(x)), torch.from_numpy(y)).backward()
            opt.step()
            sched.step()
        net.eval()
        with torch.no_grad():
            correct = sum(int((net(torch.from_numpy(x)).argmax(1).numpy() == y).sum()) for x, y in test)
        acc = correct / ds.count("test")
        wall = time.perf_counter() - start
        epochs.append({"epoch": epoch + 1, "test_accuracy": acc, "wall_time": round(wall, 2)})
        print(f"epoch {epoch + 1}: test accuracy {acc:.4f} ({wall:.1f} s)", flush=True)
        if reached is None and acc >= args.target:
            reached = wall
    print(f"time to {args.target:.3f}: {'not reached' if reached is None else f'{reached:.1f} s'}")
    result = {"epochs": epochs, "time_to_target_s": reached, "target": args.target, "threads": args.threads,
              "torch": torch.__version__, "numpy": np.__version__,
              "command": "python scripts/torch_reference.py " + " ".join(sys.argv[1:] if argv is None else argv)}
    atomic_write_text(Path(args.out), json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

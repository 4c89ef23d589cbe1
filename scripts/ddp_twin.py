"""PyTorch DDP twin of a distnn sync run: the same network (``interchange.torch_twin``), data (each rank
reads its part of the prepared shards with distnn's Loader, as a distnn worker does), recipe (Adam,
linear warmup then cosine, batch per rank) and 1 thread per rank, over gloo. One process per rank;
``scripts/benchmark_links.py`` starts one on each emulated machine. Needs PyTorch
(pip install torch==2.13.0).

    python scripts/ddp_twin.py --rank 0 --world 2 --master 10.88.0.10:29500 --data DATASET \
        [--model lenet5] [--epochs 1] [--batch-size 64] [--lr 0.006] [--warmup 100] [--pin-core K]
        [--out result.json]

Rank 0 prints one JSON line: training time, steps, test accuracy (and writes it to --out).
"""
from __future__ import annotations

import argparse
import json
import os
import time
from datetime import timedelta
from pathlib import Path

import numpy as np

from distnn._io import atomic_write_text
from distnn.data import Loader, open_dataset
from distnn.interchange import torch_twin
from distnn.schedules import make_schedule


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rank", type=int, required=True)
    ap.add_argument("--world", type=int, required=True)
    ap.add_argument("--master", required=True, help="HOST:PORT of rank 0")
    ap.add_argument("--data", required=True)
    ap.add_argument("--model", default="lenet5")
    ap.add_argument("--labels", help="the label field (CIFAR-100: fine or coarse; default: the first)")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=64, help="per rank")
    ap.add_argument("--lr", type=float, default=0.006)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--pin-core", type=int, help="run the computing thread on this core (as distnn pins its "
                                                 "workers); gloo's threads stay free")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for the other ranks")
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    import torch
    import torch.distributed as dist
    from torch import nn
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    dist.init_process_group("gloo", init_method=f"tcp://{args.master}", rank=args.rank, world_size=args.world,
                            timeout=timedelta(seconds=args.timeout))
    ds = open_dataset(args.data)
    spec = {"model": args.model, "num_classes": ds.num_classes(args.labels), "input_shape": list(ds.input_shape)}
    train = Loader(ds, "train", args.rank, args.world, args.batch_size, seed=args.seed, labels=args.labels,
                   drop_last=True)
    test = Loader(ds, "test", batch_size=1000, labels=args.labels, shuffle=False)
    net = nn.parallel.DistributedDataParallel(torch_twin(spec))
    if args.pin_core is not None:   # this thread only: gloo's, started above, stay free
        os.sched_setaffinity(0, {args.pin_core})
    opt = torch.optim.Adam(net.parameters(), lr=args.lr)
    total = len(train) * args.epochs

    # distnn's own schedule function: the recipe is the same code, not a copy of its formula
    sched = torch.optim.lr_scheduler.LambdaLR(opt, make_schedule("cosine", total, args.warmup))
    loss_fn = nn.CrossEntropyLoss()
    _ = train.data   # read this rank's part before the clock starts, as distnn's workers do
    dist.barrier()
    start, steps = time.perf_counter(), 0
    for epoch in range(args.epochs):
        net.train()
        for x, y in train.epoch(epoch):
            opt.zero_grad()
            loss_fn(net(torch.from_numpy(x)), torch.from_numpy(y)).backward()
            opt.step()
            sched.step()
            steps += 1
    dist.barrier()
    seconds = time.perf_counter() - start
    if args.rank == 0:
        model = net.module   # the network itself: DDP's forward would sync buffers with ranks that are done
        model.eval()
        with torch.no_grad():
            correct = sum(int((model(torch.from_numpy(x)).argmax(1).numpy() == y).sum()) for x, y in test.epoch(0))
        result = {"train_seconds": round(seconds, 3), "steps": steps, "world": args.world,
                  "test_accuracy": correct / ds.count("test"), "torch": torch.__version__, "numpy": np.__version__}
        print(json.dumps(result), flush=True)
        if args.out:
            atomic_write_text(Path(args.out), json.dumps(result, indent=2))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

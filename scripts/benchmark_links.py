"""Training across two emulated machines (``distnn.testbed``: network namespaces, links shaped with tc,
a Ray node each, one CPU and one worker per machine) at several link rates, each distnn mode beside
PyTorch DDP (gloo, one rank per machine, 1 thread; ``scripts/ddp_twin.py``) on the same machines in one
run: training time, test accuracy, the step's breakdown, and the bytes each direction of machine 1's
link carried per step, read from its interface counters, beside what distnn's own accounting says.
Needs root; PyTorch is optional (its column is left out without it).

    sudo python scripts/benchmark_links.py --source ../shared/data/mnist [--rates 10gbit 1gbit 100mbit]
        [--models lenet5 cifar_convnet] [--modes sync raycalls servers2 topk local8 unpinned] [--epochs 1]
        [--rounds 1] [--out benchmarks/links.json]

``--rounds N`` runs every contender of a rate and model N times, in turns (all modes, then DDP, then
again), and each keeps its fastest run: a neighbour on a shared host only ever slows a run (DDP's
own time moved 1.3x between two runs here), so the fastest runs, taken in turns, compare best. Every
run's time is kept in its row (``runs``).

Modes: sync (the default path: links between machines), raycalls (every step's data by Ray calls, the
A/B of the links), servers2 (a shard on each machine), topk (--compress topk:0.01, both ways), local8
(--sync-every 8), unpinned (sync with DISTNN_PIN=0: the workers' compute threads not pinned to cores
of their own, ``parallel/affinity.py``). PyTorch DDP runs twice: as launched by default, and pinned
(each rank's computing thread on a core of its own, as distnn pins its workers). lenet5 trains on
the real MNIST; cifar_convnet on generated CIFAR-shaped data (no real CIFAR offline: its accuracy
means nothing, its times do). Every run takes batches of ``BATCH`` per worker.
"""
from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from distnn import testbed
from distnn._hardware import describe as describe_host
from distnn._io import atomic_write_text
from distnn.data import open_dataset
from distnn.data.prepare import prepare

from benchmark_scaling import fake_cifar   # the generated CIFAR-shaped set of the scaling benchmark

MODES = {"sync": [], "raycalls": ["--data-plane", "ray"], "servers2": ["--servers", "2"],
         "topk": ["--compress", "topk:0.01"], "local8": ["--sync-every", "8"], "unpinned": []}
ENVS = {"unpinned": {"DISTNN_PIN": "0"}}   # the modes that differ by the driver's environment
SCRIPTS = Path(__file__).resolve().parent
BATCH = 64   # per distnn worker and per DDP rank (distnn's default)


def log_every(data, batch: int) -> list[str]:
    """The run's ``--log-every``: distnn's default (20 steps, one Ray call per worker each) where the
    epoch of two workers x ``batch`` has at least 4 such lines for the counters, else a quarter of it."""
    steps = open_dataset(data).count("train") // (2 * batch)
    return [] if steps >= 80 else ["--log-every", str(max(1, steps // 4))]


def distnn_run(m, data, out, flags, epochs, env=None) -> dict:
    """A distnn run from machine 0. Machine 1's interface counters are read each time a step line is
    logged; the bytes per step are taken between the first and the last logged step (start-up, the
    epoch's test and its checkpoint are not counted)."""
    cmd = [sys.executable, "-m", "distnn.cli", "train", "--address", m.address, "--workers", "2",
           "--dataset", str(data), "--epochs", str(epochs), "--out", str(out), "--overwrite", "remove", "--quiet",
           "--checkpoint-every", "100000", "--batch-size", str(BATCH), *log_every(data, BATCH), *flags]
    log = out.with_name(out.name + ".log")   # a file, not a pipe: nobody reads a pipe while the run goes on
    with open(log, "w") as sink:
        proc = m.popen(0, cmd, stdout=sink, stderr=subprocess.STDOUT, env=env or {})
        samples = m.counters_by_step(proc, out / "metrics.jsonl")
        proc.wait(timeout=600)
    if proc.returncode != 0 or len(samples) < 2:
        raise RuntimeError(f"distnn {' '.join(flags)} failed: {log.read_text()[-2000:]}")
    s = json.loads((out / "summary.json").read_text())
    (s0, c0), (s1, c1) = samples[0], samples[-1]
    return {"train_seconds": s["train_seconds"], "test_accuracy": s["final"]["test_accuracy"], "steps": s["steps"],
            "per_step_ms": s["per_step_ms"], "bytes_per_step": s["bytes_per_step"],
            "wire_up_per_step": round((c1["tx_bytes"] - c0["tx_bytes"]) / (s1 - s0)),
            "wire_down_per_step": round((c1["rx_bytes"] - c0["rx_bytes"]) / (s1 - s0))}


def ddp_run(m, data, model, epochs, out: Path, pinned=False) -> dict:
    """DDP's twin, a rank on each machine; ``pinned``: rank i's computing thread on core i (the
    emulated machines share this host's cores, as distnn's pinned workers do)."""
    common = ["--world", "2", "--master", f"{m.ips[0]}:29500", "--data", str(data), "--model", model,
              "--epochs", str(epochs), "--batch-size", str(BATCH)]
    common += ["--labels", "coarse"] if model == "cifar_convnet" else []
    pin = (lambda i: ["--pin-core", str(i)]) if pinned else (lambda i: [])
    env = {"GLOO_SOCKET_IFNAME": "eth0", "OMP_NUM_THREADS": "1"}
    other = m.popen(1, [sys.executable, SCRIPTS / "ddp_twin.py", "--rank", "1", *common, *pin(1)], env=env,
                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    c0 = m.counters()[1]
    done = m.run(0, [sys.executable, SCRIPTS / "ddp_twin.py", "--rank", "0", *common, *pin(0), "--out", out],
                 env=env, timeout=1800)
    c1 = m.counters()[1]
    other.communicate(timeout=120)
    if done.returncode != 0:
        raise RuntimeError(f"DDP failed: {done.stderr[-2000:]}")
    r = json.loads(out.read_text())
    return {"train_seconds": r["train_seconds"], "test_accuracy": r["test_accuracy"], "steps": r["steps"],
            "wire_up_per_step": round((c1["tx_bytes"] - c0["tx_bytes"]) / r["steps"]),
            "wire_down_per_step": round((c1["rx_bytes"] - c0["rx_bytes"]) / r["steps"])}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--source", required=True, help="the raw MNIST files (IDX, .gz)")
    ap.add_argument("--rates", nargs="+", default=["10gbit", "1gbit", "100mbit"])
    ap.add_argument("--models", nargs="+", default=["lenet5"], choices=["lenet5", "cifar_convnet"])
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--no-ddp", action="store_true")
    ap.add_argument("--rounds", type=int, default=1, help="runs of every contender, in turns; each keeps its fastest")
    ap.add_argument("--out", default="benchmarks/links.json")
    args = ap.parse_args(argv)
    why = testbed.unavailable()
    if why:
        sys.exit(f"benchmark_links: {why}")
    ddp = not args.no_ddp and importlib.util.find_spec("torch") is not None
    host = describe_host()
    print(f"host: {host}", flush=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="distnn-links-") as tmp:
        tmp = Path(tmp)
        data = {"lenet5": prepare("mnist", tmp, source=args.source, progress=False, log=lambda *a: None)}
        if "cifar_convnet" in args.models:
            fake_cifar(tmp, n=5120)
            data["cifar_convnet"] = tmp / "cifar100"
        for rate in args.rates:
            with testbed.Machines(2, rate=rate) as m:
                for model in args.models:
                    extra = ["--model", model] + (["--labels", "coarse"] if model == "cifar_convnet" else [])
                    runs = {f"distnn {mode}": functools.partial(distnn_run, m, data[model], flags=MODES[mode] + extra,
                                                                epochs=args.epochs, env=ENVS.get(mode))
                            for mode in args.modes}
                    if ddp:
                        runs["PyTorch DDP"] = functools.partial(ddp_run, m, data[model], model, args.epochs)
                        if len(os.sched_getaffinity(0)) >= 2:
                            runs["PyTorch DDP pinned"] = functools.partial(ddp_run, m, data[model], model,
                                                                           args.epochs, pinned=True)
                    best = {}
                    for k in range(max(args.rounds, 1)):
                        for who, run in runs.items():   # each run its own output (a run's metrics start empty)
                            r = {"rate": rate, "model": model, "who": who,
                                 **run(out=tmp / f"{rate}-{model}-{who.replace(' ', '-')}-{k}")}
                            print(json.dumps(r), flush=True)
                            times = best[who]["runs"] if who in best else []
                            if who not in best or r["train_seconds"] < best[who]["train_seconds"]:
                                best[who] = r
                            best[who]["runs"] = times + [r["train_seconds"]]
                    rows += best.values()
    print(f"\n{'rate':8} {'model':14} {'who':19} {'train s':>8} {'acc':>7} {'step ms':>8} {'up B/step':>10} "
          f"{'down B/step':>11} {'acct up':>9} {'acct down':>10}")
    for r in rows:
        acct = r.get("bytes_per_step", {})
        ms = r.get("per_step_ms", {}).get("total", r["train_seconds"] / r["steps"] * 1e3)
        print(f"{r['rate']:8} {r['model']:14} {r['who']:19} {r['train_seconds']:8.2f} {r['test_accuracy']:7.4f} "
              f"{ms:8.2f} {r['wire_up_per_step']:10d} {r['wire_down_per_step']:11d} "
              f"{acct.get('gradients_to_servers', 0) // 2:9d} {acct.get('parameters_to_workers', 0) // 2:10d}")
    result = {"host": host, "date": time.strftime("%Y-%m-%d"), "rows": rows,
              "command": "python scripts/benchmark_links.py " + " ".join(sys.argv[1:] if argv is None else argv)}
    atomic_write_text(Path(args.out), json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

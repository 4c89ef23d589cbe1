"""How far one parameter-server shard goes: the real protocol on Ray with each worker's compute replaced
by a wait, N = 1 ... 32 workers, K = 1, 2, 4 shards, the zoo's real parameter sizes, sync and async;
then a cost model fitted to it, checked against real runs, and used to size clusters on 1, 10, 25 GbE.

    python scripts/simulate_scaling.py [--models lenet5 ...] [--workers 1 2 4 8 16 32] [--servers 1 2 4]
        [--compute-ms MS] [--real benchmarks/scaling-1.json benchmarks/scaling-2.json]
        [--out benchmarks/scaling_sim.json] [--plot docs/scaling.png]

Per point: updates/s, the time per update that is not compute (sync: step time - compute; async: a
worker's cycle - compute), each shard's busy fraction (its process's CPU time, Ray's threads included,
over the wall time) and the efficiency E = throughput / (N x one worker's alone). A shard saturates at
the smallest N whose E falls below 0.8.

The cost model of a sync step: T = compute + a + N (r + b P / K) + 2 N (P / K) 8 / B, with P the
parameter bytes, a a fixed cost per step, r a cost per worker message and b the time per byte of a
shard and its transfers (fitted to the simulation by least squares on relative error), and the last
term the shard's link of B Gbit/s (on one machine it is inside b). A shard feeds N workers while the
non-compute part stays within a quarter of the compute (E >= 0.8). On this 2-core machine r and b also
hold the CPU the N simulated workers' own messages take from each other, which a cluster, with cores
per worker, does not pay: the figures are conservative.

``--nodes 1 2 4 8`` simulates sync steps over that many emulated nodes instead (``scripts/
emulated_nodes.py``: a ``ray.cluster_utils.Cluster`` on this machine), each point through Ray calls
and through the data plane (shared memory on a node, one message per node), and fits the data plane's
cost model: a per-worker term on a node and a per-node term.

``--from JSON`` refits, checks and plots the points of an earlier run without simulating again.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np


from distnn import tune_allocator
from distnn._io import atomic_write_text
from distnn.models import build_model
from distnn.parallel import ParameterServer, RayBackend
from distnn.parallel.simulate import SimulatedWorker
from distnn.parallel.specs import OptimizerSpec, ScheduleSpec
from distnn.train.fleet import shard_bounds
from benchmark_core import distnn_stepper, spec_for
from emulated_nodes import emulate, fit_node_model, predict_node_step_ms

MODELS = ["lenet5", "cifar_convnet", "resnet20", "lstm_classifier", "mlp"]
EFFICIENT = 0.8
LINKS_GBIT = (1, 10, 25)


def measured_compute_ms(model: str, batch: int = 64, steps: int = 5) -> float:
    """One worker's training step (forward, backward), median of ``steps``, one thread."""
    from threadpoolctl import threadpool_limits
    with threadpool_limits(1, "blas"):
        step = distnn_stepper(model, batch)
        step()
        times = []
        for _ in range(steps):
            t = time.perf_counter()
            step()
            times.append(time.perf_counter() - t)
    return 1e3 * float(np.median(times))


def make_servers(backend, size, k, world):
    params = np.zeros(size, np.float32)
    opt, sched = OptimizerSpec("sgd", 1e-6), ScheduleSpec("constant", 1)
    return [backend.create(ParameterServer, params[lo:hi], opt, sched, None, world=world, cpus=0)
            for lo, hi in shard_bounds(size, k)]


def busy(backend, servers, before, wall):
    after = backend.get([backend.call(s, "cpu_seconds") for s in servers])
    return [round((b - a) / wall, 3) for a, b in zip(before, after)]


def run_sync(backend, workers, servers, size, seconds, compute_ms):
    """Worker-driven sync steps (as training runs them); returns (steps/s, each shard's busy fraction)."""
    bounds = shard_bounds(size, len(servers)) if len(servers) > 1 else None
    backend.get(backend.sync_steps(workers, servers, 0, 3, bounds))           # warm up, start the chain
    steps = max(5, int(seconds * 1e3 / compute_ms))
    cpu = backend.get([backend.call(s, "cpu_seconds") for s in servers])
    t = time.perf_counter()
    backend.get(backend.sync_steps(workers, servers, 3, steps, bounds))
    wall = time.perf_counter() - t
    return steps / wall, busy(backend, servers, cpu, wall)


def run_async(backend, workers, servers, size, seconds, compute_ms, staleness=4):
    """Worker-driven asynchronous updates (as training runs them: each pushed straight to the shards),
    each worker at most ``staleness`` ahead of the slowest; returns (updates/s, each shard's busy
    fraction)."""
    n = len(workers)
    bounds = shard_bounds(size, len(servers)) if len(servers) > 1 else None
    each = max(2, int(seconds * 1e3 / compute_ms))
    backend.get(backend.async_round(workers, servers, [1] * n, [(0, 0)] * n, staleness, bounds))  # warm up
    cpu = backend.get([backend.call(s, "cpu_seconds") for s in servers])
    t = time.perf_counter()
    backend.get(backend.async_round(workers, servers, [each] * n, [(0, 1)] * n, staleness, bounds))
    wall = time.perf_counter() - t
    backend.get([backend.call(s, "take_applied") for s in servers])
    return n * each / wall, busy(backend, servers, cpu, wall)


def simulate(backend, model, size, compute_ms, workers, servers, modes, seconds, log):
    """Every (mode, K, N) point of one model; the simulated workers are made once and reused."""
    pool = [backend.create(SimulatedWorker, size, compute_ms, r, max(workers)) for r in range(max(workers))]
    backend.get([backend.call(h, "pid") for h in pool])
    rows = []
    for mode in modes:
        for k in servers:
            for n in workers:
                shards = make_servers(backend, size, k, n)
                team = pool[:n]
                if mode == "sync":
                    rate, load = run_sync(backend, team, shards, size, seconds, compute_ms)
                    per_update = 1e3 / rate - compute_ms
                    efficiency = rate * compute_ms / 1e3
                else:
                    rate, load = run_async(backend, team, shards, size, seconds, compute_ms)
                    per_update = 1e3 * n / rate - compute_ms
                    efficiency = rate * compute_ms / 1e3 / n
                for s in shards:
                    backend.kill(s)
                row = {"model": model, "mode": mode, "servers": k, "workers": n, "compute_ms": round(compute_ms, 2),
                       "param_bytes": size * 4, "updates_per_s": round(rate, 2), "overhead_ms": round(per_update, 2),
                       "efficiency": round(efficiency, 3), "server_busy": load}
                log(f"{model:<16}{mode:<6}K={k} N={n:<3} {rate:9.1f} updates/s  overhead {per_update:7.2f} ms  "
                    f"E {efficiency:5.2f}  server busy {load}")
                rows.append(row)
    for h in pool:
        backend.kill(h)
    return rows


def knees(rows):
    """(model, mode, K) -> the smallest N whose efficiency is below EFFICIENT (None: never)."""
    out = {}
    for r in rows:
        key = (r["model"], r["mode"], r["servers"])
        out.setdefault(key, None)
        if r["efficiency"] < EFFICIENT and (out[key] is None or r["workers"] < out[key]):
            out[key] = r["workers"]
    return out


def fit_cost_model(rows):
    """overhead = a + N (r + b P / K) fitted to the sync points by least squares on relative error (each
    point weighted by 1 / its step time, so short steps count as much as long ones): a a fixed cost
    per step, r a cost per worker message, b the time per byte a shard and the transfers take."""
    sync = [r for r in rows if r["mode"] == "sync"]
    step_ms = np.array([r["compute_ms"] + r["overhead_ms"] for r in sync])
    A = np.array([[1.0, r["workers"], r["workers"] * r["param_bytes"] / r["servers"]] for r in sync])
    y = np.array([r["overhead_ms"] for r in sync])
    (a, per_worker, per_byte), *_ = np.linalg.lstsq(A / step_ms[:, None], y / step_ms, rcond=None)
    fitted = A @ np.array([a, per_worker, per_byte])
    return {"a_ms": float(a), "per_worker_ms": float(per_worker), "per_byte_ms": float(per_byte),
            "median_step_error": round(float(np.median(np.abs(fitted - y) / step_ms)), 4)}


def predict_step_ms(model, compute_ms, n, k, param_bytes, link_gbit=None):
    """compute + a + N (r + b P / K), plus the shard's link carrying 2 N P / K bytes at B Gbit/s."""
    link = 0.0 if link_gbit is None else 2 * n * param_bytes / k * 8 / (link_gbit * 1e9) * 1e3
    return compute_ms + model["a_ms"] + n * (model["per_worker_ms"] + model["per_byte_ms"] * param_bytes / k) + link


def workers_per_shard(model, compute_ms, param_bytes, link_gbit):
    """The most workers one shard feeds while the step stays at efficiency >= 0.8 (the non-compute part
    within a quarter of the compute)."""
    n = 0
    while n < 4096 and predict_step_ms(model, compute_ms, n + 1, 1, param_bytes, link_gbit) - compute_ms \
            <= (1 / EFFICIENT - 1) * compute_ms:
        n += 1
    return n


def shards_for(model, compute_ms, param_bytes, link_gbit, n=16, most=64):
    """The fewest shards that keep n workers at efficiency >= 0.8 (None: the per-worker cost alone is
    too much, whatever K)."""
    for k in range(1, most + 1):
        if predict_step_ms(model, compute_ms, n, k, param_bytes, link_gbit) - compute_ms <= (1 / EFFICIENT - 1) * compute_ms:
            return k
    return None


def check_real(model, real_files):
    """Predicted against measured Ray sync steps of scripts/benchmark_scaling.py (its JSON)."""
    checks = []
    for path in real_files:
        data = json.loads(Path(path).read_text())
        for row in data["rows"]:
            key = next(k for k in row if k.startswith("ray_"))
            n = int(key.split("_")[1].split("x")[0])
            measured = row[key]
            size = build_model(spec_for(row["model"])).flat_params.nbytes
            predicted = predict_step_ms(model, measured["compute"], n, 1, size)
            checks.append({"model": row["model"], "workers": n, "measured_ms": measured["total"],
                           "predicted_ms": round(predicted, 2),
                           "error": round(abs(predicted - measured["total"]) / measured["total"], 4)})
    return checks


def plot(rows, path: Path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    models = sorted({r["model"] for r in rows})
    fig, axes = plt.subplots(1, len(models), figsize=(4 * len(models), 3.6), squeeze=False)
    for ax, model in zip(axes[0], models):
        for mode, style in (("sync", "-"), ("async", ":")):
            for k in sorted({r["servers"] for r in rows}):
                pts = sorted((r["workers"], r["efficiency"]) for r in rows
                             if r["model"] == model and r["mode"] == mode and r["servers"] == k)
                if pts:
                    ax.plot(*zip(*pts), style, marker="o", label=f"{mode} K={k}")
        ax.axhline(EFFICIENT, color="grey", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_ylim(0, 1.1)
        ax.set_title(model)
        ax.set_xlabel("workers N")
    axes[0][0].set_ylabel("efficiency (throughput / N x one worker)")
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(tmp, dpi=90)
    tmp.replace(path)


def simulate_all(args):
    tune_allocator()
    backend = None if args.nodes else RayBackend(num_cpus=max(args.workers) + 2)
    rows, compute = [], {}
    try:
        for model in args.models:
            size = build_model(spec_for(model)).flat_params.size
            compute[model] = args.compute_ms or measured_compute_ms(model)
            print(f"{model}: {size * 4 / 1e6:.2f} MB of parameters, compute {compute[model]:.1f} ms per step")
            if args.nodes:
                rows += emulate(model, size, compute[model], args.nodes, args.workers, args.servers, args.seconds, print,
                                args.sync_every)
            else:
                rows += simulate(backend, model, size, compute[model], args.workers, args.servers, args.modes,
                                 args.seconds, print)
    finally:
        if backend is not None:
            backend.shutdown()
    return rows, compute


def report_nodes(rows, result):
    """The data plane's fitted cost model, and each emulated point's measured and predicted efficiency."""
    for r in rows:
        r.setdefault("sync_every", 1)
    if not any(r["sync_every"] == 1 for r in rows):
        return
    cost = result["node_cost_model"] = fit_node_model(rows)
    print(f"\ndata plane cost model: step = compute + {cost['a_ms']:.2f} ms + N/M x {cost['per_worker_on_node_ms']:.3f}"
          f" ms + (M - 1) x ({cost['per_node_ms']:.2f} ms + {cost['per_node_byte_ms'] * 1e6:.2f} ms/MB x P/K); median "
          f"error {cost['median_step_error']:.1%} of a simulated step")
    print(f"\n{'model':<14}{'H':>3}{'M':>3}{'K':>3}{'N':>4}  {'E Ray calls':>11}  {'E data plane':>12}  "
          f"{'predicted (sync)':>16}")
    for r in (r for r in rows if r["data_plane"] == "shm"):
        calls = next(c for c in rows if c["data_plane"] == "ray" and all(
            c[k] == r[k] for k in ("model", "sync_every", "nodes", "servers", "workers")))
        e = r["compute_ms"] / predict_node_step_ms(cost, r["compute_ms"], r["workers"], r["nodes"], r["servers"],
                                                   r["param_bytes"])
        r["predicted_efficiency"] = round(e, 3)
        print(f"{r['model']:<14}{r['sync_every']:>3}{r['nodes']:>3}{r['servers']:>3}{r['workers']:>4}  "
              f"{calls['efficiency']:>11.2f}  {r['efficiency']:>12.2f}  {e:>16.2f}")
    result["real_check"] = []
    for path in result.get("real", []):   # real sync runs on one node: their wait and transfer per step
        for row in json.loads(Path(path).read_text())["rows"]:
            key = next(k for k in row if k.startswith("ray_") and k.endswith("x1") and "_" not in k[4:])
            n, measured = int(key[4:].split("x")[0]), row[key]
            predicted = predict_node_step_ms(cost, 0.0, n, 1, 1, 0)
            result["real_check"].append({"model": row["model"], "workers": n, "measured_ms": measured["wait_and_transfer"],
                                         "predicted_ms": round(predicted, 2)})
            print(f"  real {row['model']} {n} workers on one node: wait and transfer {measured['wait_and_transfer']} "
                  f"ms per step, the model's {predicted:.2f} ms")


def report_shards(rows, result, models, compute, real) -> None:
    """Into ``result`` and onto the console: where a shard saturates, the cost model fitted to the
    simulated steps (checked against the ``real`` runs' JSON) and the workers one shard feeds per link."""
    cost = fit_cost_model(rows) if any(r["mode"] == "sync" for r in rows) else None
    result["knees"] = [{"model": m, "mode": mo, "servers": k, "saturates_at": n}
                       for (m, mo, k), n in knees(rows).items()]
    print("\nwhere a shard saturates (efficiency < 0.8):")
    for k in result["knees"]:
        print(f"  {k['model']:<16}{k['mode']:<6}K={k['servers']}: "
              f"{'beyond the largest N' if k['saturates_at'] is None else 'N = ' + str(k['saturates_at'])}")
    if cost:
        result["cost_model"] = cost
        print(f"\ncost model: step = compute + {cost['a_ms']:.2f} ms + N x ({cost['per_worker_ms']:.2f} ms + "
              f"{cost['per_byte_ms'] * 1e6:.2f} ms/MB x P/K) + 2 N P/K / link; median error "
              f"{cost['median_step_error']:.1%} of a simulated step")
        result["real_check"] = check_real(cost, real)
        for c in result["real_check"]:
            print(f"  real {c['model']} {c['workers']} worker(s): measured {c['measured_ms']} ms, predicted "
                  f"{c['predicted_ms']} ms ({c['error']:.1%})")
        result["workers_per_shard"] = []
        print("\nworkers one shard feeds at efficiency >= 0.8 (sync):")
        for model in models:
            size = build_model(spec_for(model)).flat_params.nbytes
            per_link = {f"{b}GbE": workers_per_shard(cost, compute[model], size, b) for b in LINKS_GBIT}
            k16 = {f"{b}GbE": shards_for(cost, compute[model], size, b) for b in LINKS_GBIT}
            result["workers_per_shard"].append({"model": model, "param_bytes": size, "compute_ms": compute[model],
                                                **per_link, "shards_for_16_workers": k16})
            print(f"  {model:<16}" + "  ".join(f"{k}: {v}" for k, v in per_link.items())
                  + "   shards for 16 workers: " + "  ".join(f"{k}: {'-' if v is None else v}" for k, v in k16.items()))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=["lenet5", "cifar_convnet", "resnet20"], choices=MODELS)
    ap.add_argument("--workers", nargs="+", type=int, default=[1, 2, 4, 8, 16, 32])
    ap.add_argument("--servers", nargs="+", type=int, default=[1, 2, 4])
    ap.add_argument("--modes", nargs="+", default=["sync", "async"], choices=["sync", "async"])
    ap.add_argument("--compute-ms", type=float, help="each worker's compute (default: measured, batch 64, 1 thread)")
    ap.add_argument("--seconds", type=float, default=1.5, help="measured time per point")
    ap.add_argument("--real", nargs="*", default=[], help="JSON of scripts/benchmark_scaling.py runs to check against")
    ap.add_argument("--out", default="benchmarks/scaling_sim.json")
    ap.add_argument("--plot", help="PNG of efficiency against N (e.g. docs/scaling.png)")
    ap.add_argument("--nodes", nargs="+", type=int, help="emulated node counts (sync, Ray calls and the data plane)")
    ap.add_argument("--sync-every", type=int, default=1, help="with --nodes: local SGD, averaging every H steps")
    ap.add_argument("--from", dest="source", help="the JSON of an earlier run: refit and report, no simulation")
    args = ap.parse_args(argv)
    command = "python scripts/simulate_scaling.py " + " ".join(sys.argv[1:] if argv is None else argv)
    if args.source:
        earlier = json.loads(Path(args.source).read_text())
        rows, measured_by = earlier["rows"], earlier.get("command")
        args.models = list(dict.fromkeys(r["model"] for r in rows))
        compute = {r["model"]: r["compute_ms"] for r in rows}
    else:
        rows, compute = simulate_all(args)
        measured_by = command
    result = {"rows": rows, "cpu": platform.processor() or platform.machine(), "logical_cpus": os.cpu_count(),
              "command": measured_by, "refit_by": command if args.source else None}
    nodes = any("nodes" in r for r in rows)
    if nodes:   # the emulated nodes' experiment
        result["real"] = args.real
        report_nodes(rows, result)
    else:   # the shards' experiment
        report_shards(rows, result, args.models, compute, args.real)
    atomic_write_text(Path(args.out), json.dumps(result, indent=1))
    print(f"wrote {args.out}")
    if args.plot and not nodes:
        plot(rows, Path(args.plot))
        print(f"wrote {args.plot}")


if __name__ == "__main__":
    main()

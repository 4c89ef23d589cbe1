"""Emulated nodes for ``scripts/simulate_scaling.py --nodes``: a ``ray.cluster_utils.Cluster`` of M
nodes on this machine (each its own raylet and object store, so what crosses nodes goes through Ray's
object transfer as between machines, over loopback), N simulated workers spread evenly over them (ranks
in node order), K shards placed as a run places them, and each step's data either through Ray calls
(each worker to each shard) or through the data plane (``train.planes``: shared memory on a node, one
message per node and shard).

The cost model of a sync step on the data plane:
T = compute + a + r_w N/M + (M - 1) (r_n + b P/K), with a a fixed cost per step, r_w a cost per
worker on a node (its shared-memory hand-over), r_n a cost per message from another node (a reducer's
Ray call) and b the time per byte of those messages (told apart from r_n only by points of several
sizes P/K). Over Ray calls: T = compute + a + N (r + b P/K).
"""
from __future__ import annotations

import time
from types import SimpleNamespace

import numpy as np

from distnn.parallel import ParameterServer, RayBackend
from distnn.parallel.simulate import SimulatedWorker
from distnn.parallel.specs import LocalSpec, OptimizerSpec, ScheduleSpec
from distnn.train.fleet import shard_bounds
from distnn.train.modes import Sync
from distnn.train.planes import DataPlane

TIMEOUT = 120.0   # seconds any call of the simulation may take


class Team:
    """What ``DataPlane`` reads of a Fleet, for simulated workers and their shards."""

    def __init__(self, backend, workers, servers, size):
        self.backend, self.workers, self.servers, self.world = backend, workers, servers, len(workers)
        self.bounds = shard_bounds(size, len(servers))
        self.plan = SimpleNamespace(config=SimpleNamespace(mode="sync", compress="none", data_plane="shm",
                                                           step_timeout=TIMEOUT), mode=Sync())
        self.log = print

    @property
    def shard_bounds(self):
        return self.bounds if len(self.servers) > 1 else None

    def started(self, handles, method, what, *args):
        return self.backend.get([self.backend.call(h, method, *args) for h in handles], timeout=TIMEOUT)

    def call_servers(self, method, *args):
        return self.started(self.servers, method, "servers", *args)

    def call_workers(self, method, *args):
        return self.started(self.workers, method, "workers", *args)


def steps_per_second(backend, team, reducers, seconds, compute_ms):
    """Worker-driven sync steps (as training runs them), after three to warm up."""
    backend.get(backend.sync_steps(team.workers, team.servers, 0, 3, team.shard_bounds, reducers), timeout=TIMEOUT)
    steps = max(5, int(seconds * 1e3 / compute_ms))
    t = time.perf_counter()
    backend.get(backend.sync_steps(team.workers, team.servers, 3, steps, team.shard_bounds, reducers),
                timeout=TIMEOUT)
    return steps / (time.perf_counter() - t)


def emulate(model, size, compute_ms, nodes, workers, servers, seconds, log, sync_every=1):
    """Every (M nodes, K shards, N workers, path) point with N >= M and N a multiple of M; with
    ``sync_every`` H > 1 the workers run local SGD (one message per H steps)."""
    from ray.cluster_utils import Cluster
    rows = []
    opt, sched = OptimizerSpec("sgd", 1e-6), ScheduleSpec("constant", 1)
    for m in nodes:
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 64})
        for _ in range(m - 1):
            cluster.add_node(num_cpus=64)
        backend = RayBackend(address=cluster.address)
        try:
            ids = sorted(n["NodeID"] for n in backend.ray.nodes() if n["Alive"])
            for n in (n for n in workers if n >= m and n % m == 0):
                team_workers = [backend.create(SimulatedWorker, size, compute_ms, r, n, cpus=0, node=ids[r * m // n])
                                for r in range(n)]
                backend.get([backend.call(w, "pid") for w in team_workers], timeout=TIMEOUT)
                if sync_every > 1:
                    local = LocalSpec(opt, sched, sync_every, steps_per_epoch=10 ** 9, total=10 ** 9)
                    backend.get([backend.call(w, "set_local", local) for w in team_workers], timeout=TIMEOUT)
                for k in servers:
                    for path in ("ray", "shm"):
                        params = np.zeros(size, np.float32)
                        shards = [backend.create(ParameterServer, params[lo:hi], opt, sched, None, world=n,
                                                 average=sync_every > 1, cpus=0) for lo, hi in shard_bounds(size, k)]
                        team = Team(backend, team_workers, shards, size)
                        plane = DataPlane(team)
                        if path == "shm":
                            plane.open()
                        rate = steps_per_second(backend, team, plane.offers or None, seconds, compute_ms)
                        steps = backend.get([backend.call(s, "stats") for s in shards], timeout=TIMEOUT)
                        plane.close()
                        for s in shards:
                            backend.kill(s)
                        row = {"model": model, "mode": "sync", "sync_every": sync_every, "data_plane": path,
                               "nodes": m, "servers": k,
                               "workers": n, "compute_ms": round(compute_ms, 2), "param_bytes": size * 4,
                               "updates_per_s": round(rate, 2), "overhead_ms": round(1e3 / rate - compute_ms, 2),
                               "efficiency": round(rate * compute_ms / 1e3, 3),
                               "messages_per_step": round(steps[0]["messages"] / max(1, steps[0]["version"]), 2)}
                        log(f"{model:<14}H={sync_every} M={m} K={k} N={n:<3}{path:<4}{rate:8.1f} steps/s  overhead "
                            f"{row['overhead_ms']:6.2f} ms  E {row['efficiency']:5.2f}  "
                            f"{row['messages_per_step']:g} messages per shard and step")
                        rows.append(row)
                for w in team_workers:
                    backend.kill(w)
        finally:
            backend.ray.shutdown()
            cluster.shutdown()
    return rows


def fit_node_model(rows):
    """The data plane's cost model (module docstring) fitted to the emulated shm points of sync steps
    by least squares on relative error, as ``fit_cost_model`` does for Ray calls. Where every point has
    one P/K, the per-node and per-byte terms cannot be told apart: the byte term is left out (0)."""
    shm = [r for r in rows if r.get("data_plane") == "shm" and r.get("sync_every", 1) == 1]
    step_ms = np.array([r["compute_ms"] + r["overhead_ms"] for r in shm])
    sizes = len({r["param_bytes"] / r["servers"] for r in shm}) > 1
    A = np.array([[1.0, r["workers"] / r["nodes"], r["nodes"] - 1]
                  + ([(r["nodes"] - 1) * r["param_bytes"] / r["servers"]] if sizes else []) for r in shm])
    y = np.array([r["overhead_ms"] for r in shm])
    coef, *_ = np.linalg.lstsq(A / step_ms[:, None], y / step_ms, rcond=None)
    fitted = A @ coef
    return {"a_ms": float(coef[0]), "per_worker_on_node_ms": float(coef[1]), "per_node_ms": float(coef[2]),
            "per_node_byte_ms": float(coef[3]) if sizes else 0.0,
            "median_step_error": round(float(np.median(np.abs(fitted - y) / step_ms)), 4)}


def predict_node_step_ms(model, compute_ms, n, m, k, param_bytes):
    """compute + a + r_w N/M + (M - 1) (r_n + b P/K)."""
    return (compute_ms + model["a_ms"] + model["per_worker_on_node_ms"] * n / m
            + (m - 1) * (model["per_node_ms"] + model["per_node_byte_ms"] * param_bytes / k))


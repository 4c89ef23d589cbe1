"""A/B of one synchronous step: a Ray Compiled Graph (driver-driven: workers' gradients -> the server's
mean update -> the workers) against the worker-driven actor calls training uses (each worker pushes
to the server and waits there for the update). Both on 2 workers computing real lenet5 gradients.

    python scripts/ab_compiled_graph.py --dataset datasets/mnist [--batch 128] [--steps 150] [--rounds 3]
                                        [--out benchmarks/ab_compiled_graph.json]

Rounds alternate the two ways; prints ms per step and writes JSON.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import ray


from distnn._hardware import describe as describe_host
from distnn._io import atomic_write_text
from distnn.models import build_model
from distnn.parallel import GradientWorker, ParameterServer, RayBackend
from distnn.parallel.specs import DataSpec, OptimizerSpec, ScheduleSpec

SPEC = {"model": "lenet5", "num_classes": 10, "seed": 0}


class GraphWorker(GradientWorker):
    def begin(self, params):
        self.start_epoch(0)
        self.receive([params])
        return True

    def graph_step(self, step):
        parts, _ = self.step(step)
        return parts[0]

    def graph_receive(self, params):
        self.receive([params])
        return 0


class GraphServer(ParameterServer):
    def graph_apply(self, *grads):
        for rank, grad in enumerate(grads):
            self.contribute(rank, grad)
        return self.params.copy()


def compiled(data, p0, opt, sched, steps):
    from ray.dag import InputNode, MultiOutputNode
    workers = [ray.remote(num_cpus=1)(GraphWorker).remote(SPEC, data, r, 2) for r in range(2)]
    server = ray.remote(num_cpus=0)(GraphServer).remote(p0, opt, sched, np.ones_like(p0), world=2)
    ray.get([w.begin.remote(p0) for w in workers])
    with InputNode() as step:
        params = server.graph_apply.bind(*[w.graph_step.bind(step) for w in workers])
        dag = MultiOutputNode([w.graph_receive.bind(params) for w in workers])
    graph = dag.experimental_compile()
    try:
        for i in range(5):
            ray.get(graph.execute(i))
        t = time.perf_counter()
        for i in range(5, 5 + steps):
            ray.get(graph.execute(i))
        return (time.perf_counter() - t) / steps
    finally:
        graph.teardown()
        for h in workers + [server]:
            ray.kill(h)


def worker_driven(backend, data, p0, opt, sched, steps):
    workers = [backend.create(GradientWorker, SPEC, data, r, 2) for r in range(2)]
    server = backend.create(ParameterServer, p0, opt, sched, np.ones_like(p0), world=2, cpus=0)
    try:
        backend.get([backend.call(w, "start_epoch", 0) for w in workers])
        backend.get(backend.sync_steps(workers, [server], 0, 5))
        t = time.perf_counter()
        backend.get(backend.sync_steps(workers, [server], 5, steps))
        return (time.perf_counter() - t) / steps
    finally:
        for h in workers + [server]:
            backend.kill(h)


def _semaphores() -> set:
    """The named POSIX semaphores in /dev/shm (Ray's compiled-graph channels make sem.hdr* / sem.obj*)."""
    shm = Path("/dev/shm")
    return {p.name for p in shm.glob("sem.*")} if shm.is_dir() else set()


def _remove_orphans(names, seconds: float = 10.0) -> None:
    """Unlink the semaphores this run's channels left behind (Ray does not) once their processes are
    gone, waiting up to ``seconds`` for Ray's workers to exit: each name carries its creator's pid,
    sem.hdrPID-... or sem.objPID-..."""
    owners = {name: name[len("sem.hdr"):].split("-")[0] for name in names}
    deadline = time.monotonic() + seconds
    while any(Path(f"/proc/{pid}").exists() for pid in owners.values()) and time.monotonic() < deadline:
        time.sleep(0.1)
    for name, pid in owners.items():
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            (Path("/dev/shm") / name).unlink(missing_ok=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dataset", required=True, help="a prepared MNIST folder (distnn prepare mnist)")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default="benchmarks/ab_compiled_graph.json")
    args = ap.parse_args(argv)
    before = _semaphores()
    backend = RayBackend(num_cpus=2)
    data = DataSpec(path=str(args.dataset), batch_size=args.batch, seed=0)
    p0 = build_model(SPEC).flat_params.copy()
    opt, sched = OptimizerSpec("adam", 1e-3), ScheduleSpec("constant", 10 ** 6)
    ms = {"compiled graph": [], "worker-driven": []}
    for _ in range(args.rounds):
        ms["compiled graph"].append(1e3 * compiled(data, p0, opt, sched, args.steps))
        ms["worker-driven"].append(1e3 * worker_driven(backend, data, p0, opt, sched, args.steps))
    backend.shutdown()
    _remove_orphans(_semaphores() - before)
    host = describe_host()
    print(f"CPU: {host['cpu']}; BLAS: {host['blas']}; lenet5, 2 workers x batch {args.batch}, ms per step")
    for name, values in ms.items():
        print(f"{name:>15}: " + " / ".join(f"{v:.1f}" for v in values))
    atomic_write_text(Path(args.out), json.dumps({"host": host, "batch": args.batch, "ms_per_step": ms,
                                                  "command": "python scripts/ab_compiled_graph.py "
                                                  + " ".join(sys.argv[1:] if argv is None else argv)}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

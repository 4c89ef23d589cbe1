"""The step's data through shared memory on a node (``parallel.shm``): the protocol against a plain
ParameterServer with threads for workers (no Ray), and on Ray: the same parameters as over Ray calls
and as the one-process backend, recovery from killed workers and servers on the new path, and nothing
left behind in /dev/shm."""
import json
import os
import threading
from pathlib import Path

import h5py
import numpy as np
import pytest

from datagen import prepared_mnist
from distnn.config import TrainConfig
from distnn.parallel import ParameterServer
from distnn.parallel.server import StepAbandoned
from distnn.parallel.shm import PeerLost, Plane, PlaneClient
from distnn.parallel.specs import OptimizerSpec, ScheduleSpec
from distnn.train import Trainer


class PlaneServer(ParameterServer):
    """A ParameterServer whose published parameters go into its plane (as ray_actors.ServerActor's)."""
    plane = None

    def _publish(self):
        return self.plane.publish(self.params) if self.plane is not None else self.params.copy()


def server(size, world):
    s = PlaneServer(np.zeros(size, np.float32), OptimizerSpec("sgd", lr=0.5), ScheduleSpec("constant", 10, 0),
                    world=world)
    s.plane, why = Plane.open(s, world, size)
    assert why is None
    return s


def test_a_step_through_the_plane_is_the_mean_in_rank_order():
    rng = np.random.default_rng(0)
    grads = rng.standard_normal((3, 1000)).astype(np.float32)
    s = server(1000, 3)
    reference = ParameterServer(np.zeros(1000, np.float32), OptimizerSpec("sgd", lr=0.5),
                                ScheduleSpec("constant", 10, 0), world=3)
    reference.apply_mean(*grads, step=0)
    clients = [PlaneClient(s.plane.name, r) for r in range(3)]
    out = [None] * 3

    def worker(r):
        clients[r].send(grads[r], 0)
        out[r] = clients[r].receive(0).copy()
    threads = [threading.Thread(target=worker, args=(r,)) for r in (2, 0, 1)]   # any arrival order
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    for r in range(3):
        assert np.array_equal(out[r], reference.params)     # bit for bit
    assert s.version == 1
    for c in clients:
        c.close()
    s.plane.close()


def test_an_aborted_step_and_a_lost_server_reach_the_worker():
    s = server(10, 2)
    a, b = PlaneClient(s.plane.name, 0), PlaneClient(s.plane.name, 1)
    a.send(np.ones(10, np.float32), 0)
    result = []
    waiter = threading.Thread(target=lambda: result.append(pytest.raises(StepAbandoned, a.receive, 0)))
    waiter.start()
    s.abort("worker 1 died")            # what the driver does when a worker's process is gone
    waiter.join(timeout=30)
    assert result and not waiter.is_alive()
    b.sock.close()                      # a worker process gone: the server's thread for it ends
    s.plane.close()
    a.sock.shutdown(2)                  # the server's end closing looks the same from the worker
    with pytest.raises(PeerLost):
        a.receive(1)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return prepared_mnist(tmp_path_factory.mktemp("shm-data"), n_train=512, n_test=64, seed=3, shards=2)


def cfg(data, out, **kw):
    return TrainConfig(**{**dict(model="mlp", data=str(data), workers=2, batch_size=16, epochs=1, log_every=4,
                                 checkpoint_every=8, seed=4, out=str(out), backend="ray"), **kw}).validate()


def params(run):
    with h5py.File(Path(run) / "model.h5") as f:
        return {k: f["params"][k][()] for k in f["params"]}


def train(config, backend=None, hook=None):
    trainer = Trainer(config, backend=backend, log=lambda *a: None, progress=False, on_step=hook)
    try:
        return trainer.run()
    finally:
        trainer.close()


@pytest.mark.parametrize("servers", [1, 2])
def test_shared_memory_equals_ray_calls_and_one_process(data_dir, tmp_path, ray_backend, servers):
    summaries = {name: train(cfg(data_dir, tmp_path / name, servers=servers, **kw), ray_backend if kw.get(
        "backend", "ray") == "ray" else None) for name, kw in (("shm", {}), ("calls", {"data_plane": "ray"}),
                                                                ("local", {"backend": "local"}))}
    assert summaries["shm"]["data_plane"] == "shm" and summaries["calls"]["data_plane"] == "ray"
    a, b, c = params(tmp_path / "shm"), params(tmp_path / "calls"), params(tmp_path / "local")
    assert all(np.array_equal(a[k], b[k]) and np.array_equal(a[k], c[k]) for k in a)


def test_killed_workers_and_servers_recover_on_the_plane_and_leave_nothing(data_dir, tmp_path, ray_backend):
    """SIGKILL of a worker at step 5 and of the server at step 11, on the shared-memory path: the run
    ends bit-identical to an unbroken one, and /dev/shm holds nothing it did not hold before."""
    import signal
    before = set(os.listdir("/dev/shm"))
    train(cfg(data_dir, tmp_path / "whole"), ray_backend)
    done = set()

    def kill(trainer, step):
        if step in (5, 11) and step not in done:
            done.add(step)
            fleet = trainer.fleet
            handle = fleet.workers[1] if step == 5 else fleet.servers[0]
            os.kill(fleet.get(fleet.backend.call(handle, "pid")), signal.SIGKILL)
    summary = train(cfg(data_dir, tmp_path / "broken"), ray_backend, kill)
    assert summary["data_plane"] == "shm" and len(summary["recoveries"]) == 2
    a, b = params(tmp_path / "whole"), params(tmp_path / "broken")
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert set(os.listdir("/dev/shm")) <= before
    assert json.loads((tmp_path / "broken" / "summary.json").read_text())["steps"] == summary["steps"]

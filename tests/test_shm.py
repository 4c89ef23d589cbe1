"""The step's data through shared memory on a node (``parallel.shm``): the protocol against a plain
ParameterServer with threads for workers (no Ray), and on Ray: the same parameters as over Ray calls
and as the one-process backend, recovery from killed workers and servers on the new path, and nothing
left behind in /dev/shm."""
import json
import os
import threading

import numpy as np
import pytest

from clusters import on_cluster
from datagen import prepared_mnist
from runs import final_state, same, train
from distnn.config import TrainConfig
from distnn.parallel import ParameterServer
from distnn.parallel.reducer import NodeReducer
from distnn.parallel.server import StepAbandoned
from distnn.parallel.shm import PeerLost, Plane, PlaneClient
from distnn.parallel.specs import OptimizerSpec, ScheduleSpec


class PlaneServer(ParameterServer):
    """A ParameterServer whose published parameters go into its plane (as ray_actors.ServerActor's)."""
    plane = None

    def _publish(self):
        return self.plane.publish([self.params]) if self.plane is not None else self.params.copy()


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
    for r in range(3):
        reference.contribute(r, grads[r], step=0)
    clients = [PlaneClient(s.plane.name, r) for r in range(3)]
    out = [None] * 3

    def worker(r):
        clients[r].send([grads[r]], 0)
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
    a.send([np.ones(10, np.float32)], 0)
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


def test_async_updates_through_the_plane_reply_in_the_worker_s_own_slots():
    """Two workers' async updates: each reply is the parameters right after that update (update count
    and values), staleness is recorded from the metrics sent with it, and a worker with two pushes in
    flight (pipelined) gets each reply in its own slot, in order."""
    rng = np.random.default_rng(2)
    g = rng.standard_normal((4, 50)).astype(np.float32)
    s = server(50, 2)
    a, b = PlaneClient(s.plane.name, 0), PlaneClient(s.plane.name, 1)
    expected = np.zeros(50, np.float32)
    a.send_async(g[0], 0, seen=0, metrics={"loss": 1.0})
    params, version = a.receive_async(0)
    expected -= np.float32(0.5) * g[0]
    assert version == 1 and np.array_equal(params, expected)
    b.send_async(g[1], 0, seen=0, metrics={"loss": 2.0})
    expected -= np.float32(0.5) * g[1]
    assert b.receive_async(0)[1] == 2 and np.array_equal(b.replies[0], expected)
    assert [m["staleness"] for m in s.take_applied()] == [0, 1]
    a.send_async(g[2], 1, seen=1)            # two in flight, then both replies
    a.send_async(g[3], 0, seen=1)
    (first, v1), (second, v2) = a.receive_async(1), a.receive_async(0)
    after_third = expected - np.float32(0.5) * g[2]
    assert (v1, v2) == (3, 4) and np.array_equal(first, after_third)
    assert np.array_equal(second, after_third - np.float32(0.5) * g[3]) and np.array_equal(second, s.params)
    s.abort("a worker died")
    b.send_async(g[0], 1, seen=2)
    with pytest.raises(StepAbandoned):
        b.receive_async(1)
    a.close()
    b.close()
    s.plane.close()


def run_threads(*targets):
    threads = [threading.Thread(target=t) for t in targets]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not any(t.is_alive() for t in threads)


def test_a_node_reducer_sends_one_sum_and_its_workers_read_the_step_from_its_plane():
    """World 4: ranks 0 and 1 on the shard's node push to it directly, ranks 2 and 3 through a reducer
    (its own plane) that sends the shard one message: the shard gets 3 messages, the update is the
    sum of (g0, g1, g2 + g3) over 4, and all four workers read the same parameters."""
    rng = np.random.default_rng(1)
    grads = rng.standard_normal((4, 500)).astype(np.float32)
    s = server(500, 4)
    reducer = NodeReducer([3, 2], forward=lambda ranks, total, step: [s.push(ranks, total, step)])
    plane, why = Plane.open(reducer, 4, 500)
    assert why is None
    reducer.publish = plane.publish
    clients = {r: PlaneClient(s.plane.name if r < 2 else plane.name, r) for r in range(4)}
    out = {}

    def worker(r):
        def run():
            clients[r].send([grads[r][:200], grads[r][200:]], 0)   # two parts, as for two shards
            out[r] = clients[r].receive(0).copy()
        return run
    run_threads(*(worker(r) for r in (3, 1, 2, 0)))
    expected = np.zeros(500, np.float32) - np.float32(0.5) * (
        (grads[0] + grads[1] + (grads[2] + grads[3])) * np.float32(0.25))
    assert s.messages == 3 and reducer.messages == 1
    assert all(np.array_equal(out[r], expected) for r in range(4))
    with pytest.raises(RuntimeError, match="workers \\[2, 3\\] pushed twice"):
        s.contribute((2, 3), grads[2]) or s.contribute((2, 3), grads[2])
    for c in clients.values():
        c.close()
    plane.close()
    s.plane.close()


def test_a_reducer_releases_its_workers_when_the_step_is_abandoned():
    """An abort while one worker waits, and a forward that fails: every worker of the node gets
    StepAbandoned (or the failure), none waits on."""
    r = NodeReducer([0, 1], forward=lambda *a: None)
    caught = []
    waiting = threading.Thread(target=lambda: caught.append(pytest.raises(StepAbandoned, r.push, 0, np.ones(3), 0)))
    waiting.start()
    r.abort("worker 1 died")
    waiting.join(timeout=30)
    assert caught and not waiting.is_alive()
    with pytest.raises(StepAbandoned):
        r.push(1, np.ones(3), 0)

    def refuse(ranks, total, step):
        raise StepAbandoned("the shard dropped the step")
    r = NodeReducer([0, 1], forward=refuse)
    errors = []

    def push(rank):
        def run():
            try:
                r.push(rank, np.ones(3, np.float32), 0)
            except StepAbandoned as e:
                errors.append(str(e))
        return run
    run_threads(push(0), push(1))
    assert len(errors) == 2


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return prepared_mnist(tmp_path_factory.mktemp("shm-data"), n_train=512, n_test=64, seed=3, shards=2)


def cfg(data, out, **kw):
    return TrainConfig(**{**dict(model="mlp", data=str(data), workers=2, batch_size=16, epochs=1, log_every=4,
                                 checkpoint_every=8, seed=4, out=str(out), backend="ray"), **kw}).validate()


def test_async_on_the_plane_one_worker_equals_one_process_and_two_keep_the_bound(data_dir, tmp_path, ray_backend):
    """Async through shared memory: one worker's run equals the one-process backend's bit for bit (its
    updates are in one order whatever the path); two pipelined workers finish within the staleness
    bound."""
    opts = dict(mode="async", staleness=1, workers=1)
    one = train(cfg(data_dir, tmp_path / "shm", **opts), ray_backend)
    train(cfg(data_dir, tmp_path / "local", backend="local", **opts))
    assert one["data_plane"] == "shm"
    assert same(final_state(tmp_path / "shm"), final_state(tmp_path / "local"))
    two = train(cfg(data_dir, tmp_path / "two", **{**opts, "workers": 2, "pipeline": True, "servers": 2}), ray_backend)
    assert two["data_plane"] == "shm" and two["steps"] == one["steps"] and two["max_worker_lead"] <= 1


@pytest.mark.parametrize("servers", [1, 2])
def test_shared_memory_equals_ray_calls_and_one_process(data_dir, tmp_path, ray_backend, servers):
    summaries = {name: train(cfg(data_dir, tmp_path / name, servers=servers, **kw), ray_backend if kw.get(
        "backend", "ray") == "ray" else None) for name, kw in (("shm", {}), ("calls", {"data_plane": "ray"}),
                                                                ("local", {"backend": "local"}))}
    assert summaries["shm"]["data_plane"] == "shm" and summaries["calls"]["data_plane"] == "ray"
    a, b, c = (final_state(tmp_path / name) for name in ("shm", "calls", "local"))
    assert same(a, b) and same(a, c)


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
    assert same(final_state(tmp_path / "whole"), final_state(tmp_path / "broken"))
    assert set(os.listdir("/dev/shm")) <= before
    assert json.loads((tmp_path / "broken" / "summary.json").read_text())["steps"] == summary["steps"]


CLUSTER_RUN = """
cfg = TrainConfig(**config).validate()
killed = []
def on_step(trainer, step):
    if step != 5 or killed or not kill:
        return
    fleet = trainer.fleet
    shard_node = fleet.get(fleet.backend.call(fleet.servers[0], "node"))
    victim = fleet.plane.reducers[0] if kill == "reducer" else next(
        w for w in fleet.workers if fleet.get(fleet.backend.call(w, "node")) != shard_node)
    killed.append(fleet.get(fleet.backend.call(victim, "pid")))
    os.kill(killed[0], signal.SIGKILL)
trainer = Trainer(cfg, backend=backend, log=lambda line: None, progress=False, on_step=on_step)
try:
    summary = trainer.run()
    fleet = trainer.fleet
    print("RESULT", json.dumps({"summary": summary, "reducers": len(fleet.plane.offers),
                                "messages": fleet.plane.messages()}))
finally:
    trainer.close()
"""


def run_on_two_nodes(config, cpus, kill=None):
    """Train ``config`` on a ``ray.cluster_utils.Cluster`` of two nodes of ``cpus`` CPUs each (in a
    subprocess); killing the reducer or a worker on its node at step 5 if asked."""
    values = {k: v for k, v in vars(config).items() if k in TrainConfig.__dataclass_fields__}
    out = on_cluster(CLUSTER_RUN, head_cpus=cpus, nodes=[cpus], config=values, kill=kill)
    return json.loads(out.first["RESULT"])


@pytest.mark.cluster   # starts a Ray cluster: not in the quick loop
@pytest.mark.parametrize("workers,sync_every", [(2, 1), (4, 1), (2, 4)])
def test_across_two_nodes_a_shard_gets_one_message_per_node_and_step(data_dir, tmp_path, workers, sync_every):
    """Two nodes, the workers spread over both: the node without the shard gets a reducer when it has
    two workers (one worker talks to the shard over its link), and the shard receives (workers on its
    node + 1) messages per step (local SGD: per round). One worker per node: bit-identical to the
    one-process backend; two per node: the same within float32 rounding (each node sums first)."""
    before = set(os.listdir("/dev/shm"))
    options = dict(workers=workers, sync_every=sync_every)
    result = run_on_two_nodes(cfg(data_dir, tmp_path / "nodes", **options), cpus=workers // 2)
    summary = result["summary"]
    train(cfg(data_dir, tmp_path / "local", backend="local", **options))
    assert summary["data_plane"] == "shm" and result["reducers"] == (1 if workers == 4 else 0)
    assert result["messages"] == summary["steps"] // sync_every * (workers // 2 + 1)
    a, b = final_state(tmp_path / "nodes"), final_state(tmp_path / "local")
    if workers == 2:
        assert same(a, b)
    else:
        assert all(np.allclose(a[k], b[k], rtol=0, atol=1e-4) for k in a)
    assert set(os.listdir("/dev/shm")) <= before


@pytest.mark.cluster   # starts a Ray cluster: not in the quick loop
@pytest.mark.parametrize("victim", ["reducer", "worker"])
def test_a_killed_reducer_or_worker_on_its_node_is_recovered(data_dir, tmp_path, victim):
    """SIGKILL at step 5 of the reducer (two workers per node), or of the worker on the node without
    the shard (one per node: it talks to the shard over its link): the run recovers (a new reducer
    placed, a new link connected) and ends as the one-process backend does: bit-identical with one
    worker per node, within float32 rounding with two (each node sums first)."""
    workers = 4 if victim == "reducer" else 2
    options = dict(workers=workers, epochs=2 if workers == 4 else 1)   # steps left after the kill at step 5
    result = run_on_two_nodes(cfg(data_dir, tmp_path / "nodes", **options), cpus=workers // 2, kill=victim)
    summary = result["summary"]
    assert len(summary["recoveries"]) == 1 and result["reducers"] == (1 if victim == "reducer" else 0)
    train(cfg(data_dir, tmp_path / "local", backend="local", **options))
    a, b = final_state(tmp_path / "nodes"), final_state(tmp_path / "local")
    assert same(a, b) if workers == 2 else all(np.allclose(a[k], b[k], rtol=0, atol=1e-4) for k in a)


def test_a_worker_asks_each_shard_for_its_offers_once(ray_backend):
    """``ShardPaths.offers_of``: a shard actor's plane and link offers are asked at its first run of
    steps only, and a shard no longer given (replaced after a failure) is forgotten."""
    import ray
    from distnn.parallel.ray_paths import ShardPaths

    @ray.remote(num_cpus=0)
    class Offering:
        def __init__(self, name):
            self.name, self.asked = name, 0

        def plane(self):
            self.asked += 1
            return ("node", self.name)

        def link(self):
            self.asked += 1
            return None

        def asked_times(self):
            return self.asked

    shards = [Offering.remote(name) for name in "abc"]
    paths = ShardPaths(rank=0)
    try:
        for given in ([0, 1], [0, 1], [0, 2], [0, 2]):
            offers = paths.offers_of([shards[i] for i in given])
            assert offers == [(("node", "abc"[i]), None) for i in given]
        assert ray.get([s.asked_times.remote() for s in shards]) == [2, 2, 2]
        assert set(paths.offers) == {shards[0], shards[2]}
    finally:
        for s in shards:
            ray.kill(s)

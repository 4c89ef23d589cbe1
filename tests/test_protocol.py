"""The worker-driven synchronous protocol (what parallel/ray_actors.py runs on Ray) with plain
threads: each worker pushes its gradient to the shards and waits there for the update."""
import threading

import numpy as np
import pytest

from datagen import prepared_mnist
from distnn.models import build_model
from distnn.parallel import GradientWorker, LocalBackend, ParameterServer, StepAbandoned
from distnn.parallel.transport import InProcess
from distnn.parallel.specs import DataSpec, OptimizerSpec, ScheduleSpec
from distnn.train import shard_bounds

SPEC = {"model": "mlp", "num_classes": 10, "seed": 1, "hidden": [16]}
OPT, SCHED = OptimizerSpec("adam", 0.01), ScheduleSpec("cosine", 12, 2)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = prepared_mnist(tmp_path_factory.mktemp("protocol"), n_train=256, n_test=32, seed=6, shards=3)
    return DataSpec(path=str(folder / "mnist"), batch_size=8, seed=2)


def fleet(data, world, k):
    params = build_model(SPEC).flat_params
    mask = np.ones_like(params)
    bounds = shard_bounds(params.size, k)
    servers = [ParameterServer(params[lo:hi], OPT, SCHED, mask[lo:hi], world=world) for lo, hi in bounds]
    workers = [GradientWorker(SPEC, data, r, world) for r in range(world)]
    for w in workers:
        w.start_epoch(0)
    return servers, workers, (bounds if k > 1 else None)


def run_threads(workers, servers, first, steps, bounds):
    """Each worker in its own thread, pushing to each shard in turn (a shard's push returns once all
    workers' gradients of the step are applied)."""
    results, errors = {}, []

    def drive(w):
        try:
            if w.next_step != first:
                w.params = [s.published() for s in servers]
            results[w.rank] = w.drive(InProcess(w.rank, servers), first, steps, bounds)
        except Exception as e:  # reported to the test below
            errors.append(e)
    threads = [threading.Thread(target=drive, args=(w,)) for w in workers]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    return results, errors


@pytest.mark.parametrize("world, k", [(1, 1), (3, 1), (3, 2)])
def test_threads_pushing_equal_the_driver_loop(data, world, k):
    servers, workers, bounds = fleet(data, world, k)
    results, errors = run_threads(workers, servers, 0, 4, bounds)
    results2, errors2 = run_threads(workers, servers, 4, 3, bounds)     # a second chunk goes on
    assert not errors and not errors2
    ref_servers, ref_workers, _ = fleet(data, world, k)
    backend = LocalBackend()
    ref = backend.get(backend.sync_steps(ref_workers, ref_servers, 0, 7, bounds))
    assert all(s.version == 7 for s in servers)
    assert np.array_equal(np.concatenate([s.params for s in servers]),
                          np.concatenate([s.params for s in ref_servers]))
    for r in range(world):
        assert [m["loss"] for m in results[r] + results2[r]] == [m["loss"] for m in ref[r]]
    # every worker ends with the parameters the shards published
    assert all(np.array_equal(np.concatenate(w.params), np.concatenate([s.params for s in servers]))
               for w in workers)


def test_abort_releases_a_waiting_worker_and_recover_forgets_the_step(data):
    servers, workers, _ = fleet(data, 2, 1)
    (server,) = servers
    before = server.params.copy()
    grad = np.ones_like(before)
    outcome = []

    def waiter():
        try:
            server.push(0, grad, 0)
        except StepAbandoned as e:
            outcome.append(str(e))
    t = threading.Thread(target=waiter)
    t.start()
    for _ in range(10_000):            # until worker 0's gradient is in and it waits for worker 1's
        if server.messages:
            break
        t.join(0.001)
    server.abort("worker 1 died")
    t.join(timeout=10)
    assert outcome == ["step 0 abandoned: worker 1 died"]
    assert server.recover() == 0 and np.array_equal(server.params, before)
    # the step is redone from scratch: both gradients, one update
    t = threading.Thread(target=server.push, args=(0, grad, 0))
    t.start()
    server.push(1, grad, 0)
    t.join(timeout=10)
    assert server.version == 1 and not np.array_equal(server.params, before)


def test_push_twice_in_a_step_is_refused(data):
    servers, _, _ = fleet(data, 2, 1)
    servers[0].contribute(1, np.zeros(servers[0].params.size, np.float32))
    with pytest.raises(RuntimeError, match="worker 1 pushed twice in step 0"):
        servers[0].push(1, np.zeros(servers[0].params.size, np.float32), 0)


def test_async_push_holds_a_worker_at_the_staleness_bound():
    """Worker 0 pushes while worker 1 computes: its third push (3 ahead) waits in the server until
    worker 1's first lands, then returns the newest parameters; no bound, no wait."""
    server = ParameterServer(np.zeros(4, np.float32), OptimizerSpec("sgd", 0.5), ScheduleSpec("constant", 10, 0),
                             world=2)
    g = np.ones(4, np.float32)
    seen = []

    def fast():
        for i in range(3):
            seen.append(server.push_async(0, g, i, {"rank": 0}, bound=2, ahead=0)[1])
    thread = threading.Thread(target=fast)
    thread.start()
    thread.join(timeout=2)
    assert thread.is_alive() and server.done == [3, 0]      # held after its third update
    params, version = server.push_async(1, g, 0, {"rank": 1})
    thread.join(timeout=10)
    assert not thread.is_alive() and seen == [1, 2, 4] and version == 4
    assert np.allclose(params, -2.0) and server.max_lead == 2
    assert [m["staleness"] for m in server.take_applied()] == [0, 0, 0, 3] and server.take_applied() == []
    free = ParameterServer(np.zeros(4, np.float32), OptimizerSpec("sgd", 0.5), ScheduleSpec("constant", 10, 0),
                           world=2)
    assert [free.push_async(0, g, i, ahead=0)[1] for i in range(5)] == [1, 2, 3, 4, 5]


def test_async_abort_releases_a_held_worker():
    server = ParameterServer(np.zeros(4, np.float32), OptimizerSpec("sgd", 0.5), ScheduleSpec("constant", 10, 0),
                             world=2)
    g, errors = np.ones(4, np.float32), []

    def fast():
        try:
            for i in range(2):
                server.push_async(0, g, i, bound=0, ahead=0)
        except StepAbandoned as e:
            errors.append(e)
    thread = threading.Thread(target=fast)
    thread.start()
    thread.join(timeout=1)
    assert thread.is_alive()
    server.abort("worker 1 died")
    thread.join(timeout=10)
    assert not thread.is_alive() and len(errors) == 1 and server.done == [1, 0]


def test_pipelined_worker_takes_each_reply_one_push_later(data):
    """A pipelined async worker computes batch i + 1 from the reply to gradient i - 1: each gradient
    after the first two is computed at parameters one update older than the newest it pushed."""
    params = build_model(SPEC).flat_params
    servers = [ParameterServer(params, OPT, SCHED, np.ones_like(params), world=1)]
    w = GradientWorker(SPEC, data, 0, 1)
    snap = servers[0].snapshot()
    w.params, w.seen = [snap[0]], snap[1]
    pushes = []

    def push(grads, seen, metrics, ahead):
        pushes.append((seen, ahead))
        reply = servers[0].push_async(0, grads[0], seen, metrics, bound=None, ahead=ahead)
        return lambda: ([reply[0]], reply[1])
    for _ in w.async_updates(push, 5, 0, 0, pipelined=True):
        pass
    # seen: 0, 0 (no reply yet), then the replies to updates 1, 2, 3; ahead: 1 while a batch follows
    assert pushes == [(0, 1), (0, 1), (1, 1), (2, None), (3, None)]
    assert w.seen == 5 and servers[0].version == 5
    assert [m["staleness"] for m in servers[0].take_applied()] == [0, 1, 1, 1, 1]


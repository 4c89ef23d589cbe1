"""Each Ray worker's compute thread on a core of its own (``parallel.affinity``): which cores go to
whom, that a pin holds for the pinning thread only and that a released thread runs anywhere again,
that a Ray run's workers are pinned to distinct cores (and left alone with DISTNN_PIN=0), and that an
actor's process runs at its parent's priority, not Ray's nice 15."""
import os
import subprocess
import sys
import threading

import pytest

from datagen import prepared_mnist
from distnn.config import TrainConfig
from distnn.parallel import affinity
from distnn.train import Trainer


def test_workers_of_one_machine_get_distinct_cores_in_order():
    places = [("a", (0, 1, 2, 3)), ("b", (0, 1)), ("a", (0, 1, 2, 3)), ("b", (0, 1))]
    assert affinity.assign(places, 1) == [(0,), (0,), (1,), (1,)]
    assert affinity.assign(places, 2) == [(0, 1), None, (2, 3), None]   # b has 2 cores for 2 x 2 threads
    assert affinity.assign([("a", (4, 5, 6))], 2, taken={"a": {4}}) == [(5, 6)]
    assert affinity.assign([("a", (4, 5))], 1, taken={"a": {4, 5}}) == [None]
    with pytest.raises(ValueError, match="threads must be >= 1"):
        affinity.assign(places, 0)


def test_a_machine_is_its_kernel():
    machine, cores = affinity.place()
    assert machine == affinity.host_key() and machine
    assert cores == tuple(sorted(os.sched_getaffinity(0)))


def _in_thread(fn):
    out = []
    t = threading.Thread(target=lambda: out.append(fn()))
    t.start()
    t.join(timeout=30)
    return out[0]


def test_pin_holds_for_its_thread_and_release_undoes_it_in_another():
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        pytest.skip("needs a process allowed on two cores or more")

    def pinned_then_child():
        affinity.pin([cores[-1]])
        mine = os.sched_getaffinity(0)
        inherited = _in_thread(lambda: os.sched_getaffinity(0))

        def released():
            affinity.release()
            return os.sched_getaffinity(0)
        return mine, inherited, _in_thread(released)

    try:
        mine, inherited, freed = _in_thread(pinned_then_child)
    finally:
        affinity._unpinned = None
    assert mine == inherited == {cores[-1]}
    assert freed == set(cores)
    assert os.sched_getaffinity(0) == set(cores)   # the test's own thread was never pinned


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return prepared_mnist(tmp_path_factory.mktemp("affinity-data"), n_train=256, n_test=64, seed=2, shards=2)


@pytest.mark.parametrize("pin", ["1", "0"])
def test_ray_workers_compute_on_cores_of_their_own(data_dir, tmp_path, ray_backend, monkeypatch, pin):
    monkeypatch.setenv("DISTNN_PIN", pin)
    cores = sorted(os.sched_getaffinity(0))
    cfg = TrainConfig(model="mlp", data=str(data_dir), workers=2, batch_size=32, epochs=1, backend="ray",
                      out=str(tmp_path / "run"), log_every=2, seed=3).validate()
    trainer = Trainer(cfg, backend=ray_backend, log=lambda *a: None, progress=False)
    try:
        fleet = trainer.fleet
        places = fleet.get([fleet.backend.call(w, "cpu_place") for w in fleet.workers])
        if pin == "0" or len(cores) < 2:
            assert fleet.cores == {}
            assert all(place[1] == tuple(cores) for place in places)
        else:
            assert [fleet.cores[rank][1] for rank in (0, 1)] == [(cores[0],), (cores[1],)]
            assert [place[1] for place in places] == [(cores[0],), (cores[1],)]
        assert trainer.run()["steps"] == 256 // (2 * 32)
    finally:
        trainer.close()


CHILD = """
import os, threading
from distnn.parallel import affinity
stop = threading.Event()
early = threading.Thread(target=stop.wait)
early.start()
done = affinity.match_parent_priority()
late = threading.Thread(target=stop.wait)
late.start()
print(done, *(os.getpriority(os.PRIO_PROCESS, int(t)) for t in sorted(os.listdir("/proc/self/task"))))
stop.set()
"""


def test_an_actor_process_runs_at_its_parents_priority():
    """Ray starts its workers at nice 15: an actor's process and its threads, those started before and
    after, go back to their parent's niceness (here the test's, as a raylet's for an actor)."""
    if os.geteuid() != 0:
        pytest.skip("raising a priority needs root (CI runs as root)")
    out = subprocess.run(["nice", "-n", "15", sys.executable, "-c", CHILD], capture_output=True, text=True,
                         timeout=60, check=True).stdout.split()
    mine = os.getpriority(os.PRIO_PROCESS, 0)
    assert out[0] == "True" and len(out) >= 4   # the main thread, the one started before, the one after
    assert [int(n) for n in out[1:]] == [mine] * (len(out) - 1)   # (and BLAS's, where it has some)

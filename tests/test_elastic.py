"""The workers follow the cluster: a run continued with another number of workers (--resume with
another --workers, a node lost for good, a node that joins) by one rule (``train.membership``), and
a run whose membership never changes untouched by it. The cluster cases run on a ``ray.cluster_utils.
Cluster`` of one-CPU nodes in a subprocess of their own."""
import json
import textwrap
from pathlib import Path

import h5py
import numpy as np
import pytest

from clusters import on_cluster
from datagen import prepared_rule
from distnn.config import ConfigError, TrainConfig, workers_range
from distnn.data import open_dataset
from distnn.train import Trainer, TrainingError, TrainingInterrupted, setup
from distnn.train.checkpoints import resume_point
from distnn.train.membership import async_position, position
from distnn.train.schedule import RunLength


@pytest.fixture(scope="module")
def learnable(tmp_path_factory):
    return prepared_rule(tmp_path_factory.mktemp("elastic"))


def config(data, out, **kw):
    values = dict(model="mlp", data=str(data), dataset="rule", batch_size=16, epochs=2, log_every=4, seed=1,
                  out=str(out), backend="local", warmup=10)
    return TrainConfig(**{**values, **kw}).validate()


def stop_at(cfg, step):
    """Train ``cfg`` until a stop requested at ``step`` (as Ctrl-C does); the Trainer, closed."""
    def stop(trainer, at):
        if at == step:
            trainer.request_stop()
    trainer = Trainer(cfg, log=lambda *a: None, progress=False, on_step=stop)
    with pytest.raises(TrainingInterrupted):
        try:
            trainer.run()
        finally:
            trainer.close()
    return trainer


def records(run, kind):
    return [r for r in map(json.loads, (Path(run) / "metrics.jsonl").read_text().splitlines()) if r["type"] == kind]


def test_workers_take_a_number_or_a_range():
    assert workers_range(3) == (3, 3) and workers_range("1:4") == (1, 4) and workers_range(0) == (0, 0)
    assert TrainConfig(workers="2:3").elastic and not TrainConfig(workers="2:2").elastic
    for bad in ("4:1", "0:2", "a:b", "3"):
        with pytest.raises(ConfigError, match="MIN:MAX"):
            TrainConfig(workers=bad).validate()


@pytest.mark.parametrize("step, old, new, expected", [
    (0, (10, 2), (20, 1), 0),        # the start stays the start
    (15, (10, 2), (6, 3), 9),        # epoch 1, half-way: epoch 1 of the new length, half-way (6 + 3)
    (20, (10, 2), (5, 4), 10),       # an epoch's end stays an epoch's end
    (7, (10, 2), (3, 4), 2),         # rounded down
])
def test_a_new_world_goes_on_at_the_same_epoch_and_fraction_of_it(step, old, new, expected):
    old_length, new_length = RunLength(old[0], 3, old[1], "sync"), RunLength(new[0], 3, new[1], "sync")
    assert position(step, old_length, new_length) == expected
    local_sgd = position(step, old_length, new_length, sync_every=4)   # a round's start, or the epoch's
    assert local_sgd <= expected and (local_sgd % 4 == 0 or local_sgd % new[0] == 0)


def test_async_positions_split_the_epoch_fraction_over_the_new_workers():
    old, new = RunLength(10, 2, 2, "async"), RunLength(6, 2, 3, "async")
    # 30 gradients of 20 per epoch: epoch 1, half-way -> each of 3 workers at 6 + 3
    assert async_position(30, old, new) == [9, 9, 9]


def test_resume_with_another_number_of_workers(learnable, tmp_path):
    """Stopped in the second epoch with two workers, resumed with three: the run ends, one membership record
    in metrics.jsonl and summary.json, the epoch before it kept, the learning goes on."""
    stop_at(config(learnable, tmp_path / "run", workers=2), 100)   # in the second epoch (84 steps an epoch)
    cfg, ckpt = resume_point(tmp_path / "run", {"workers": 3})
    lines = []
    trainer = Trainer(cfg, log=lines.append, progress=False, resume=ckpt)
    try:
        summary = trainer.run()
    finally:
        trainer.close()
    [change] = records(tmp_path / "run", "membership")
    dataset = open_dataset(learnable / "rule")
    two, three = setup.run_length(cfg, dataset, 2), setup.run_length(cfg, dataset, 3)
    per_epoch_3 = three.steps_per_epoch
    stopped = ckpt["step"]
    assert stopped > two.steps_per_epoch
    assert change["workers_before"] == 2 and change["workers"] == 3 and change["after_step"] == stopped
    assert change["step"] == position(stopped, two, three) == per_epoch_3 + (stopped - two.steps_per_epoch) \
        * per_epoch_3 // two.steps_per_epoch
    assert "not bit-identical" in change["reason"] and any(line.startswith("workers 2 -> 3") for line in lines)
    assert summary["workers"] == 3 and summary["membership"] == [{k: v for k, v in change.items() if k != "wall_time"}]
    assert summary["steps"] == 2 * per_epoch_3
    assert [r["epoch"] for r in records(tmp_path / "run", "epoch")] == [0, 1]
    assert summary["final"]["test_accuracy"] > 0.8


def test_a_held_global_batch_is_shared_by_the_new_workers(learnable, tmp_path):
    """--global-batch 32: two workers take 16 each; resumed with three, each takes 10 (32 // 3)."""
    assert stop_at(config(learnable, tmp_path / "run", workers=2, global_batch=32), 40).plan.data.batch_size == 16
    cfg, ckpt = resume_point(tmp_path / "run", {"workers": 3})
    trainer = Trainer(cfg, log=lambda *a: None, progress=False, resume=ckpt)
    try:
        assert trainer.plan.data.batch_size == 10
        assert trainer.length == setup.run_length(cfg, open_dataset(learnable / "rule"), 3)
        summary = trainer.run()
    finally:
        trainer.close()
    assert summary["workers"] == 3 and summary["membership"][0]["workers"] == 3


def test_a_range_whose_membership_never_changes_is_bit_identical(learnable, tmp_path):
    """--workers 1:2 where two fit (the local backend takes MAX) = --workers 2, bit for bit."""
    for name, workers in (("fixed", 2), ("range", "1:2")):
        trainer = Trainer(config(learnable, tmp_path / name, workers=workers, epochs=1), log=lambda *a: None,
                          progress=False)
        try:
            trainer.run()
        finally:
            trainer.close()
    with h5py.File(tmp_path / "fixed" / "model.h5") as a, h5py.File(tmp_path / "range" / "model.h5") as b:
        assert all(np.array_equal(a["params"][k][()], b["params"][k][()]) for k in a["params"])
    assert not records(tmp_path / "range", "membership")


CLUSTER_RUN = """
cfg = TrainConfig(**{**dict(model="mlp", data=data, dataset="rule", workers=workers, batch_size=16, epochs=2,
                            backend="ray", out=out, start_timeout=5, checkpoint_every=8, log_every=4, warmup=10),
                     **options}).validate()
fired = []   # each event once: a step redone after a recovery comes again
def on_step(trainer, step):
    if step != 6 or fired:
        return
    fired.append(step)
    if event == "remove" and nodes:   # a node that runs a worker
        fleet = trainer.fleet
        hosts = set(fleet.get([fleet.backend.call(w, "node") for w in fleet.workers]))
        victim = next((n for n in nodes if n.node_id in hosts), nodes[-1])
        nodes.remove(victim)
        cluster.remove_node(victim)
        print("EVENT", time.monotonic(), flush=True)
    if event == "drain":   # a preemption notice, as a cloud's autoscaler gives it
        from ray._raylet import GcsClient
        from ray.core.generated import autoscaler_pb2
        reason = autoscaler_pb2.DrainNodeReason.Value("DRAIN_NODE_REASON_PREEMPTION")
        accepted, _ = GcsClient(address=cluster.address).drain_node(nodes[0].node_id, reason, "a test", 0)
        print("EVENT", time.monotonic(), accepted, flush=True)
    if event == "add" and not nodes:
        nodes.append(cluster.add_node(num_cpus=1))
        print("EVENT", time.monotonic(), flush=True)
started = time.monotonic()
try:
    trainer = Trainer(cfg, backend=backend, log=lambda line: print("LOG", line, flush=True), progress=False,
                      on_step=on_step)
    try:
        summary = trainer.run()
        print("SUMMARY", json.dumps(summary))
    finally:
        trainer.close()
except TrainingError as e:
    print("ERROR", e)
print("END", time.monotonic())
"""


def run_on_cluster(tmp_path, data, workers, event=None, head_cpus=1, extra_nodes=1, **options):
    """A run of ``workers`` on a head of ``head_cpus`` CPUs and ``extra_nodes`` one-CPU nodes, with
    ``event`` at step 6 (remove a worker's node, drain one, add one): ({first word: the rest of its
    last line}, the run's log lines)."""
    out = on_cluster(CLUSTER_RUN, head_cpus=head_cpus, nodes=[1] * extra_nodes, data=str(data), workers=workers,
                     out=str(tmp_path / "run"), options=options, event=event)
    return out.last, [line[4:] for line in out.stdout.splitlines() if line.startswith("LOG ")]


@pytest.mark.parametrize("mode", ["sync", "async", "local_sgd"])
def test_a_lost_node_the_run_goes_on_with_the_survivors(learnable, tmp_path, mode):
    """Two one-CPU nodes, --workers 1:2; the second node removed at step 6: its worker cannot be
    placed again within --start-timeout (5 s), and the run finishes with one worker, the node named,
    with test accuracy in line with an unbroken run (local backend, two workers)."""
    options = {"sync": {}, "async": {"mode": "async", "staleness": 2}, "local_sgd": {"sync_every": 4}}[mode]
    out, lines = run_on_cluster(tmp_path, learnable, "1:2", "remove", **options)
    assert "ERROR" not in out, out["ERROR"]
    summary = json.loads(out["SUMMARY"])
    [change] = summary["membership"]
    assert change["workers_before"] == 2 and change["workers"] == 1 and change["lost_nodes"]
    assert "lost, not replaced within --start-timeout" in change["reason"]
    assert summary["workers"] == 1
    assert any(line.startswith("workers 2 -> 1: node ") for line in lines), lines
    assert float(out["END"]) - float(out["EVENT"].split()[0]) < 120
    unbroken = Trainer(config(learnable, tmp_path / "unbroken", workers=2, **options), log=lambda *a: None,
                       progress=False)
    try:
        reference = unbroken.run()
    finally:
        unbroken.close()
    assert abs(summary["final"]["test_accuracy"] - reference["final"]["test_accuracy"]) < 0.08


def test_a_lost_node_with_room_elsewhere_is_named_in_the_recovery(learnable, tmp_path):
    """Three one-CPU nodes, --workers 2: a node removed at step 6; its worker is placed again on the
    spare node, and the recovery line and record name the node (not only the worker)."""
    out, lines = run_on_cluster(tmp_path, learnable, 2, "remove", extra_nodes=2)
    assert "ERROR" not in out, out["ERROR"]
    summary = json.loads(out["SUMMARY"])
    [recovery] = summary["recoveries"]
    assert recovery["lost_nodes"] and summary["workers"] == 2 and "membership" not in summary
    assert any(line.startswith(f"recovered: node {recovery['lost_nodes'][0]} lost with workers") for line in lines)


def test_a_node_that_joins_the_run_grows_back_to_max(learnable, tmp_path):
    """One one-CPU node, --workers 1:2: the run starts with one worker; a node added at step 6 is
    taken at the next checkpoint boundary (every 8 steps), and the run ends with two."""
    out, lines = run_on_cluster(tmp_path, learnable, "1:2", "add", extra_nodes=0)
    assert "ERROR" not in out, out["ERROR"]
    summary = json.loads(out["SUMMARY"])
    [change] = summary["membership"]
    assert change["workers_before"] == 1 and change["workers"] == 2 and change["after_step"] == 8
    assert summary["workers"] == 2 and summary["final"]["test_accuracy"] > 0.8


def test_a_draining_node_is_left_at_once_with_a_checkpoint(learnable, tmp_path):
    """Ray drains the second of two nodes at step 6 (a preemption notice): the run checkpoints after the
    steps in flight and goes on with one worker on the node that stays, long before a checkpoint was
    due (every 40 steps, and at the epoch's end, 84)."""
    out, lines = run_on_cluster(tmp_path, learnable, "1:2", "drain", checkpoint_every=40)
    assert "ERROR" not in out, out["ERROR"]
    assert out["EVENT"].split()[1] == "True"
    summary = json.loads(out["SUMMARY"])
    [change] = summary["membership"]
    assert change["workers_before"] == 2 and change["workers"] == 1 and change["after_step"] <= 16
    assert "draining: checkpointed and moved off it" in change["reason"]
    assert (tmp_path / "run" / "checkpoints").is_dir() and summary["workers"] == 1
    assert any("draining" in line for line in lines)


def test_a_stuck_worker_stops_the_run_at_the_step_timeout(learnable, tmp_path, ray_backend):
    """A worker that hangs without dying (here: a layer that sleeps in its 10th call) is not waited for
    for ever: the run stops after --step-timeout with one line naming the calls unanswered."""
    (tmp_path / "stuck.py").write_text(textwrap.dedent("""
        import time
        import numpy as np
        from distnn import nn, ops

        class Stuck(nn.Module):
            def __init__(self, d, k):
                super().__init__()
                self.out, self.calls = nn.Linear(d, k), 0

            def forward(self, x):
                self.calls += 1
                if self.calls == 10:
                    time.sleep(120)
                return self.out(ops.flatten(x))

        def build(input_shape, num_classes):
            return Stuck(int(np.prod(input_shape)), num_classes)
    """))
    cfg = config(learnable, tmp_path / "run", model=f"{tmp_path / 'stuck.py'}:build", workers=1, backend="ray",
                 step_timeout=3, log_every=2)
    trainer = Trainer(cfg, backend=ray_backend, log=lambda *a: None, progress=False)
    try:
        with pytest.raises(TrainingError, match=r"unanswered after 3 s: a worker or server is stuck.*--step-timeout"):
            trainer.run()
    finally:
        trainer.close()


def test_min_workers_not_placeable_stops_in_one_line(learnable, tmp_path):
    out, _ = run_on_cluster(tmp_path, learnable, "3:4", extra_nodes=1)
    assert "not started within 5 s" in out["ERROR"] and "--start-timeout" in out["ERROR"]

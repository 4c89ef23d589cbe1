"""Data-parallel training: backends agree bit for bit, gradients average right, staleness is bounded,
sharding changes nothing, a two-node cluster trains, the CLI runs end to end, bad input is named."""
import dataclasses
import json

import numpy as np
import pytest

from clusters import on_cluster
from datagen import prepared_mnist
from distnn import ops
from distnn.cli import main as cli
from distnn.config import ConfigError, TrainConfig, load_config
from distnn.data import DataError, sources
from distnn.models import build_model
from distnn.parallel import GradientWorker
from distnn.parallel.specs import DataSpec, OptimizerSpec, ScheduleSpec
from distnn.train import Trainer, TrainingError, shard_bounds, train


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return prepared_mnist(tmp_path_factory.mktemp("train-data"), n_train=512, n_test=128, seed=4, shards=4)


def config(data_dir, tmp_path, **kw):
    base = dict(model="mlp", data=str(data_dir), workers=2, batch_size=32, epochs=1, backend="local",
                out=str(tmp_path / "run"), log_every=2, seed=3)
    base.update(kw)
    return TrainConfig(**base).validate()


def run(cfg, backend=None):
    trainer = Trainer(cfg, backend=backend, log=lambda *a: None, progress=False)
    summary = trainer.run()
    return trainer, summary, trainer.model.flat_params.copy()


@pytest.mark.parametrize("params_travel", ["inline", "object_store"])
def test_sync_local_and_ray_bit_identical(data_dir, tmp_path, ray_backend, params_travel, monkeypatch):
    monkeypatch.setattr(ray_backend, "inline_bytes", 8 << 20 if params_travel == "inline" else 0)
    _, s_local, p_local = run(config(data_dir, tmp_path / "a"))
    _, s_ray, p_ray = run(config(data_dir, tmp_path / "b", backend="ray"), ray_backend)
    assert s_local["steps"] == s_ray["steps"] == 8
    assert np.array_equal(p_local, p_ray)
    assert not np.array_equal(p_local, build_model({"model": "mlp", "num_classes": 10, "seed": 3}).flat_params)


def test_sync_gradient_equals_gradient_of_concatenated_batch(data_dir):
    spec = {"model": "mlp", "num_classes": 10, "seed": 0}
    data = DataSpec(path=str(data_dir / "mnist"), batch_size=16, seed=1)
    workers = [GradientWorker(spec, data, r, 3) for r in range(3)]
    params = build_model(spec).flat_params.copy()
    batches = [next(iter(w.loader.epoch(0))) for w in workers]
    grads = [w.compute(params)[0] for w in workers]
    mean = np.mean(np.stack(grads).astype(np.float64), axis=0)
    model = build_model(spec).astype(np.float64)
    x = np.concatenate([b[0] for b in batches]).astype(np.float64)
    y = np.concatenate([b[1] for b in batches])
    ops.softmax_cross_entropy(model(x), y).backward()
    ref = model.flat_grads
    assert np.abs(mean - ref).max() <= 1e-6 * np.abs(ref).max()


def test_sharded_equals_unsharded(data_dir, tmp_path):
    _, _, one = run(config(data_dir, tmp_path / "a", optimizer="adam"))
    _, _, three = run(config(data_dir, tmp_path / "b", optimizer="adam", servers=3))
    assert np.array_equal(one, three)
    assert shard_bounds(10, 3) == [(0, 3), (3, 6), (6, 10)]


def test_local_async_takes_turns(data_dir, tmp_path):
    """The local backend runs async workers in turn, each from the parameters its own last update
    returned: every gradient but the first few is world - 1 updates stale, every batch is used."""
    trainer, summary, _ = run(config(data_dir, tmp_path / "a", mode="async", staleness=2, workers=3))
    assert summary["steps"] == 3 * trainer.length.steps_per_epoch
    assert trainer.report.staleness[:3] == [0, 1, 2] and set(trainer.report.staleness[3:]) == {2}
    assert trainer.state.done == [trainer.length.steps_per_epoch] * 3
    assert summary["cpu"]["driver_cpu_s"] > 0 and "workers_cpu_s" not in summary["cpu"]   # all in this process
    # pipelined, within a round each batch is computed two of every worker's updates behind (5), once
    # the round's first two have gone out (rounds of 10 batches per worker here: log_every = 30)
    piped, p_summary, _ = run(config(data_dir, tmp_path / "b", mode="async", staleness=2, workers=3, pipeline=True,
                                     log_every=30))
    assert p_summary["steps"] == summary["steps"] and p_summary["max_worker_lead"] <= 1
    assert piped.report.staleness[6:10] == [5, 5, 5, 5] and p_summary["mean_staleness"] > 3


@pytest.mark.parametrize("pipeline", [False, True])
def test_async_on_ray_respects_bound(data_dir, tmp_path, ray_backend, pipeline):
    """Workers push straight to the server; a worker never computes more than the bound ahead of the
    slowest, pipelined (its gradient in flight counted) or not."""
    trainer, summary, _ = run(config(data_dir, tmp_path, mode="async", staleness=1, backend="ray", pipeline=pipeline),
                              ray_backend)
    assert summary["max_worker_lead"] <= 1 and summary["steps"] == 2 * trainer.length.steps_per_epoch * trainer.length.epochs
    assert summary["final"]["test_count"] == 128
    cpu = summary["cpu"]   # every role of a cluster started here is measured, and adds up to at most all cores
    assert cpu["workers_cpu_s"] > 0 and cpu["servers_cpu_s"] > 0 and cpu["ray_cpu_s"] >= 0
    assert 0 <= cpu["idle_share"] <= 1 and abs(cpu["capacity_s"] - cpu["wall_s"] * cpu["cores"]) <= 0.02
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any("staleness" in r for r in lines if r["type"] == "step")


@pytest.mark.cluster   # starts a Ray cluster: not in the quick loop
def test_two_node_cluster_trains(data_dir, tmp_path):
    out = on_cluster("""
        assert len([n for n in backend.ray.nodes() if n["Alive"]]) == 2
        cfg = TrainConfig(model="mlp", data=data, workers=2, batch_size=32, epochs=1, backend="ray", out=out,
                          servers=2).validate()
        placed = []
        def where(trainer, step):
            if step == 1:
                placed.extend(backend.ray.get([s.node.remote() for s in trainer.fleet.servers]))
        trainer = Trainer(cfg, backend=backend, log=lambda *a: None, progress=False, on_step=where)
        summary = trainer.run()
        trainer.close()
        print("STEPS", summary["steps"], "ACC", summary["final"]["test_accuracy"])
        print("SERVER NODES", len(set(placed)))
    """, data=str(data_dir), out=str(tmp_path / "run"))
    assert out.first["STEPS"].startswith("8 ")
    assert out.first["SERVER"] == "NODES 2"     # the two shards spread over the two nodes


def test_training_learns(data_dir, tmp_path):
    """On the generated data the labels are noise, so learning is shown by fitting the training set."""
    cfg = config(data_dir, tmp_path, epochs=6, lr=0.003, workers=1, batch_size=64, lr_schedule="constant")
    trainer, summary, _ = run(cfg)
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in lines if r["type"] == "step"]
    assert steps[-1]["loss"] < 0.5 * steps[0]["loss"]


def test_cli_train_eval_plot(data_dir, tmp_path, capsys):
    run_dir = tmp_path / "cli-run"
    cfg = tmp_path / "c.toml"
    cfg.write_text('model = "lenet5"\nepochs = 1\nbatch_size = 64\n')
    code = cli(["train", str(cfg), "--backend", "local", "--workers", "2", "--data", str(data_dir),
                "--out", str(run_dir), "--quiet", "--log-every", "1"])
    assert code == 0
    assert json.loads((run_dir / "config.json").read_text())["config"]["model"] == "lenet5"
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert {"step", "epoch", "loss", "accuracy", "samples_per_s", "wall_time"} <= set(records[0])
    assert records[-1]["type"] == "epoch"
    capsys.readouterr()
    assert cli(["eval", str(run_dir)]) == 0
    out = capsys.readouterr().out
    acc = float(out.split("test accuracy ")[1].split()[0])
    assert abs(acc - records[-1]["test_accuracy"]) < 1e-4
    assert cli(["plot", str(run_dir)]) == 0
    assert (run_dir / "curves.png").read_bytes()[:4] == b"\x89PNG"


# -- bad input -------------------------------------------------------------------------------------

def test_config_unknown_key_and_wrong_type(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('modle = "mlp"\n')
    with pytest.raises(ConfigError, match="unknown key 'modle'"):
        load_config(bad)
    bad.write_text('epochs = "three"\n')
    with pytest.raises(ConfigError, match="epochs must be an integer"):
        load_config(bad)
    with pytest.raises(ConfigError, match="mode = 'fast' is not one of"):
        load_config(None, {"mode": "fast"})


def test_cli_config_error_is_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text("lr = [1]\n")
    assert cli(["train", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "lr must be a number" in err


def test_dataset_not_prepared_and_not_downloadable_names_the_fix(tmp_path, http_server, monkeypatch):
    _, url = http_server     # serves nothing: every mirror answers 404
    monkeypatch.setitem(sources.SOURCES, "mnist", dataclasses.replace(sources.SOURCES["mnist"], mirrors=[url]))
    with pytest.raises(DataError, match="could not download .* pass its folder with --source"):
        Trainer(config(tmp_path / "empty", tmp_path), log=lambda *a: None, progress=False)


def test_too_many_workers_for_cluster(data_dir, tmp_path, ray_backend):
    with pytest.raises(TrainingError, match="the Ray cluster has 4"):
        Trainer(config(data_dir, tmp_path, backend="ray", workers=9), backend=ray_backend, log=lambda *a: None,
                progress=False)


@pytest.mark.parametrize("backend", ["local", "ray"])
def test_non_finite_loss_names_step_and_worker(data_dir, tmp_path, backend, request):
    cfg = config(data_dir, tmp_path, optimizer="sgd", lr=1e30, lr_schedule="constant", model="lenet5",
                 backend=backend)
    handle = request.getfixturevalue("ray_backend") if backend == "ray" else None
    with pytest.raises(TrainingError, match=r"^non-finite .* at step \d+ on worker \d.*last good checkpoint .*step-00000000.h5"):
        train(cfg, backend=handle, log=lambda *a: None, progress=False)


def test_server_contribute_sums_in_rank_order_whatever_the_arrival():
    """The gradients of a step are summed in rank order however they arrive, then averaged once."""
    from distnn.parallel import ParameterServer
    rng = np.random.default_rng(0)
    p0 = rng.standard_normal(20).astype(np.float32)
    grads = [rng.standard_normal(20).astype(np.float32) for _ in range(3)]
    opt, sched = OptimizerSpec("sgd", 0.5), ScheduleSpec("constant", 1)
    b = ParameterServer(p0, opt, sched, world=3)
    assert not b.contribute(2, grads[2]) and not b.contribute(0, grads[0])
    assert b.contribute(1, grads[1])
    mean = ((grads[0] + grads[1]) + grads[2]) * np.float32(1 / 3)
    assert np.array_equal(b.params, p0 - np.float32(0.5) * mean) and b.version == 1
    with pytest.raises(RuntimeError, match="pushed twice"):
        b.contribute(0, grads[0])
        b.contribute(0, grads[0])


def test_slow_worker_is_reported(data_dir, tmp_path, monkeypatch):
    """A worker whose batches take twice as long is named in the metrics."""
    import time as _time
    compute = GradientWorker.compute

    def slow_compute(self, *a, **kw):
        out = compute(self, *a, **kw)
        if self.rank == 1:
            _time.sleep(0.02)
            out[-1]["compute_s"] += 0.02
        return out
    monkeypatch.setattr(GradientWorker, "compute", slow_compute)
    said = []
    trainer = Trainer(config(data_dir, tmp_path, log_every=4), log=said.append, progress=False)
    trainer.run()
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in lines if r["type"] == "step"]
    assert all(r["slow_worker"] == 1 for r in steps)
    assert any("worker 1 is slow" in s for s in said)


def test_a_worker_compiles_its_kernels_before_its_first_step_and_changes_nothing(tmp_path):
    """ready() runs one forward and backward on zeros (this machine's compiled kernels are built or
    loaded there, not in the first timed step): batch norm's running statistics and the gradients
    are as before, and so is the first step's gradient. A server warms its optimizer up the same way."""
    from distnn.parallel import ParameterServer
    data = prepared_mnist(tmp_path, n_train=32, n_test=8, seed=3, shards=1) / "mnist"
    spec = {"layers": [{"type": "Conv2d", "in_channels": 1, "out_channels": 4, "kernel_size": 5, "padding": 2},
                       {"type": "BatchNorm2d", "num_features": 4}, {"type": "ReLU"},
                       {"type": "MaxPool2d", "kernel_size": 2}, {"type": "Flatten"},
                       {"type": "Linear", "in_features": 4 * 14 * 14, "out_features": 10}], "seed": 0}
    warmed, cold = GradientWorker(spec, DataSpec(str(data), 8), 0, 1), GradientWorker(spec, DataSpec(str(data), 8), 0, 1)
    before = [b.copy() for _, b in warmed.model.named_buffers()]
    assert warmed.ready() == 4
    assert all(np.array_equal(a, b) for a, (_, b) in zip(before, warmed.model.named_buffers()))
    assert not warmed.model.flat_grads.any()
    params = warmed.model.flat_params.copy()
    first, again = warmed.compute(params)[0], cold.compute(params)[0]
    assert np.array_equal(first, again)
    server = ParameterServer(params, OptimizerSpec("adam", 0.01), ScheduleSpec("constant", 10))
    assert server.optimizer.t == 0 and not server.optimizer.state["m"].any()

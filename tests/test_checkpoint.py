"""Checkpoints: an interrupted and resumed synchronous run ends bit-identical to an uninterrupted one."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from datagen import make_cifar100, prepared_mnist
from runs import final_state
from distnn.checkpoint import CheckpointError, latest_checkpoint, load_checkpoint, load_model
from distnn.cli import main as cli
from distnn.config import TrainConfig
from distnn.data import prepare
from distnn.train import Trainer, TrainingInterrupted

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cifar_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ckpt-data")
    _, source, _ = make_cifar100(tmp / "raw", n_train=256, n_test=64, seed=2)
    prepare("cifar100", out=tmp / "datasets", source=tmp / "raw", sources={"cifar100": source}, shards=4,
            progress=False, log=lambda *a: None)
    return tmp / "datasets"


def cfg(data, out, **kw):
    base = dict(model="cifar_convnet", dataset="cifar100", labels="coarse", data=str(data), workers=2,
                batch_size=16, epochs=2, backend="local", out=str(out), log_every=2, checkpoint_every=3, seed=5,
                model_options={"widths": [4, 8], "fc": 16}, lr=0.01, warmup=3)
    base.update(kw)
    return TrainConfig(**base).validate()


def interrupted_then_resumed(config, stop_at, backend=None):
    def stop_later(trainer, step):
        if step == stop_at:
            trainer.request_stop()
    trainer = Trainer(config, backend=backend, log=lambda *a: None, progress=False, on_step=stop_later)
    with pytest.raises(TrainingInterrupted, match="continue with: distnn train --resume"):
        trainer.run()
    trainer.close()
    ckpt = load_checkpoint(latest_checkpoint(config.out))
    assert ckpt["step"] >= stop_at
    resumed = Trainer(TrainConfig(**ckpt["config"]).validate(), backend=backend, log=lambda *a: None,
                      progress=False, resume=ckpt)
    summary = resumed.run()
    resumed.close()
    return ckpt["step"], summary


def uninterrupted(config, backend=None):
    trainer = Trainer(config, backend=backend, log=lambda *a: None, progress=False)
    summary = trainer.run()
    trainer.close()
    return summary


def test_resume_is_bit_identical_local(cifar_dir, tmp_path):
    a = uninterrupted(cfg(cifar_dir, tmp_path / "a"))
    step, b = interrupted_then_resumed(cfg(cifar_dir, tmp_path / "b"), stop_at=5)
    assert 5 <= step < a["steps"] == b["steps"] == 16
    sa, sb = final_state(tmp_path / "a"), final_state(tmp_path / "b")
    assert sa.keys() == sb.keys() and all(np.array_equal(sa[k], sb[k]) for k in sa)
    assert a["final"]["test_accuracy"] == b["final"]["test_accuracy"]
    kept = sorted(p.name for p in (tmp_path / "b" / "checkpoints").iterdir())
    assert len(kept) == 3 and kept[-1] == "step-00000016.h5"   # the newest three, nothing temporary


def test_resume_is_bit_identical_ray(cifar_dir, tmp_path):
    from distnn.parallel import RayBackend
    backend = RayBackend(num_cpus=4)
    uninterrupted(cfg(cifar_dir, tmp_path / "a", backend="ray"), backend)
    interrupted_then_resumed(cfg(cifar_dir, tmp_path / "b", backend="ray"), stop_at=9, backend=backend)
    local = uninterrupted(cfg(cifar_dir, tmp_path / "c"))
    sa, sb, sc = (final_state(tmp_path / r) for r in "abc")
    assert all(np.array_equal(sa[k], sb[k]) and np.array_equal(sa[k], sc[k]) for k in sa)
    assert local["steps"] == 16


def test_checkpoint_is_a_model_file_and_refuses_wrong_files(cifar_dir, tmp_path):
    uninterrupted(cfg(cifar_dir, tmp_path / "a", epochs=1))
    path = latest_checkpoint(tmp_path / "a")
    model = load_model(path)  # params and buffers under the same names as a model file
    assert model.flat_params.size > 0
    with pytest.raises(CheckpointError, match="not a distnn training checkpoint"):
        load_checkpoint(tmp_path / "a" / "model.h5")
    with pytest.raises(CheckpointError, match="no checkpoints"):
        latest_checkpoint(tmp_path)


def test_sigterm_saves_checkpoint_and_cli_resumes(tmp_path):
    """A real SIGTERM to `distnn train`: exit 130 with a checkpoint; --resume finishes the run with the
    parameters an uninterrupted run ends with."""
    data = prepared_mnist(tmp_path, n_train=2048, n_test=64, seed=1, shards=2)
    args = ["train", "--model", "mlp", "--backend", "local", "--workers", "2", "--batch-size", "8",
            "--epochs", "6", "--data", str(data), "--log-every", "1", "--quiet"]
    assert cli(args + ["--out", str(tmp_path / "whole")]) == 0
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "distnn.cli", *args, "--out", str(tmp_path / "cut")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    metrics = tmp_path / "cut" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 20):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "SIGTERM" in out and "--resume" in err and "Traceback" not in err
    step = load_checkpoint(latest_checkpoint(tmp_path / "cut"))["step"]
    assert 20 <= step < 768
    assert cli(["train", "--resume", str(tmp_path / "cut"), "--quiet"]) == 0
    a, b = final_state(tmp_path / "whole"), final_state(tmp_path / "cut")
    assert all(np.array_equal(a[k], b[k]) for k in a)
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines() if '"type": "step"' in line]
    assert steps[-1] == 768


def test_resume_refuses_changed_settings(tmp_path, capsys):
    assert cli(["train", "--resume", str(tmp_path), "--epochs", "5"]) == 2
    assert "drop epochs" in capsys.readouterr().err


# -- failures (Ray) -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def mnist_dir(tmp_path_factory):
    return prepared_mnist(tmp_path_factory.mktemp("fail-data"), n_train=2048, n_test=64, seed=3, shards=2)


def mlp_cfg(data, out, **kw):
    base = dict(model="mlp", data=str(data), workers=2, batch_size=16, epochs=2, backend="ray", out=str(out),
                log_every=4, checkpoint_every=8, seed=2)
    base.update(kw)
    return TrainConfig(**base).validate()


def run_with_kill(config, backend, victim, at_step=22):
    """Train, SIGKILL one actor's process (a worker rank or 'server') once the run reaches ``at_step``."""
    killed = []

    def kill_once(trainer, step):
        if step == at_step and not killed:  # a redone step 22 is not killed again
            os.kill(pid, signal.SIGKILL)
            killed.append(step)
    trainer = Trainer(config, backend=backend, log=lambda *a: None, progress=False, on_step=kill_once)
    fleet = trainer.fleet
    handle = fleet.servers[0] if victim == "server" else fleet.workers[victim]
    pid = backend.get(backend.call(handle, "pid"))
    summary = trainer.run()
    trainer.close()
    return summary


@pytest.fixture(scope="module")
def reference(mnist_dir, tmp_path_factory, ray_backend):
    out = tmp_path_factory.mktemp("ref") / "run"
    summary = uninterrupted(mlp_cfg(mnist_dir, out), ray_backend)
    return summary, final_state(out)


def test_killed_worker_is_replaced_and_costs_only_the_step_in_flight(mnist_dir, tmp_path, ray_backend, reference):
    summary = run_with_kill(mlp_cfg(mnist_dir, tmp_path / "run"), ray_backend, victim=1)
    assert summary["steps"] == reference[0]["steps"] == 128
    (event,) = summary["recoveries"]
    assert event["lost_workers"] == [1] and event["lost_servers"] == []
    assert summary["steps_redone"] == 0
    # no update was applied with a gradient missing: the run ends exactly where an unbroken one does
    state = final_state(tmp_path / "run")
    assert all(np.array_equal(state[k], reference[1][k]) for k in state)


def test_killed_server_restarts_from_checkpoint(mnist_dir, tmp_path, ray_backend, reference):
    summary = run_with_kill(mlp_cfg(mnist_dir, tmp_path / "run"), ray_backend, victim="server")
    (event,) = summary["recoveries"]
    assert event["lost_servers"] == [0] and event["restart_step"] % 8 == 0
    assert 1 <= summary["steps_redone"] <= 8 + 4  # at most --checkpoint-every, plus the chunk in flight
    state = final_state(tmp_path / "run")
    assert all(np.array_equal(state[k], reference[1][k]) for k in state)
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any(r["type"] == "recovery" for r in lines)


def test_async_run_checkpoints_and_resumes(mnist_dir, tmp_path):
    """An async run saves each worker's position; resumed, every worker finishes its own batches."""
    config = mlp_cfg(mnist_dir, tmp_path / "run", backend="local", mode="async", staleness=2, workers=3,
                     checkpoint_every=10)
    step, summary = interrupted_then_resumed(config, stop_at=25)
    ckpt = load_checkpoint(latest_checkpoint(tmp_path / "run"))
    assert sum(ckpt["done"]) == ckpt["step"] == summary["steps"] == 3 * 42 * 2
    assert summary["final"]["test_count"] == 64
    first = load_checkpoint(sorted((tmp_path / "run" / "checkpoints").glob("step-*.h5"))[0])
    assert first["step"] > 25 and sum(first["done"]) == first["step"]

"""Faults, with real processes and a real file system: a full disk, an overwritten run, killed workers
and servers (sync and async, once and at random), a killed driver, a diverging run."""
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import pytest

from clusters import on_cluster
from datagen import prepared_mnist, prepared_rule
from runs import final_state, same, train
from distnn.checkpoint import latest_checkpoint, load_checkpoint
from distnn.cli import main as cli
from distnn.config import TrainConfig
from distnn.train import TrainingError

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return prepared_mnist(tmp_path_factory.mktemp("fault-data"), n_train=1024, n_test=64, seed=5, shards=2)


@pytest.fixture(scope="module")
def learnable(tmp_path_factory):
    return prepared_rule(tmp_path_factory.mktemp("learnable"))


def train_args(data, out, *extra):
    return ["train", "--model", "mlp", "--data", str(data), "--workers", "2", "--batch-size", "16", "--epochs", "2",
            "--log-every", "4", "--out", str(out), "--quiet", "--seed", "1", *extra]


def run_cli(args, timeout=300, **kw):
    return subprocess.run([sys.executable, "-m", "distnn.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=ENV, **kw)


# -- the disk ---------------------------------------------------------------------------------------

def small_disk(path: Path, size: int):
    """A tmpfs of ``size`` bytes at ``path`` (None when mounting is not allowed here)."""
    path.mkdir(parents=True, exist_ok=True)
    ok = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                        capture_output=True).returncode == 0
    return ok


def test_full_disk_while_checkpointing(data_dir, tmp_path):
    """The checkpoints of a run outgrow its disk: one line naming the file, the space needed and free and
    the last good checkpoint, exit status 74, nothing partial; --resume finishes once there is space,
    bit-identical to a run that never stopped."""
    whole = tmp_path / "whole"
    assert cli(train_args(data_dir, whole, "--backend", "local", "--checkpoint-every", "8")) == 0
    size = (whole / "checkpoints" / sorted(os.listdir(whole / "checkpoints"))[-1]).stat().st_size
    disk = tmp_path / "disk"
    mounted = small_disk(disk, int(2.5 * size))
    limit = None if mounted else int(1.5 * size)      # else: a file-size limit (EFBIG) stands in for ENOSPC
    try:
        def limited():
            import resource
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
        proc = run_cli(train_args(data_dir, disk / "run", "--backend", "local", "--checkpoint-every", "8"),
                       preexec_fn=limited if limit else None)
        assert proc.returncode == 74, proc.stderr
        err = proc.stderr.strip()
        assert "\n" not in err and "Traceback" not in proc.stderr
        assert "cannot write" in err and "needs about" in err and "free" in err
        assert "last good checkpoint" in err and "--resume" in err
        kept = sorted(os.listdir(disk / "run" / "checkpoints"))
        assert kept and not [f for f in kept if not f.startswith("step-")]       # no partial file
        assert not [f for f in os.listdir(disk / "run") if ".tmp" in f]
        load_checkpoint(disk / "run" / "checkpoints" / kept[-1])                 # the last good one reads
        if mounted:
            subprocess.run(["mount", "-o", "remount,size=64m", str(disk)], check=True)
        proc = run_cli(["train", "--resume", str(disk / "run"), "--quiet"])
        assert proc.returncode == 0, proc.stderr
        assert same(final_state(whole), final_state(disk / "run"))
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(disk)])


def test_full_disk_while_preparing_writes_nothing(tmp_path, capsys):
    import distnn.data.writer as writer
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", x=rng.integers(0, 256, (50, 8, 8), dtype=np.uint8), y=rng.integers(0, 2, 50))
    real = writer._write_shard

    def full(path, *a):
        real(path, *a)
        raise OSError(28, "No space left on device")
    writer._write_shard = full
    try:
        assert cli(["prepare", "npz", "--source", str(tmp_path / "d.npz"), "--out", str(tmp_path / "ds"),
                    "--quiet"]) == 74
    finally:
        writer._write_shard = real
    err = capsys.readouterr().err
    assert "No space left on device" in err and "free" in err and err.count("\n") == 1
    assert os.listdir(tmp_path / "ds") == []


def test_existing_run_is_never_overwritten(data_dir, tmp_path, capsys):
    out = tmp_path / "run"
    args = train_args(data_dir, out, "--backend", "local", "--epochs", "1")
    assert cli(args) == 0
    before = (out / "metrics.jsonl").read_text()
    capsys.readouterr()
    assert cli(args) == 2
    err = capsys.readouterr().err
    assert "holds a run already" in err and "--resume" in err and "--overwrite" in err
    assert (out / "metrics.jsonl").read_text() == before
    assert cli(args + ["--overwrite", "move"]) == 0
    moved = [p for p in tmp_path.iterdir() if p.name.startswith("run.old-")]
    assert len(moved) == 1 and (moved[0] / "metrics.jsonl").read_text() == before
    assert cli(args + ["--overwrite", "remove"]) == 0
    assert len([p for p in tmp_path.iterdir() if p.name.startswith("run")]) == 2


# -- killed processes -------------------------------------------------------------------------------

def pids(pattern):
    out = subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def wait_for_lines(path: Path, n: int, proc, deadline=120):
    end = time.time() + deadline
    while time.time() < end and proc.poll() is None:
        if path.exists() and len(path.read_text().splitlines()) >= n:
            return True
        time.sleep(0.05)
    return False


def test_killed_worker_console_says_one_line(data_dir, tmp_path):
    """kill -9 of a worker process during `distnn train` on Ray: one line about it, no traceback, times
    that add up, and the parameters of a run that was never broken."""
    assert cli(train_args(data_dir, tmp_path / "whole", "--backend", "local")) == 0
    before = set(pids("ray::WorkerActor"))
    proc = subprocess.Popen([sys.executable, "-m", "distnn.cli", *train_args(data_dir, tmp_path / "run")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    assert wait_for_lines(tmp_path / "run" / "metrics.jsonl", 5, proc)
    victims = sorted(set(pids("ray::WorkerActor")) - before)
    assert victims
    os.kill(victims[0], signal.SIGKILL)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    console = out + err
    assert [line for line in console.splitlines() if line.startswith("recovered:")].__len__() == 1, console
    for noise in ("Traceback", "Unhandled error", "(raylet)", "RayActorError"):
        assert noise not in console, console
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    ms = summary["per_step_ms"]
    assert all(v >= 0 for v in ms.values()) and ms["compute"] <= ms["total"]
    assert len(summary["recoveries"]) == 1
    assert same(final_state(tmp_path / "whole"), final_state(tmp_path / "run"))


def killer(schedule, rng_seed=0):
    """An on_step hook that SIGKILLs, at each step of ``schedule`` (step -> 'worker' | 'server'), a worker
    (a random rank) or a server; a step redone after a recovery is not killed twice."""
    rng, done = random.Random(rng_seed), set()

    def hook(trainer, step):
        if step in schedule and step not in done:
            done.add(step)
            fleet = trainer.fleet
            handles = fleet.servers if schedule[step] == "server" else [rng.choice(fleet.workers)]
            os.kill(fleet.get(fleet.backend.call(handles[0], "pid")), signal.SIGKILL)
    return hook


def mlp_config(data, out, **kw):
    base = dict(model="mlp", data=str(data), workers=2, batch_size=16, epochs=2, backend="ray", out=str(out),
                log_every=4, checkpoint_every=8, seed=2, model_options={"hidden": [32]})
    base.update(kw)
    return TrainConfig(**base).validate()


def test_chaos_sync_many_kills_end_bit_identical(data_dir, tmp_path, ray_backend):
    """Five kills of a worker or a server at random steps: the parameters of an unbroken run. (The
    steps are at least 10 apart, so each kill is found before the next: two steps in flight at most.)"""
    rng = random.Random(11)
    steps = [4 + 12 * i + rng.randrange(3) for i in range(5)]
    schedule = {s: rng.choice(["worker", "worker", "server"]) for s in steps}
    schedule[steps[0]] = "server"
    schedule[steps[1]] = "worker"
    whole = train(mlp_config(data_dir, tmp_path / "whole", backend="local"))
    broken = train(mlp_config(data_dir, tmp_path / "broken"), ray_backend, killer(schedule))
    assert len(broken["recoveries"]) == 5
    assert {k for r in broken["recoveries"] for k in ("worker", "server") if r[f"lost_{k}s"]} == {"worker", "server"}
    assert broken["steps"] == whole["steps"] == 64
    assert same(final_state(tmp_path / "whole"), final_state(tmp_path / "broken"))


def test_chaos_async_three_worker_kills_and_a_server_kill(learnable, tmp_path, ray_backend):
    common = dict(dataset="rule", mode="async", staleness=2, lr=0.01, epochs=3, warmup=0, model_options={})
    whole = train(mlp_config(learnable, tmp_path / "whole", **common), ray_backend)
    broken = train(mlp_config(learnable, tmp_path / "broken", **common), ray_backend,
                         killer({40: "worker", 150: "worker", 260: "worker"}))
    events = broken["recoveries"]
    assert len(events) == 3 and all(len(e["lost_workers"]) == 1 and not e["lost_servers"] for e in events)
    assert broken["steps"] == whole["steps"]              # every worker did all its batches
    acc = whole["final"]["test_accuracy"]
    assert acc > 0.8 and abs(broken["final"]["test_accuracy"] - acc) <= 0.05
    server = train(mlp_config(learnable, tmp_path / "server", **common), ray_backend, killer({100: "server"}))
    (event,) = server["recoveries"]
    # back to the newest checkpoint: async ones are taken once the updates in flight have landed after
    # every 8th, so at most 8 + (workers - 1) updates before the failure
    assert event["lost_servers"] == [0] and 100 - 8 - 1 <= event["restart_step"] <= event["after_step"]
    assert server["steps"] == whole["steps"] and abs(server["final"]["test_accuracy"] - acc) <= 0.05


def test_pipelined_async_survives_worker_kills(learnable, tmp_path, ray_backend):
    """A pipelined worker has two pushes in flight when it dies: the shards' counts say which landed,
    its replacement computes the rest, and every batch of the run is applied once."""
    common = dict(dataset="rule", mode="async", staleness=2, pipeline=True, lr=0.01, epochs=2, warmup=0,
                  model_options={})
    broken = train(mlp_config(learnable, tmp_path / "broken", **common), ray_backend,
                         killer({30: "worker", 120: "worker"}, rng_seed=1))
    events = broken["recoveries"]
    assert len(events) == 2 and all(len(e["lost_workers"]) == 1 and not e["lost_servers"] for e in events)
    ckpt = load_checkpoint(latest_checkpoint(tmp_path / "broken"))
    assert broken["steps"] == sum(ckpt["done"]) == ckpt["step"] and len(set(ckpt["done"])) == 1
    assert broken["final"]["test_accuracy"] > 0.7 and broken["max_worker_lead"] <= 2


def test_killed_driver_resumes_from_the_newest_periodic_checkpoint(data_dir, tmp_path):
    args = train_args(data_dir, tmp_path / "run", "--backend", "local", "--checkpoint-every", "10",
                      "--epochs", "6", "--log-every", "1")
    assert cli(train_args(data_dir, tmp_path / "whole", "--backend", "local", "--checkpoint-every", "10",
                          "--epochs", "6", "--log-every", "1")) == 0
    proc = subprocess.Popen([sys.executable, "-m", "distnn.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=ENV)
    assert wait_for_lines(tmp_path / "run" / "metrics.jsonl", 45, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    newest = load_checkpoint(latest_checkpoint(tmp_path / "run"))["step"]
    per_epoch = json.loads((tmp_path / "whole" / "summary.json").read_text())["steps"] // 6
    assert newest >= 40 and (newest % 10 == 0 or newest % per_epoch == 0)   # periodic or an epoch's end
    proc = run_cli(["train", "--resume", str(tmp_path / "run")])
    assert proc.returncode == 0, proc.stderr
    assert f"at step {newest} of" in proc.stdout
    assert same(final_state(tmp_path / "whole"), final_state(tmp_path / "run"))
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records if r["type"] == "step"]
    assert steps == sorted(set(steps))                    # one history: no repeated or cut lines


# -- numbers ---------------------------------------------------------------------------------------

def test_diverging_run_stops_with_one_line_and_no_numpy_warnings(data_dir, tmp_path):
    config = mlp_config(data_dir, tmp_path / "run", backend="local", optimizer="sgd", lr=1e6, lr_schedule="constant")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(TrainingError, match="^non-finite .* at step \\d+ on worker"):
            train(config)
    assert [w for w in caught if issubclass(w.category, RuntimeWarning)] == []
    proc = run_cli(train_args(data_dir, tmp_path / "cli", "--backend", "local", "--optimizer", "sgd", "--lr", "1e6"))
    assert proc.returncode == 2 and "RuntimeWarning" not in proc.stderr and proc.stderr.count("\n") == 1
    assert "non-finite" in proc.stderr


# -- a cluster left running -------------------------------------------------------------------------

def test_train_joins_the_cluster_ray_start_left_running(data_dir, tmp_path):
    """`ray start --head` on the machine, then a plain `distnn train` (no --address): it joins that
    cluster in one line instead of a traceback (Ray refuses a new cluster's settings for a running one).
    Ray's pointer to the current cluster is put back as it was, so no later run tries the dead one."""
    marker = Path(tempfile.gettempdir()) / "ray" / "ray_current_cluster"
    before = marker.read_bytes() if marker.exists() else None
    ray_cli = Path(sys.executable).with_name("ray")
    env = {k: v for k, v in ENV.items() if k != "RAY_ADDRESS"}
    log = tmp_path / "ray-start.log"
    with open(log, "w") as out:
        head = subprocess.Popen([str(ray_cli if ray_cli.exists() else shutil.which("ray")), "start", "--head", "--block",
                                 "--port", "0", "--num-cpus", "2", "--include-dashboard=false",
                                 "--disable-usage-stats"], stdout=out, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
    try:
        deadline = time.monotonic() + 90
        while "Ray runtime started" not in log.read_text():
            assert head.poll() is None and time.monotonic() < deadline, log.read_text()[-2000:]
            time.sleep(0.2)
        proc = subprocess.run([sys.executable, "-m", "distnn.cli", *train_args(data_dir, tmp_path / "run"),
                               "--epochs", "1", "--max-steps", "4"], capture_output=True, text=True,
                              timeout=300, env=env)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert "joined the Ray cluster already running on this machine" in proc.stdout
        assert "Traceback" not in proc.stderr and json.loads((tmp_path / "run" / "summary.json").read_text())["steps"] == 4
    finally:
        head.terminate()   # `ray start --block` drains and stops the processes it started
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait(timeout=30)
        if before is None:
            marker.unlink(missing_ok=True)
        else:
            marker.write_bytes(before)


def test_a_worker_no_node_can_hold_stops_the_start_in_one_line(data_dir, tmp_path):
    """Two nodes of one CPU each and a worker asking for two threads: Ray would leave it pending for
    ever; the run stops at --start-timeout, naming the worker, what it needs and what the nodes have."""
    out = on_cluster("""
        cfg = TrainConfig(model="mlp", data=data, workers=1, threads=2, batch_size=32, epochs=1, backend="ray",
                          out=out, start_timeout=5).validate()
        started = time.monotonic()
        try:
            Trainer(cfg, backend=backend, log=lambda *a: None, progress=False)
        except TrainingError as e:
            print("ERROR", e)
        print("SECONDS", round(time.monotonic() - started))
    """, data=str(data_dir), out=str(tmp_path / "run"), timeout=300)
    error = out.first["ERROR"]
    assert "workers [0] not started within 5 s: each needs 2 CPU(s) on one node" in error
    assert error.count("1 CPUs") == 2 and "--start-timeout" in error
    assert int(out.first["SECONDS"]) < 60


def test_a_lost_node_stops_the_run_in_bounded_time(data_dir, tmp_path):
    """A node removed mid-run (its worker and its CPU gone) from a run of a fixed --workers 2: the
    replacement cannot be placed, and the run stops at --start-timeout with one line instead of waiting
    for ever. (With --workers 1:2 it goes on with the survivors: test_elastic.py.)"""
    out = on_cluster("""
        cfg = TrainConfig(model="mlp", data=data, workers=2, batch_size=16, epochs=2, backend="ray", out=out,
                          start_timeout=10).validate()
        def on_step(trainer, step):
            if step == 5:
                cluster.remove_node(nodes[0])
                print("REMOVED", time.monotonic(), flush=True)
        trainer = Trainer(cfg, backend=backend, log=lambda *a: None, progress=False, on_step=on_step)
        try:
            trainer.run()
        except TrainingError as e:
            print("ERROR", e)
        print("STOPPED", time.monotonic())
        trainer.close()
    """, data=str(data_dir), out=str(tmp_path / "run"), timeout=300)
    assert "not started within 10 s" in out.first["ERROR"] and "--start-timeout" in out.first["ERROR"]
    assert float(out.first["STOPPED"]) - float(out.first["REMOVED"]) < 120

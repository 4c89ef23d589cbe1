"""Hyperparameter searches (distnn tune, distnn.tune): the space is parsed and refused by name before
anything starts; a real search on MNIST-shaped data runs four trials under ASHA two at a time, one of
them failing once on purpose and retried from its checkpoint, is interrupted and resumed, and leaves
results.csv, search.json, run folders and a plot."""
import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from datagen import prepared_mnist
from distnn.cli import main as cli
from distnn.search import SpaceError, parse_space

FLAKY = '''
import os
import numpy as np
from distnn import is_training, nn, ops


class FailsOnce(nn.Module):
    """A small MLP whose forward raises once in the whole search: at the first training batch after a
    test (the second epoch's first) in whichever worker process gets there first and creates ``marker``."""

    def __init__(self, d, k, marker):
        super().__init__()
        self.hidden, self.out = nn.Linear(d, 32), nn.Linear(32, k)
        self.marker, self.tested = marker, False

    def forward(self, x):
        if not is_training():
            self.tested = True
        elif self.tested:
            self.tested = False
            try:
                os.close(os.open(self.marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            except FileExistsError:
                pass
            else:
                raise RuntimeError("failing once on purpose")
        return self.out(ops.relu(self.hidden(ops.flatten(x))))


def build(input_shape, num_classes, marker=""):
    return FailsOnce(int(np.prod(input_shape)), num_classes, marker)
'''


def test_space_parses_distributions_and_grids(tmp_path):
    space = parse_space('{lr = "loguniform(1e-4, 1e-2)", batch_size = "choice(32, 64, 128)", '
                        'optimizer = "choice(\'adam\', \'momentum\')", seed = [0, 1], warmup = "randint(0, 50)", '
                        'label_smoothing = "uniform(0, 0.2)"}')
    kinds = {d.option: (d.kind, d.values) for d in space.dimensions}
    assert kinds == {"lr": ("loguniform", (1e-4, 1e-2)), "batch_size": ("choice", (32, 64, 128)),
                     "optimizer": ("choice", ("adam", "momentum")), "seed": ("grid", (0, 1)),
                     "warmup": ("randint", (0, 50)), "label_smoothing": ("uniform", (0.0, 0.2))}
    file = tmp_path / "space.toml"
    file.write_text('lr = "uniform(0.001, 0.01)"\nmodel_options = "choice({width = 8}, {width = 16})"\n')
    assert [d.values for d in parse_space(file).dimensions] == [(0.001, 0.01), ({"width": 8}, {"width": 16})]
    assert space.to_tune()["seed"] == {"grid_search": [0, 1]}


@pytest.mark.parametrize("text, named", [
    ('{learning_rate = "uniform(0, 1)"}', "unknown option 'learning_rate'"),
    ('{out = ["a", "b"]}', "out is set by the search"),
    ('{lr = "normal(0, 1)"}', "lr = 'normal(0, 1)' is neither a distribution"),
    ('{optimizer = "adam"}', "--optimizer"),
    ('{lr = "loguniform(0, 1)"}', "loguniform needs low > 0"),
    ('{lr = "uniform(0.1, 0.01)"}', "low must be below high"),
    ('{batch_size = "uniform(8, 64)"}', "batch_size takes an integer"),
    ('{batch_size = "choice(32, \'big\')"}', "batch_size must be an integer, got 'big'"),
    ('{lr = uniform(1e-3, 1)}', "not valid TOML"),
    ('{lr = "uniform(1e-3"}', "is neither a distribution"),
    ('{}', "the space is empty"),
])
def test_bad_spaces_are_refused_by_name(text, named):
    with pytest.raises(SpaceError) as e:
        parse_space(text)
    assert named in str(e.value)


def test_cli_refuses_a_bad_search_before_starting_anything(tmp_path, capsys):
    assert cli(["tune", "--space", '{lr = "uniform(0.001, 0.01)"}', "--samples", "0", "--out", str(tmp_path / "s")]) == 2
    assert "samples must be >= 1" in capsys.readouterr().err
    # a value the fixed options make invalid: momentum applies only to the momentum optimizers
    assert cli(["tune", "--space", '{momentum = "uniform(0.5, 0.9)"}', "--out", str(tmp_path / "s")]) == 2
    assert "space: momentum = 0.5 makes an invalid run: momentum = 0.5 applies only with optimizer" \
        in capsys.readouterr().err
    assert cli(["tune", "--out", str(tmp_path / "s"), "--quiet"]) == 2   # tune takes train's --quiet too
    assert "give --space" in capsys.readouterr().err
    assert cli(["tune", "--resume", str(tmp_path / "nowhere")]) == 2
    assert "not a search folder" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return prepared_mnist(tmp_path_factory.mktemp("search-data"), n_train=640, n_test=100, seed=5, shards=2)


def _wait_for(predicate, timeout, what):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"no {what} within {timeout} s")
        time.sleep(0.2)


def test_search_with_asha_a_failing_trial_and_an_interruption(data_dir, tmp_path):
    """Four trials, ASHA, two at a time on two CPUs; the first trial to reach its second epoch fails
    once and is retried from its epoch-1 checkpoint; the search is interrupted (SIGINT) once a trial
    has finished, and resumed."""
    (tmp_path / "flaky.py").write_text(FLAKY)
    marker = tmp_path / "failed-once"
    out = tmp_path / "search"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "-m", "distnn.cli", "tune", "--space",
               '{lr = "loguniform(1e-3, 3e-2)", batch_size = "choice(32, 64)"}', "--samples", "4",
               "--scheduler", "asha", "--max-concurrent", "2", "--max-failures", "1", "--epochs", "2",
               "--batch-size", "32", "--warmup", "5", "--model", f"{tmp_path / 'flaky.py'}:build", "--model-options",
               f'{{marker = "{marker}"}}', "--data", str(data_dir), "--dataset", "mnist",
               "--out", str(out)]
    # the batch size is searched too; the fixed one only has to be valid
    proc = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    try:
        def a_trial_finished():
            return any("done:" in log.read_text() for log in (out / "logs").glob("*.log"))
        _wait_for(lambda: a_trial_finished() or proc.poll() is not None, 300, "finished trial")
        proc.send_signal(signal.SIGINT)
        first, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, first
    assert f"continue with: distnn tune --resume {out}" in first
    interrupted = json.loads((out / "search.json").read_text())
    assert interrupted["interrupted"] is True

    second = subprocess.run([sys.executable, "-m", "distnn.cli", "tune", "--resume", str(out)], cwd=tmp_path,
                            env=env, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, first + second.stdout + second.stderr
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert len(rows) == 4
    assert {r["status"] for r in rows} <= {"done", "stopped early"}, rows
    assert any(r["status"] == "done" and r["epoch"] == "2" for r in rows)
    for r in rows:
        run = Path(r["run"])
        epochs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()
                  if json.loads(line)["type"] == "epoch"]
        assert float(r["test_accuracy"]) == pytest.approx(epochs[-1]["test_accuracy"])
        assert 0.0 <= float(r["lr"]) and r["batch_size"] in ("32", "64")
        if r["status"] == "done":
            assert (run / "model.h5").is_file() and (run / "summary.json").is_file()
    best = json.loads((out / "search.json").read_text())
    assert best["interrupted"] is False and best["trials"] == 4
    assert best["best"]["test_accuracy"] == max(float(r["test_accuracy"]) for r in rows)
    assert best["best"]["trial"] in {r["trial"] for r in rows if float(r["test_accuracy"]) == best["best"]["test_accuracy"]}

    # the failure happened once, and its trial went on from its epoch-1 checkpoint
    assert marker.exists()
    logs = {p.stem: p.read_text() for p in (out / "logs").glob("*.log")}
    failed = [text for text in logs.values() if "failed: RuntimeError: failing once on purpose" in text]
    assert len(failed) == 1, logs
    assert "resuming" in failed[0].partition("failing once on purpose")[2]
    # each trial ran in a placement group of its own: one bundle of 1 CPU for its one worker
    groups = {t: [line for line in text.splitlines() if "placement group" in line][0].split()[5]
              for t, text in logs.items()}
    assert len(set(groups.values())) == len(groups) >= 4
    assert all("[{'CPU': 1.0}]" in text for text in logs.values())

    assert cli(["plot", str(out)]) == 0
    assert (out / "curves.png").stat().st_size > 1000


def test_python_api_searches_a_grid_over_arrays(tmp_path, ray_backend):
    """distnn.tune from Python, on arrays it prepares once: a grid of two learning rates, FIFO."""
    import numpy as np

    import distnn
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (256, 1, 28, 28), dtype=np.uint8)
    y = (x[:, 0, :14].mean(axis=(1, 2)) > x[:, 0, 14:].mean(axis=(1, 2))).astype(np.int64)  # learnable
    lines = []
    search = distnn.tune("lenet5", (x, y, x[:64], y[:64]), space={"lr": [0.003, 0.01]}, epochs=1, batch_size=32,
                         warmup=2, out=tmp_path / "s", data_dir=str(tmp_path / "data"), log=lines.append)
    assert [r["lr"] for r in search.results] == [0.003, 0.01]
    assert [r["status"] for r in search.results] == ["done", "done"]
    assert not search.interrupted
    best = max(search.results, key=lambda r: r["test_accuracy"])
    assert search.best.path == Path(best["run"])
    assert search.best.summary is None and search.best.evaluate()["accuracy"] == pytest.approx(best["test_accuracy"])
    assert sum("done" in line for line in lines if line.startswith(search.results[0]["trial"][:5])) == 2
    with pytest.raises(SpaceError, match="unknown option 'learning_rate'"):
        distnn.tune("lenet5", (x, y), space={"learning_rate": [0.1]}, out=tmp_path / "t",
                    data_dir=str(tmp_path / "data"))


def test_a_missing_ray_tune_is_refused_with_the_pip_line(monkeypatch, capsys):
    import ray

    import distnn.search
    monkeypatch.setitem(sys.modules, "ray.tune", None)          # as if ray[tune]'s packages were absent
    monkeypatch.delattr(ray, "tune", raising=False)
    monkeypatch.delitem(sys.modules, "distnn.search.tuner", raising=False)
    monkeypatch.delattr(distnn.search, "tuner", raising=False)
    assert cli(["tune", "--space", '{lr = [0.01]}']) == 2
    assert "searching needs Ray Tune: pip install 'distnn[tune]'" in capsys.readouterr().err

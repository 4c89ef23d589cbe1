"""One plan of a run (``train.setup.plan``), made without any process, and the download rule."""
from __future__ import annotations

import pytest

from datagen import make_mnist, prepared_mnist
from runs import QUIET
from distnn.config import TrainConfig
from distnn.data import sources
from distnn.train import setup
from distnn.train.errors import TrainingError


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return prepared_mnist(tmp_path_factory.mktemp("plan"), n_train=200, n_test=40, seed=3, shards=2)


def config(data, out, **kw):
    return TrainConfig(**{"model": "mlp", "data": str(data), "backend": "local", "out": str(out), "batch_size": 16,
                          "epochs": 2, **kw}).validate()


def test_plan_of_a_fresh_run(data, tmp_path):
    c = config(data, tmp_path / "run", scale_lr=True, lr=0.01, warmup=5)
    p = setup.plan(c, cpus=3, **QUIET)
    assert p.world == 3 and p.spec["model"] == "mlp" and p.spec["num_classes"] == 10
    # 200 rows over 2 shards and 3 workers: parts of 66, 67, 67 rows -> 4 full batches of 16 each
    assert p.length.steps_per_epoch == 4 and p.length.total_updates == 8
    assert p.optimizer.lr == pytest.approx(0.03) and p.schedule.total_steps == 8 and p.schedule.warmup_steps == 5
    assert p.local is None and p.data.batch_size == 16 and p.dataset == (data / "mnist").resolve()
    assert p.out == tmp_path / "run" and p.out.is_dir() and p.config.out == str(p.out)
    assert c.out == str(tmp_path / "run") and p.config is not c    # the caller's config is left as it was


def test_plan_follows_the_world_size_and_mode(data, tmp_path):
    local = setup.plan(config(data, tmp_path / "a", workers=2, sync_every=3), cpus=8, **QUIET)
    assert local.world == 2 and local.local.every == 3 and local.local.total == local.length.total_updates
    assert local.length.steps_per_epoch == 100 // 16
    run_async = setup.plan(config(data, tmp_path / "b", workers=2, mode="async", scale_lr=False), cpus=8,
                           **QUIET)
    assert run_async.length.total_updates == 2 * 2 * (100 // 16) and run_async.local is None


def test_plan_refuses_before_any_process(data, tmp_path):
    with pytest.raises(TrainingError, match="batch size 512 is larger than a worker's part"):
        setup.plan(config(data, tmp_path / "run", batch_size=512), cpus=2, **QUIET)
    with pytest.raises(TrainingError, match="needs 6 CPUs; the Ray cluster has 2"):
        setup.plan(config(data, tmp_path / "run", backend="ray", workers=3, threads=2), cpus=2, **QUIET)
    setup.plan(config(data, tmp_path / "held"), cpus=1, **QUIET)
    (tmp_path / "held" / "config.json").write_text("{}")
    with pytest.raises(TrainingError, match="holds a run already"):
        setup.plan(config(data, tmp_path / "held"), cpus=1, **QUIET)
    assert setup.plan(config(data, tmp_path / "held"), cpus=1, resuming=True, **QUIET).world == 1


@pytest.mark.parametrize("folder", ["datasets", "elsewhere/data"])
def test_a_named_source_missing_is_downloaded_into_any_data_folder(folder, tmp_path, monkeypatch, http_server):
    """The one download rule: the default --data and any other folder alike."""
    www, url = http_server
    _, source = make_mnist(www / "mnist", n_train=64, n_test=16)
    source.mirrors = [url + "mnist/"]
    monkeypatch.setitem(sources.SOURCES, "mnist", source)
    monkeypatch.chdir(tmp_path)
    said = []
    c = TrainConfig(model="mlp", data=folder, backend="local", out=str(tmp_path / "run"), batch_size=16).validate()
    p = setup.plan(c, cpus=1, log=said.append, progress=False)
    assert p.dataset == (tmp_path / folder / "mnist").resolve() and (p.dataset / "manifest.json").is_file()
    assert (tmp_path / folder / ".downloads" / "mnist" / "train-images-idx3-ubyte.gz").is_file()
    assert any("preparing it now from a download" in line for line in said)


def test_a_folder_that_is_no_source_is_refused_with_the_prepare_command(tmp_path):
    c = TrainConfig(model="mlp", dataset="mine", data=str(tmp_path), backend="local").validate()
    with pytest.raises(TrainingError, match="no prepared dataset; make it with `distnn prepare"):
        setup.plan(c, cpus=1, **QUIET)

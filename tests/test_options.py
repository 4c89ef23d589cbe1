"""One source of truth for options, a library that leaves its host process alone, and a fleet that
leaks nothing when it cannot start."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
from threadpoolctl import threadpool_info

from datagen import prepared_mnist
from distnn.cli import main as cli
from distnn.config import FIELDS, ConfigError, TrainConfig, load_config
from distnn.parallel import GradientWorker, LocalBackend
from distnn.parallel.specs import DataSpec
from distnn.train import Trainer, TrainingError
from distnn.train import setup
from distnn.train.fleet import Fleet

ROOT = Path(__file__).resolve().parents[1]


def test_every_config_key_is_a_flag_with_help_and_default(capsys):
    from distnn.cli import build_parser
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    actions = {a.dest: a for a in sub.choices["train"]._actions}
    for name in FIELDS:
        assert "(default" in actions[name].help, name
    assert all(name in actions["model"].help for name in ("mlp", "lenet5", "cifar_convnet", "resnet20"))
    assert "adamw" in actions["optimizer"].choices and "cosine" in actions["lr_schedule"].choices
    with pytest.raises(SystemExit):
        cli(["train", "--help"])
    text = capsys.readouterr().out
    assert all("--" + name.replace("_", "-") in text for name in FIELDS)


def test_mlflow_flag_takes_an_optional_uri():
    from distnn.cli import build_parser
    parse = build_parser().parse_args
    assert parse(["train", "--mlflow"]).mlflow == "default"           # MLFLOW_TRACKING_URI, else MLflow's own
    assert parse(["train", "--mlflow", "file:///tmp/runs"]).mlflow == "file:///tmp/runs"
    assert parse(["train"]).mlflow is None and parse(["train", "--tensorboard"]).tensorboard is True


@pytest.mark.parametrize("flags, message", [
    (["--optimizer", "adam", "--momentum", "0.5"], "momentum = 0.5 applies only with optimizer = 'momentum' or 'nesterov'"),
    (["--staleness", "2"], "staleness = 2 applies only with mode = 'async'"),
    (["--mode", "async", "--scale-lr"], "scale_lr = True applies only with mode = 'sync'"),
    (["--backend", "local", "--address", "auto"], "address = 'auto' applies only with backend = 'ray'"),
    (["--augment", "none", "--augment-pad", "2"], "augment_pad = 2 applies only with augment"),
    (["--optimizer", "momentum", "--momentum", "1.5"], "momentum must be in [0, 1)"),
])
def test_options_that_do_not_apply_are_refused(flags, message, capsys):
    assert cli(["train", *flags]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_model_options_flag_and_toml_agree(tmp_path):
    from distnn.train_cli import parse_table
    assert parse_table("{dropout = 0.3, widths = [4, 8]}") == {"dropout": 0.3, "widths": [4, 8]}
    cfg = tmp_path / "c.toml"
    cfg.write_text('optimizer = "nesterov"\nmomentum = 0.8\n[model_options]\nhidden = [32]\n')
    c = load_config(cfg, {"scale_lr": True})
    assert (c.momentum, c.model_options, c.scale_lr) == (0.8, {"hidden": [32]}, True)
    with pytest.raises(ConfigError, match="c.toml: momentum = 0.8 applies only"):
        load_config(cfg, {"optimizer": "sgd"})


def test_momentum_reaches_the_server(tmp_path):
    data = prepared_mnist(tmp_path, n_train=64, n_test=16, seed=1, shards=1)
    cfg = TrainConfig(model="mlp", data=str(data), workers=1, batch_size=16, epochs=1, backend="local",
                      out=str(tmp_path / "run"), optimizer="momentum", momentum=0.5).validate()
    trainer = Trainer(cfg, log=lambda *a: None, progress=False)
    try:
        assert trainer.fleet.servers[0].optimizer.momentum == 0.5
    finally:
        trainer.close()


def test_an_optimizers_own_hyperparameters_reach_the_server(tmp_path):
    """optimizer_options are checked against the optimizer's own arguments (declared once, in optim.py)
    and arrive in the shard's optimizer; a TOML table and the flag agree."""
    data = prepared_mnist(tmp_path, n_train=64, n_test=16, seed=1, shards=1)
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'model = "mlp"\ndata = "{data}"\nbackend = "local"\nworkers = 1\nepochs = 1\nbatch_size = 16\n'
                   f'out = "{tmp_path / "run"}"\noptimizer_options = {{betas = [0.8, 0.99], eps = 1e-6}}\n')
    trainer = Trainer(load_config(cfg), log=lambda *a: None, progress=False)
    try:
        opt = trainer.fleet.servers[0].optimizer
        assert (opt.b1, opt.b2, opt.eps) == (0.8, 0.99, 1e-6)
    finally:
        trainer.close()
    with pytest.raises(ConfigError, match="optimizer_options: rmsprop has no hyperparameter 'betas'; its own are "
                                          "eps, rho"):
        TrainConfig(optimizer="rmsprop", optimizer_options={"betas": [0.9, 0.9]}).validate()
    with pytest.raises(ConfigError, match="optimizer_options = {'betas': \\[0.9\\]}: not enough values"):
        TrainConfig(optimizer_options={"betas": [0.9]}).validate()


def test_every_option_is_in_one_group_and_help_shows_the_groups(capsys):
    from distnn.config import GROUPS
    grouped = [name for names in GROUPS.values() for name in names]
    assert sorted(grouped) == sorted(FIELDS) and len(grouped) == len(set(grouped))
    with pytest.raises(SystemExit):
        cli(["train", "--help"])
    out = capsys.readouterr().out
    assert all(f"{group} options:" in out for group in GROUPS)
    section = out.index("optimizer options:")
    assert section < out.index("--optimizer-options TABLE", section) < out.index("cluster options:")


def test_import_changes_nothing_in_the_host_process():
    """No allocator call, no Ray, no BLAS thread change at import; the CLI tunes the allocator."""
    code = """
import ctypes, json, sys
calls = []
class Spy(ctypes.CDLL):
    def __init__(self, name, *a, **kw):
        calls.append(str(name))
        super().__init__(name, *a, **kw)
ctypes.CDLL = Spy
import numpy
from threadpoolctl import threadpool_info
before = [i["num_threads"] for i in threadpool_info()]
import distnn, distnn.train, distnn.cli
after = [i["num_threads"] for i in threadpool_info()]
print(json.dumps({"libc": [c for c in calls if "libc" in c], "ray": "ray" in sys.modules, "same": before == after,
                  "tuned": distnn.tune_allocator()}))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["libc"] == [] and out["ray"] is False and out["same"] is True
    assert out["tuned"] is True       # an explicit call does it (glibc on Linux)


def test_worker_blas_limit_holds_only_while_it_computes(tmp_path, monkeypatch):
    data = prepared_mnist(tmp_path, n_train=64, n_test=16, seed=1, shards=1)
    host = [i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"]
    worker = GradientWorker({"model": "mlp", "num_classes": 10}, DataSpec(str(data / "mnist"), 8), 0, 1, threads=1)
    seen = []
    inner = worker._compute
    monkeypatch.setattr(worker, "_compute", lambda *a: seen.append(
        [i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"]) or inner(*a))
    worker.compute(worker.model.flat_params.copy())
    assert seen == [[1] * len(host)]
    assert [i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"] == host


class FailingBackend(LocalBackend):
    """Creates ``fail_at`` handles, then fails; records what it killed and whether it shut down."""

    def __init__(self, fail_at):
        self.fail_at, self.created, self.killed, self.shut = fail_at, [], [], False

    def create(self, cls, *args, cpus=1, **kwargs):
        if len(self.created) == self.fail_at:
            raise RuntimeError("no room for another actor")
        self.created.append(super().create(cls, *args, cpus=cpus, **kwargs))
        return self.created[-1]

    def kill(self, handle):
        self.killed.append(handle)

    def shutdown(self):
        self.shut = True


def test_fleet_that_fails_half_way_closes_what_it_started(tmp_path):
    data = prepared_mnist(tmp_path, n_train=64, n_test=16, seed=1, shards=1)
    backend = FailingBackend(fail_at=2)
    plan = setup.plan(TrainConfig(model="mlp", data=str(data), workers=3, batch_size=8, backend="local",
                                  out=str(tmp_path / "run")).validate(), cpus=3, log=lambda *a: None, progress=False)
    with pytest.raises(RuntimeError, match="no room"):
        Fleet(backend, plan, owns_backend=True)
    assert len(backend.created) == 2 and backend.killed == backend.created and backend.shut


def test_trainer_that_cannot_plan_starts_nothing(tmp_path):
    data = prepared_mnist(tmp_path, n_train=64, n_test=16, seed=1, shards=1)
    backend = FailingBackend(fail_at=99)
    cfg = TrainConfig(model="mlp", data=str(data), workers=2, batch_size=512, backend="local",
                      out=str(tmp_path / "run")).validate()
    with pytest.raises(TrainingError, match="batch size 512 is larger"):
        Trainer(cfg, backend=backend, log=lambda *a: None, progress=False)
    assert backend.created == [] and not backend.shut


def test_trainer_that_cannot_start_leaks_nothing(tmp_path):
    data = prepared_mnist(tmp_path, n_train=64, n_test=16, seed=1, shards=1)
    backend = FailingBackend(fail_at=2)     # the two workers start, the server shard cannot
    cfg = TrainConfig(model="mlp", data=str(data), workers=2, batch_size=8, backend="local",
                      out=str(tmp_path / "run")).validate()
    with pytest.raises(RuntimeError, match="no room"):
        Trainer(cfg, backend=backend, log=lambda *a: None, progress=False)
    assert len(backend.created) == 2 and backend.killed == backend.created
    assert not backend.shut           # a backend passed in belongs to the caller


def test_one_public_name_per_thing_with_docstrings():
    """distnn.ops exports the lower-case functions (operator classes stay in their modules), so no
    public name means one thing in ops and another in nn; every public function and class says what
    it does."""
    import inspect
    import types

    from distnn import nn, ops
    public = {n: v for n, v in vars(ops).items() if not n.startswith("_") and not isinstance(v, types.ModuleType)}
    classes = {n for n, v in public.items() if inspect.isclass(v)}
    assert classes == {"Operator"}
    assert not set(public) & set(vars(nn))
    for name, fn in public.items():
        assert fn.__doc__ and fn.__doc__.strip(), f"ops.{name} has no docstring"
    for name in nn.LAYERS:
        assert nn.LAYERS[name].__doc__, f"nn.{name} has no docstring"


def test_pipeline_needs_async_with_a_bound_of_at_least_one():
    from distnn.config import ConfigError, TrainConfig
    with pytest.raises(ConfigError, match=r"pipeline = True applies only with mode = 'async' and a staleness bound"):
        TrainConfig(pipeline=True).validate()
    with pytest.raises(ConfigError, match=r"here staleness = 0"):
        TrainConfig(mode="async", staleness=0, pipeline=True).validate()
    assert TrainConfig(mode="async", pipeline=True).validate().pipeline

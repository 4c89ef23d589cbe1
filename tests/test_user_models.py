"""A user's network: a Module subclass with its own forward (residual addition, concatenation) in a
file outside the package, trained from the CLI and from distnn.fit, locally and on Ray (its code shipped
to the workers), resumed bit-identically, rebuilt by eval/export/--resume, refused by name when its
file is gone or changed. resnet20 and layer lists from TOML. The Python API end to end."""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import distnn
from clusters import on_cluster
from datagen import prepared_mnist
from runs import final_state, train
from distnn.cli import main as cli
from distnn.config import TrainConfig, load_config
from distnn.models import build_model
from distnn.train import Trainer, TrainingError

ROOT = Path(__file__).resolve().parents[1]

NETS = '''
import numpy as np
from distnn import nn, ops


class Residual(nn.Module):
    """flatten -> Linear -> relu(h + f(h)) -> [tanh branch, relu branch] concatenated -> classes."""

    def __init__(self, d, k, width):
        super().__init__()
        self.inp, self.mid = nn.Linear(d, width), nn.Linear(width, width)
        self.left, self.right = nn.Linear(width, width // 2), nn.Linear(width, width // 2)
        self.out = nn.Linear(width, k)

    def forward(self, x):
        h = ops.relu(self.inp(ops.flatten(x)))
        h = ops.relu(h + self.mid(h))
        return self.out(ops.concat([ops.tanh(self.left(h)), ops.relu(self.right(h))], axis=1))


def build(input_shape, num_classes, width=16):
    return Residual(int(np.prod(input_shape)), num_classes, width)
'''


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return prepared_mnist(tmp_path_factory.mktemp("user-data"), n_train=512, n_test=64, seed=8, shards=2)


@pytest.fixture
def builder(tmp_path):
    folder = tmp_path / "elsewhere" / "my_code"     # not on anyone's import path
    folder.mkdir(parents=True)
    (folder / "user_nets.py").write_text(NETS)
    return folder / "user_nets.py"


def cfg(data_dir, out, builder, **kw):
    base = dict(model=f"{builder}:build", data=str(data_dir), workers=2, batch_size=32, epochs=2, backend="local",
                out=str(out), log_every=2, checkpoint_every=5, seed=4, model_options={"width": 12}, warmup=2)
    base.update(kw)
    return TrainConfig(**base).validate()


def test_builder_model_trains_and_resumes_bit_identically(data_dir, tmp_path, builder):
    whole = train(cfg(data_dir, tmp_path / "a", builder))
    stop = lambda trainer, step: trainer.request_stop() if step == 7 else None  # noqa: E731
    with pytest.raises(distnn.train.TrainingInterrupted):
        train(cfg(data_dir, tmp_path / "b", builder), hook=stop)
    assert cli(["train", "--resume", str(tmp_path / "b"), "--quiet"]) == 0
    a, b = final_state(tmp_path / "a"), final_state(tmp_path / "b")
    assert whole["steps"] == 16 and a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    spec = json.loads((tmp_path / "a" / "config.json").read_text())["spec"]
    assert spec["builder"] == f"{builder}:build" and spec["options"] == {"width": 12} and len(spec["sha256"]) == 64
    model = distnn.load(tmp_path / "a")                       # rebuilt from the recorded builder
    assert [n for n, _ in model.named_parameters()][:2] == ["inp.weight", "inp.bias"]


def test_builder_file_changed_or_missing_is_named(data_dir, tmp_path, builder, capsys):
    train(cfg(data_dir, tmp_path / "run", builder, epochs=1))
    builder.write_text(NETS.replace("width=16", "width=8"))
    assert cli(["eval", str(tmp_path / "run")]) == 1
    err = capsys.readouterr().err
    assert f"{builder}: builder changed since the model was made" in err and err.count("\n") == 1
    builder.unlink()
    assert cli(["export", str(tmp_path / "run")]) == 1
    assert f"{builder}: builder file not found" in capsys.readouterr().err
    assert cli(["train", "--resume", str(tmp_path / "run"), "--quiet"]) == 2
    assert "builder file not found" in capsys.readouterr().err


def test_builder_model_exports_under_its_own_names(data_dir, tmp_path, builder):
    train(cfg(data_dir, tmp_path / "run", builder, epochs=1))
    assert cli(["export", str(tmp_path / "run"), "--format", "npz", "--out", str(tmp_path / "m.npz")]) == 0
    exported = np.load(tmp_path / "m.npz")
    model = distnn.load(tmp_path / "run")
    assert sorted(exported.files) == sorted(n for n, _ in model.named_parameters())
    assert np.array_equal(exported["mid.weight"], model.mid.weight.data)


RAY_SCRIPT = """
import json
from distnn.config import TrainConfig
from distnn.train import Trainer
sources = []
def record(trainer, step):
    if step == 1:
        fleet = trainer.fleet
        sources.extend(fleet.get([fleet.backend.call(w, "model_source") for w in fleet.workers]))
config = TrainConfig(model=model, data=data, workers=2, batch_size=32, epochs=1, backend="ray", out=out,
                     address=address).validate()
trainer = Trainer(config, log=lambda *a: None, progress=False, on_step=record)
summary = trainer.run()
trainer.close()
print("RESULT", json.dumps({"steps": summary["steps"], "sources": sources}))
"""


def run_script(code, timeout=300):
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout,
                          cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.split("RESULT ", 1)[1].splitlines()[0])


@pytest.mark.cluster   # starts a Ray cluster: not in the quick loop
def test_builder_code_travels_to_ray_workers(data_dir, tmp_path, builder):
    values = (f"{builder}:build", str(data_dir), str(tmp_path / "run"), None)
    result = run_script(f"model, data, out, address = {values!r}\n" + RAY_SCRIPT)
    assert result["steps"] == 8
    assert len(result["sources"]) == 2 and all(s and s != str(builder) and s.endswith("user_nets.py")
                                               for s in result["sources"])    # the shipped copy


@pytest.mark.cluster   # starts a Ray cluster: not in the quick loop
def test_builder_on_a_two_node_cluster(data_dir, tmp_path, builder):
    """One CPU per node and one per worker: the two workers run on different nodes."""
    out = on_cluster("address = cluster.address\n" + RAY_SCRIPT, connect=False, model=f"{builder}:build",
                     data=str(data_dir), out=str(tmp_path / "run"))
    result = json.loads(out.first["RESULT"])
    assert result["steps"] == 8 and all(s != str(builder) for s in result["sources"])


@pytest.mark.cluster   # starts a Ray cluster: not in the quick loop
def test_cli_trains_builder_on_two_ray_workers(data_dir, tmp_path, builder):
    proc = subprocess.run([sys.executable, "-m", "distnn.cli", "train", "--model", f"{builder}:build",
                           "--model-options", "{width = 8}", "--data", str(data_dir), "--workers", "2",
                           "--epochs", "1", "--batch-size", "32", "--out", str(tmp_path / "run"), "--quiet"],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["model"] == "build" and summary["workers"] == 2 and summary["final"]["test_count"] == 64


# -- the zoo sized from the data, resnet20, layer lists -------------------------------------------------

def test_layers_from_toml_train(data_dir, tmp_path):
    toml = tmp_path / "net.toml"
    toml.write_text('epochs = 1\nbatch_size = 32\n[[layers]]\ntype = "Flatten"\n'
                    '[[layers]]\ntype = "Linear"\nin_features = 784\nout_features = 10\n')
    config = load_config(toml, {"data": str(data_dir), "backend": "local", "workers": 1, "out": str(tmp_path / "r")})
    assert train(config)["model"] == "layers"
    assert [n for n, _ in distnn.load(tmp_path / "r").named_parameters()] == ["1.weight", "1.bias"]


def test_resnet20_has_the_papers_size_and_checks_in_float64():
    from distnn.gradcheck import gradcheck_module
    from distnn.models.resnet import ResNet
    assert 0.26e6 < build_model({"model": "resnet20", "num_classes": 10}).flat_params.size < 0.28e6
    with distnn.init.seeded(0):   # a fixed network: no ReLU input of it lies within the check's step of 0
        net = ResNet(num_classes=3, blocks=(1, 1), widths=(4, 8), in_channels=2)   # both shortcut kinds
    x = np.random.default_rng(0).standard_normal((3, 2, 6, 6))
    for mode in (distnn.train_mode, distnn.eval_mode):
        with mode():
            assert gradcheck_module(net, x, rtol=1e-6) <= 1e-6


def test_resnet20_equals_pytorch():
    """Outputs and every parameter's gradient against PyTorch's, float64, relative error <= 1e-8."""
    torch = pytest.importorskip("torch")
    import torch.nn.functional as F
    from distnn.interchange import torch_twin
    theirs = torch_twin({"model": "resnet20", "num_classes": 10}).double()
    ours = build_model({"model": "resnet20", "num_classes": 10, "seed": 1}).astype(np.float64)
    state = {n: torch.from_numpy(p.data.copy()) for n, p in ours.named_parameters()}
    missing, unexpected = theirs.load_state_dict(state, strict=False)
    assert not unexpected and all("running" in m or "num_batches" in m for m in missing)
    x = np.random.default_rng(2).standard_normal((4, 3, 32, 32))
    y = np.array([1, 5, 3, 9])
    with distnn.train_mode():
        loss = distnn.ops.softmax_cross_entropy(ours(x), y)
        loss.backward()
    tx = torch.from_numpy(x)
    tloss = F.cross_entropy(theirs(tx), torch.from_numpy(y))
    tloss.backward()
    assert abs(float(loss.data) - tloss.item()) <= 1e-10 * abs(tloss.item())
    grads = dict(theirs.named_parameters())
    for name, p in ours.named_parameters():
        g = grads[name].grad.numpy()
        assert np.abs(p.grad - g).max() <= 1e-8 * max(np.abs(g).max(), 1e-12), name


def test_zoo_models_sized_from_the_manifest(tmp_path):
    from distnn.data import prepare_from
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "img.npz", x=rng.integers(0, 256, (80, 32, 32, 3), dtype=np.uint8), y=rng.integers(0, 7, 80))
    np.savez(tmp_path / "tab.npz", x=rng.normal(size=(80, 13)).astype(np.float32), y=rng.integers(0, 4, 80))
    for f in ("img", "tab"):
        prepare_from("npz", tmp_path / f"{f}.npz", out=tmp_path / "ds", shards=1, progress=False, log=lambda *a: None)
    for model, dataset, classes in (("lenet5", "img", 7), ("lstm_classifier", "img", 7), ("mlp", "tab", 4)):
        out = tmp_path / f"{model}-{dataset}"
        config = TrainConfig(model=model, dataset=dataset, data=str(tmp_path / "ds"), backend="local", workers=1,
                             batch_size=16, epochs=1, out=str(out)).validate()
        assert train(config)["final"]["test_count"] == 8
        spec = json.loads((out / "config.json").read_text())["spec"]
        assert spec["num_classes"] == classes and spec["input_shape"] == ([3, 32, 32] if dataset == "img" else [13])


def test_wrong_label_field_names_the_ones_there(data_dir, tmp_path):
    with pytest.raises(TrainingError, match="no labels 'fine'; this dataset has labels"):
        Trainer(TrainConfig(labels="fine", data=str(data_dir), backend="local", out=str(tmp_path)).validate())


# -- the Python API ---------------------------------------------------------------------------------

def arrays(n=400, d=10, k=3, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)).astype(np.float32)
    y = (x @ rng.normal(size=(d, k))).argmax(axis=1)
    return x, y


def test_fit_on_arrays_history_evaluate_predict_load(tmp_path, builder):
    x, y = arrays()
    run = distnn.fit(f"{builder}:build", (x[:300], y[:300], x[300:], y[300:]), backend="local", workers=2,
                     epochs=4, batch_size=25, lr=0.02, warmup=0, out=tmp_path / "run", data_dir=str(tmp_path / "ds"),
                     progress=False, log=lambda *a: None)
    epochs = [r for r in run.history if r["type"] == "epoch"]
    assert len(epochs) == 4 and epochs[-1]["test_accuracy"] > 0.6       # a linear rule is learnt
    p = run.predict(x[300:])
    assert p.shape == (100, 3) and np.allclose(p.sum(axis=1), 1, atol=1e-5)
    assert run.evaluate((x[300:], y[300:]))["accuracy"] == pytest.approx(epochs[-1]["test_accuracy"])
    assert run.evaluate()["accuracy"] == pytest.approx(epochs[-1]["test_accuracy"])
    assert np.array_equal(distnn.load(run.path).flat_params, run.model.flat_params)


def test_fit_stopped_by_ctrl_c_resumes_to_the_same_parameters(tmp_path):
    x, y = arrays(seed=1)
    common = dict(backend="local", workers=2, epochs=3, batch_size=20, data_dir=str(tmp_path / "ds"), progress=False,
                  checkpoint_every=4)
    whole = distnn.fit("mlp", (x, y), out=tmp_path / "a", log=lambda *a: None, **common)

    def interrupt_after_first_epoch(message):
        if message.startswith("epoch 1/"):
            os.kill(os.getpid(), signal.SIGINT)       # what Ctrl-C in a notebook does
    cut = distnn.fit("mlp", (x, y), out=tmp_path / "b", log=interrupt_after_first_epoch, **common)
    assert cut.stopped and "continue with" in cut.stopped and cut.summary is None
    done = distnn.fit(resume=cut.path, backend="local", progress=False, log=lambda *a: None)
    assert done.summary["steps"] == whole.summary["steps"]
    assert np.array_equal(distnn.load(whole.path).flat_params, distnn.load(done.path).flat_params)


def test_predict_command_writes_probabilities(tmp_path, capsys):
    from PIL import Image
    rng = np.random.default_rng(3)
    images = rng.integers(0, 256, (60, 8, 8), dtype=np.uint8)
    run = distnn.fit("mlp", (images, rng.integers(0, 2, 60)), backend="local", workers=1, epochs=1, batch_size=10,
                     out=tmp_path / "run", data_dir=str(tmp_path / "ds"), progress=False, log=lambda *a: None,
                     model_options={"hidden": [8]})
    np.savez(tmp_path / "new.npz", x=images[:5])
    assert cli(["predict", str(run.path), "--input", str(tmp_path / "new.npz"), "--out", str(tmp_path / "p.csv")]) == 0
    rows = (tmp_path / "p.csv").read_text().splitlines()
    assert rows[0] == "input,predicted,0,1" and len(rows) == 6
    probs = np.array([[float(v) for v in r.split(",")[2:]] for r in rows[1:]])
    assert np.allclose(probs, run.predict(images[:5]), atol=1e-5)
    (tmp_path / "pics").mkdir()
    for i in range(3):
        Image.fromarray(np.kron(images[i], np.ones((2, 2), np.uint8))).save(tmp_path / "pics" / f"{i}.png")  # 16x16
    assert cli(["predict", str(run.path), "--input", str(tmp_path / "pics")]) == 0
    out = (run.path / "predictions-pics.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in out[1:]] == ["0.png", "1.png", "2.png"]


@pytest.mark.cluster   # starts a Ray cluster: not in the quick loop
def test_fit_trains_builder_on_two_ray_workers(tmp_path, builder):
    x, y = arrays(seed=2)
    np.savez(tmp_path / "mine.npz", x=x, y=y)
    code = f"""
import json, sys
sys.path.insert(0, {str(ROOT)!r})
import distnn
run = distnn.fit({str(builder) + ':build'!r}, {str(tmp_path / 'mine.npz')!r}, workers=2, epochs=2, batch_size=20,
                 data_dir={str(tmp_path / 'ds')!r}, out={str(tmp_path / 'run')!r}, progress=False, log=lambda *a: None)
x = __import__("numpy").load({str(tmp_path / 'mine.npz')!r})["x"]
print("RESULT", json.dumps({{"backend": run.summary["backend"], "workers": run.summary["workers"],
                            "count": run.summary["final"]["test_count"], "p": list(run.predict(x[:2]).shape)}}))
"""
    result = run_script(code)
    assert result == {"backend": "ray", "workers": 2, "count": 40, "p": [2, 3]}

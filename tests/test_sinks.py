"""The metrics stream in TensorBoard event files and in an MLflow tracking store, read back."""
import json
import struct
import sys

import numpy as np
import pytest

from datagen import prepared_mnist
from distnn.config import TrainConfig
from distnn.train import Trainer, TrainingError
from distnn.train.sinks import scalars


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return prepared_mnist(tmp_path_factory.mktemp("sinks"), n_train=128, n_test=32, seed=2, shards=2)


def run(data, out, **kw):
    cfg = TrainConfig(model="mlp", data=str(data), workers=2, batch_size=16, epochs=2, backend="local",
                      out=str(out), log_every=2, **kw).validate()
    trainer = Trainer(cfg, log=lambda *a: None, progress=False)
    try:
        return trainer.run()
    finally:
        trainer.close()


def expected(out) -> dict:
    """name -> {step: value} of every number metrics.jsonl holds."""
    found = {}
    for line in (out / "metrics.jsonl").read_text().splitlines():
        step, values = scalars(json.loads(line))
        for name, value in values.items():
            found.setdefault(name, {})[step] = value
    return found


def read_events(folder) -> dict:
    """name -> {step: value} of the scalars in TensorBoard event files (TFRecord frames of Event
    protocol buffers: length, its CRC, the record, its CRC)."""
    from tensorboardX.proto.event_pb2 import Event
    found = {}
    for path in sorted(folder.glob("events.out.tfevents.*")):
        data, at = path.read_bytes(), 0
        while at < len(data):
            (length,) = struct.unpack("<Q", data[at:at + 8])
            event = Event.FromString(data[at + 12:at + 12 + length])
            at += 12 + length + 4
            for v in event.summary.value:
                found.setdefault(v.tag, {})[event.step] = v.simple_value
    return found


def test_tensorboard_event_files_hold_every_metric_of_the_run(data, tmp_path):
    pytest.importorskip("tensorboardX")   # a test extra: installed in CI
    run(data, tmp_path / "run", tensorboard=True)
    want, got = expected(tmp_path / "run"), read_events(tmp_path / "run" / "tensorboard")
    assert {"step/loss", "step/accuracy", "step/lr", "step/samples_per_s", "epoch/test_accuracy",
            "epoch/test_loss"} <= set(want)
    assert set(got) == set(want)
    for name, steps in want.items():
        assert set(got[name]) == set(steps)
        np.testing.assert_allclose([got[name][s] for s in steps], list(steps.values()), rtol=1e-6, err_msg=name)


def test_mlflow_run_holds_the_options_metrics_and_model(data, tmp_path, monkeypatch):
    mlflow = pytest.importorskip("mlflow")   # a test extra: installed in CI
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")   # a local folder store, read back below
    uri = (tmp_path / "mlruns").as_uri()
    summary = run(data, tmp_path / "run", mlflow=uri, lr=0.003)
    client = mlflow.tracking.MlflowClient(uri)
    (found,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert found.info.status == "FINISHED" and found.info.run_name == "run"
    assert found.data.params["lr"] == "0.003" and found.data.params["model"] == "mlp"
    want = expected(tmp_path / "run")
    assert set(found.data.metrics) == set(want)
    history = sorted((m.step, m.value) for m in client.get_metric_history(found.info.run_id, "epoch/test_accuracy"))
    steps, values = zip(*sorted(want["epoch/test_accuracy"].items()))
    assert [s for s, _ in history] == list(steps)
    assert [v for _, v in history] == pytest.approx(list(values))
    assert history[-1][1] == pytest.approx(summary["final"]["test_accuracy"])
    artifacts = {a.path for a in client.list_artifacts(found.info.run_id)}
    assert {"model.h5", "summary.json"} <= artifacts


def test_a_missing_sink_package_is_refused_with_its_install_line(data, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboardX", None)   # as if it were not installed
    with pytest.raises(TrainingError, match=r"--tensorboard needs the tensorboardX package: pip install "
                                            r"'distnn\[tensorboard\]'"):
        run(data, tmp_path / "run", tensorboard=True)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()   # refused before any worker started

"""Where a run's metrics stream goes besides ``metrics.jsonl``: TensorBoard event files and an MLflow
tracking store. Each sink receives every record ``metrics.jsonl`` gets (steps, epochs, recoveries,
membership changes), as it is written, and the run's end. Both libraries are optional extras, imported
only when a run asks for their sink; a missing one is refused before the run starts, with the
``pip install`` line that brings it.
"""
from __future__ import annotations

import numbers
from pathlib import Path

from .errors import TrainingError


def scalars(record: dict) -> tuple[int, dict]:
    """(step, {name: value}) of a metrics record: every number in it named TYPE/KEY (a list of
    numbers, one per worker, as TYPE/KEY/RANK); the record's own type, step and epoch are not values."""
    kind = record.get("type", "record")
    step = int(record.get("after_step", record.get("step", 0)))
    values = {}
    for key, value in record.items():
        if key in ("type", "step", "after_step"):
            continue
        if isinstance(value, numbers.Real) and not isinstance(value, bool):
            values[f"{kind}/{key}"] = float(value)
        elif isinstance(value, list) and value and all(isinstance(v, numbers.Real) for v in value):
            values.update({f"{kind}/{key}/{i}": float(v) for i, v in enumerate(value)})
    return step, values


def _require(module: str, extra: str):
    import importlib
    try:
        return importlib.import_module(module)
    except ImportError:
        raise TrainingError(f"--{extra} needs the {module} package: pip install 'distnn[{extra}]'") from None


class TensorBoardSink:
    """Event files in RUN/tensorboard (tensorboardX; no TensorFlow): `tensorboard --logdir RUN`."""

    def __init__(self, out: Path):
        self.writer = _require("tensorboardX", "tensorboard").SummaryWriter(str(Path(out) / "tensorboard"))

    def __call__(self, record: dict) -> None:
        step, values = scalars(record)
        for name, value in values.items():
            self.writer.add_scalar(name, value, step)

    def finish(self, out: Path, summary: dict | None) -> None:
        self.writer.flush()

    def close(self, failed: bool = False) -> None:
        self.writer.close()


class MLflowSink:
    """One MLflow run: the options as parameters, the metrics stream, and at the end ``model.h5`` and
    ``summary.json`` as artifacts. ``uri``: a tracking URI, or 'default' (MLFLOW_TRACKING_URI, else
    MLflow's own default)."""

    def __init__(self, uri: str, out: Path, options: dict):
        self.mlflow = _require("mlflow", "mlflow")
        if uri != "default":
            self.mlflow.set_tracking_uri(uri)
        try:
            self.run = self.mlflow.start_run(run_name=Path(out).name)
        except Exception as e:   # a store that cannot be reached or opened: say which
            raise TrainingError(f"--mlflow: cannot start a run in {self.mlflow.get_tracking_uri()}: {e}") from None
        self.mlflow.log_params({k: str(v)[:500] for k, v in options.items()})

    def __call__(self, record: dict) -> None:
        step, values = scalars(record)
        if values:
            self.mlflow.log_metrics(values, step=step)

    def finish(self, out: Path, summary: dict | None) -> None:
        for name in ("model.h5", "summary.json"):
            if (Path(out) / name).is_file():
                self.mlflow.log_artifact(str(Path(out) / name))

    def close(self, failed: bool = False) -> None:
        if self.run is not None:
            self.mlflow.end_run(status="FAILED" if failed else "FINISHED")
            self.run = None


def make_sinks(config, out: Path) -> list:
    """The sinks ``config`` asks for (``tensorboard``, ``mlflow``)."""
    sinks = []
    if config.tensorboard:
        sinks.append(TensorBoardSink(out))
    if config.mlflow is not None:
        sinks.append(MLflowSink(config.mlflow, out, config.as_dict()))
    return sinks

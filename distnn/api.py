"""distnn from Python: ``fit`` a model on data, ``Run`` to read a finished run, ``load`` its model,
``tune`` to search options with Ray Tune.

    run = distnn.fit("nets.py:build", "data/mine.npz", workers=2, epochs=5)
    run.history[-1], run.evaluate(("x_test", "y_test" arrays)), run.predict(x)
    search = distnn.tune("lenet5", "mnist", space={"lr": "loguniform(1e-4, 1e-2)"}, samples=8, epochs=2)
    search.best, search.results

``model`` is a zoo name ("lenet5"), a builder reference ("nets.py:build", "mypkg.nets:build"), a builder
function defined in a file, a layer list, or a spec dict. ``data`` is a prepared dataset folder, a
named source ("mnist"), a data file (.npz, .h5) or folder of class subfolders, or arrays ``(x, y)`` /
``(x, y, x_test, y_test)``. The other options are TrainConfig's (``distnn train --help``).
"""
from __future__ import annotations

import hashlib
import inspect
import json
from pathlib import Path

import numpy as np

from .autograd import eval_mode, no_grad
from .data import SOURCES, prepare_from
from .data.arrays import as_examples
from .data.errors import DataError
from .data.loader import normalisation
from .ops import softmax


class Run:
    """A run folder made by ``fit`` or ``distnn train``: its summary, metrics and model."""

    def __init__(self, path, summary: dict | None = None, stopped: str | None = None):
        self.path = Path(path)
        if not (self.path / "config.json").is_file():
            raise FileNotFoundError(f"{self.path}: not a run folder (no config.json)")
        self.summary, self.stopped = summary, stopped
        self.info = json.loads((self.path / "dataset.json").read_text())
        self._model = None

    @property
    def history(self) -> list[dict]:
        """The records of metrics.jsonl: one per logged step, epoch and recovery."""
        return [json.loads(line) for line in (self.path / "metrics.jsonl").read_text().splitlines() if line.strip()]

    @property
    def model(self):
        """The trained model (``model.h5``; a stopped run's newest checkpoint)."""
        if self._model is None:
            self._model = load(self.path)
        return self._model

    def preprocess(self, x) -> np.ndarray:
        """Raw examples, as the dataset was given (uint8 images in any layout, or features), -> the
        normalised float32 batch the model takes."""
        x = as_examples(np.asarray(x), "input")
        shape = tuple(self.info["input_shape"])
        if x.shape[1:] != shape:
            raise DataError(f"input: examples of shape {x.shape[1:]}, the model was trained on {shape}")
        scale, shift = normalisation(self.info["kind"], self.info["mean"], self.info["std"])
        out = x.astype(np.float32)   # the loader's arithmetic, so a prediction sees what training saw
        out *= scale
        out += shift
        return out

    def predict(self, x, batch_size: int = 500) -> np.ndarray:
        """Class probabilities (N, K) of raw examples ``x``."""
        x = self.preprocess(x)
        out = []
        with eval_mode(), no_grad():
            for i in range(0, len(x), batch_size):
                out.append(softmax(self.model(x[i:i + batch_size]), axis=1).data)
        return np.concatenate(out) if out else np.zeros((0, len(self.info["classes"])), np.float32)

    def evaluate(self, data=None) -> dict:
        """Accuracy and loss on ``(x, y)`` arrays (raw, as for ``predict``) or, by default, on the
        test split of the run's dataset."""
        if data is None:
            from .data import Loader, open_dataset
            from .models import evaluate
            loader = Loader(open_dataset(self.info["path"]), "test", batch_size=500, labels=self.info["labels"],
                            shuffle=False, augment=False)
            r = evaluate(self.model, loader)
            return {"accuracy": r["correct"] / r["count"], "loss": r["loss_sum"] / r["count"], "count": r["count"]}
        x, y = data
        p = self.predict(x)
        y = np.asarray(y)
        return {"accuracy": float((p.argmax(axis=1) == y).mean()),
                "loss": float(-np.log(np.maximum(p[np.arange(len(y)), y], 1e-12)).mean()), "count": len(y)}

    def __repr__(self):
        final = (self.summary or {}).get("final") or {}
        return f"Run({str(self.path)!r}, test_accuracy={final.get('test_accuracy')})"


def load(run_or_file):
    """The model of a run folder (its model.h5, else its newest checkpoint) or of a model .h5 file."""
    from .checkpoint import latest_checkpoint, load_model
    path = Path(run_or_file)
    if path.is_dir():
        path = path / "model.h5" if (path / "model.h5").is_file() else latest_checkpoint(path)
    return load_model(path)


def _model_options(model) -> dict:
    """TrainConfig keys for ``model``."""
    if isinstance(model, str):
        return {"model": model}
    if isinstance(model, list):
        return {"layers": model}
    if isinstance(model, dict):
        if "layers" in model:
            return {"layers": model["layers"]}
        options = {k: v for k, v in model.items() if k not in ("model", "seed", "num_classes", "input_shape")}
        return {"model": model["model"], "model_options": options}
    if callable(model):
        module = inspect.getmodule(model)
        source = inspect.getsourcefile(model)
        if source is None or module is None:
            raise ValueError(f"{model!r}: define the builder in a .py file (a notebook cell has no file to ship "
                             "to the workers)")
        if module.__name__ != "__main__" and "." in module.__name__:
            return {"model": f"{module.__name__}:{model.__name__}"}
        return {"model": f"{Path(source).resolve()}:{model.__name__}"}
    raise TypeError(f"model must be a zoo name, a builder reference or function, a layer list or a spec, "
                    f"got {type(model).__name__}")


def _data_options(data, data_dir: str, progress: bool, log) -> dict:
    """TrainConfig keys for ``data``, preparing files and arrays into ``data_dir`` first."""
    if isinstance(data, (tuple, list)):
        arrays = [np.asarray(a) for a in data]
        if len(arrays) not in (2, 4):
            raise ValueError("data arrays must be (x, y) or (x, y, x_test, y_test)")
        digest = hashlib.sha256()
        for a in arrays:
            digest.update(str((a.dtype, a.shape)).encode())
            digest.update(np.ascontiguousarray(a).tobytes())
        name = f"arrays-{digest.hexdigest()[:12]}"
        if not (Path(data_dir) / name / "manifest.json").is_file():
            file = Path(data_dir) / f".{name}.npz"
            file.parent.mkdir(parents=True, exist_ok=True)
            np.savez(file, **dict(zip(("x", "y", "x_test", "y_test"), arrays)))
            try:
                prepare_from("npz", file, name, out=data_dir, progress=progress, log=log)
            finally:
                file.unlink()
        return {"dataset": name, "data": data_dir}
    path = Path(data)
    if str(data) in SOURCES or (path / "manifest.json").is_file():
        return {"dataset": str(data)}
    fmt = {".npz": "npz", ".h5": "hdf5", ".hdf5": "hdf5"}.get(path.suffix, "folder" if path.is_dir() else None)
    if fmt is None:
        raise ValueError(f"{path}: not a prepared dataset, a named source ({', '.join(SOURCES)}), an .npz / .h5 "
                         "file or a folder of class subfolders")
    if fmt == "folder" and any(path.glob("train-images*")):
        fmt = "idx"
    if not (Path(data_dir) / path.stem / "manifest.json").is_file():
        prepare_from(fmt, path, path.stem, out=data_dir, progress=progress, log=log)
    return {"dataset": path.stem, "data": data_dir}


def fit(model="lenet5", data="mnist", *, workers: int = 2, backend: str = "ray", epochs: int = 3, out=None,
        resume=None, progress: bool = True, log=print, data_dir: str = "datasets", **options) -> Run:
    """Train ``model`` on ``data`` data-parallel (``workers`` Ray workers, or ``backend="local"``);
    returns the Run. Ctrl-C (or SIGTERM) stops after the steps in flight with a checkpoint: the Run
    comes back with ``stopped`` set, and ``fit(..., resume=run.path)`` continues it. ``options``:
    any TrainConfig key (``lr``, ``batch_size``, ``mode``, ``model_options`` ...)."""
    from .config import TrainConfig
    from .train import Trainer, TrainingInterrupted
    from .train.checkpoints import resume_point
    if resume is not None:
        config, ckpt = resume_point(resume, {"backend": backend, **{k: v for k, v in options.items()
                                                                     if k in ("log_every", "checkpoint_every")}})
    else:
        keys = {**_model_options(model), **_data_options(data, data_dir, progress, log), **options}
        config, ckpt = TrainConfig(workers=workers, backend=backend, epochs=epochs, out=None if out is None else str(out),
                                   **keys).validate(), None
    trainer = Trainer(config, log=log, progress=progress, resume=ckpt)
    try:
        summary, stopped = trainer.run(), None
    except TrainingInterrupted as e:
        summary, stopped = None, str(e)
        log(f"stopped: {e}")
    finally:
        trainer.close()
    return Run(trainer.out, summary, stopped)


def tune(model="lenet5", data="mnist", *, space=None, samples: int = 1, scheduler: str = "fifo",
         metric: str = "test_accuracy", max_concurrent: int | None = None, max_failures: int = 0, out=None,
         resume=None, log=print, data_dir: str = "datasets", **options):
    """Search ``space`` (a dict or inline TOML table of option -> distribution string or list, see
    ``distnn.search.space``) with Ray Tune, each trial a distnn run of ``model`` on ``data`` with the
    fixed ``options`` (TrainConfig keys; ``workers`` per trial, default 1). ``scheduler``: 'fifo' or
    'asha'; ``resume``: a search folder to continue (the other arguments are then its own). Returns
    the ``Search``: ``.best`` the best trial's Run, ``.results`` a dict per trial (results.csv)."""
    from .search import load_tuner
    search = load_tuner()
    if resume is not None:
        return search.run(search.SearchPlan.load(resume), resume, resume=True, log=log)
    if space is None:
        raise ValueError("give space: the options to search, e.g. space={'lr': 'loguniform(1e-4, 1e-2)'}")
    fixed = {"data": data_dir, **_model_options(model), **_data_options(data, data_dir, False, log), **options}
    plan = search.SearchPlan(search.absolute_paths(fixed), space, samples, scheduler, metric, max_concurrent,
                             max_failures)
    return search.run(plan, out, log=log)

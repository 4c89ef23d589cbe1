"""distnn from Python: ``fit`` a model on data, ``Run`` to read a finished run, ``load`` its model,
``tune`` to search options with Ray Tune (``Run`` and ``load`` live in ``distnn.run``, below this
module and ``search``).

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
from pathlib import Path

import numpy as np

from .data import SOURCES, prepare_from
from .run import Run


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

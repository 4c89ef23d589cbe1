"""From a TrainConfig to what a run starts with: the prepared dataset, the model spec, the worker
and server specs, the number of workers and the run folder."""
from __future__ import annotations

import shutil
import time
from pathlib import Path

from ..config import TrainConfig
from ..data import SOURCES, ShardedDataset, prepare
from ..data.dataset import MANIFEST
from ..models import build_model, builders
from ..parallel.specs import DataSpec, OptimizerSpec, ScheduleSpec
from .errors import TrainingError


def dataset_path(c: TrainConfig) -> Path:
    """``c.dataset`` as a path of its own when it is one, else the folder of that name under ``c.data``."""
    own = Path(c.dataset).expanduser()
    return own if ("/" in c.dataset or own.is_absolute()) else Path(c.data) / c.dataset


def prepared_dataset(c: TrainConfig, log=print, progress=True) -> Path:
    """The dataset folder, absolute; a named source (mnist, ...) is prepared first when missing (from
    ``c.source``, or by download into the default folder)."""
    path = dataset_path(c)
    if not (path / MANIFEST).is_file():
        if c.dataset not in SOURCES:
            raise TrainingError(f"{path}: no prepared dataset; make it with `distnn prepare idx|npz|folder|hdf5 "
                                f"--source YOUR_DATA --name {path.name} --out {path.parent}`")
        if c.source is None and Path(c.data) != Path("datasets"):
            raise TrainingError(f"{path}: dataset not prepared; run `python scripts/prepare_data.py {c.dataset} "
                                f"--out {c.data} --source RAW_FOLDER` (or pass --source to distnn train)")
        log(f"{path}: not prepared yet; preparing it now")
        prepare(c.dataset, out=c.data, source=c.source, progress=progress, log=log)
    return path.resolve()


def model_spec(c: TrainConfig, dataset: ShardedDataset) -> dict:
    """The spec every process builds the network from; zoo models and builders are sized from the
    dataset's manifest (input shape, number of classes)."""
    try:
        classes = dataset.num_classes(c.labels)
    except Exception as e:  # DataError naming the label fields
        raise TrainingError(str(e)) from None
    if c.layers is not None:
        return {"layers": c.layers, "seed": c.seed}
    model = c.model or "lenet5"
    if builders.is_reference(model):
        try:
            return builders.make_spec(model, dataset.input_shape, classes, c.model_options, c.seed)
        except builders.BuilderError as e:
            raise TrainingError(str(e)) from None
    return {"model": model, "num_classes": classes, "input_shape": list(dataset.input_shape), "seed": c.seed,
            **c.model_options}


def data_spec(c: TrainConfig, path: Path) -> DataSpec:
    return DataSpec(path=str(path), batch_size=c.batch_size, labels=c.labels, seed=c.seed, augment=c.augment,
                    augment_pad=4 if c.augment_pad is None else c.augment_pad, label_smoothing=c.label_smoothing)


def optimizer_spec(c: TrainConfig, world: int) -> OptimizerSpec:
    """The servers' optimizer; with ``scale_lr`` (sync) the base rate times the number of workers."""
    lr = c.lr * (world if c.scale_lr and c.mode == "sync" else 1)
    return OptimizerSpec(name=c.optimizer, lr=lr, momentum=c.momentum, weight_decay=c.weight_decay)


def schedule_spec(c: TrainConfig, total_updates: int) -> ScheduleSpec:
    return ScheduleSpec(name=c.lr_schedule, total_steps=total_updates, warmup_steps=c.warmup)


def world_size(c: TrainConfig, cpus: int) -> int:
    """``c.workers``, or one per ``c.threads`` CPUs of the cluster; refuses more than a Ray cluster has."""
    world = c.workers or max(1, cpus // c.threads)
    if c.backend == "ray" and world * c.threads > cpus:
        raise TrainingError(f"--workers {world} x {c.threads} threads needs {world * c.threads} CPUs; "
                            f"the Ray cluster has {cpus}: use fewer workers or add nodes")
    return world


RUN_FILES = ("config.json", "metrics.jsonl", "model.h5", "summary.json", "checkpoints")


def run_folder(c: TrainConfig, resuming: bool = False, log=print) -> Path:
    """``c.out``, or runs/MODEL-DATASET-TIME; created. A folder that holds a run is continued only when
    resuming, and otherwise refused unless ``c.overwrite`` moves it aside or removes it."""
    out = Path(c.out or f"runs/{c.model_name}-{Path(c.dataset).name}-{time.strftime('%Y%m%d-%H%M%S')}")
    if not resuming and any((out / f).exists() for f in RUN_FILES):
        if c.overwrite is None:
            raise TrainingError(f"{out}: holds a run already; continue it with --resume {out}, or start afresh with "
                                "--overwrite move (keeps it as OUT.old-TIME) or --overwrite remove")
        if c.overwrite == "move":
            aside = out.with_name(f"{out.name}.old-{time.strftime('%Y%m%d-%H%M%S')}")
            out.rename(aside)
            log(f"{out}: moved the run there to {aside}")
        else:
            shutil.rmtree(out)
            log(f"{out}: removed the run there")
    out.mkdir(parents=True, exist_ok=True)
    return out


def build(spec: dict):
    """The driver's replica of the network; a spec that cannot be built is a TrainingError naming why."""
    try:
        return build_model(spec)
    except (ValueError, TypeError) as e:
        raise TrainingError(f"cannot build the model: {e}") from None


def write_run_info(out: Path, dataset: ShardedDataset, labels: str | None) -> None:
    """RUN/dataset.json: what a prediction needs without the dataset (its kind, shape, normalisation
    and class names)."""
    import json

    from .._io import atomic_write_text
    info = {"path": str(dataset.path), "kind": dataset.kind, "input_shape": list(dataset.input_shape),
            "mean": dataset.manifest["mean"], "std": dataset.manifest["std"],
            "labels": dataset.label_field(labels), "classes": dataset.class_names(labels)}
    atomic_write_text(Path(out) / "dataset.json", json.dumps(info, indent=1))

"""From a TrainConfig and the cluster's CPUs to one ``RunPlan``: what a run starts with (the
prepared dataset, the model spec, the number of workers, the run folder, the worker / optimizer /
schedule / local SGD specs and the run's length). A fresh run, a resumed one, a change of membership
and a search trial all start from a plan; it is plain data, made without any process of the run."""
from __future__ import annotations

import dataclasses
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .. import kernels, ops
from .._hardware import describe as describe_host
from .._io import atomic_write_text
from ..autograd import train_mode
from ..config import TrainConfig, workers_range
from ..data import SOURCES, Loader, ShardedDataset, open_dataset, prepare
from ..data.dataset import MANIFEST
from ..models import build_model, builders
from ..ops import conv_choice
from ..parallel import make_backend
from ..parallel.specs import DataSpec, LocalSpec, OptimizerSpec, ScheduleSpec
from .errors import TrainingError
from .modes import mode_of
from .schedule import RunLength


@dataclass(frozen=True)
class RunPlan:
    """One run, planned. ``config``: as run (``out`` filled in, so a checkpoint's config names its
    run); ``dataset``: the prepared folder, absolute; ``spec``: what every process builds the network
    from; ``world``: gradient workers; ``data``, ``optimizer``, ``schedule``: what the workers and the
    server shards are given; ``local``: local SGD (``sync_every`` > 1) or None; ``length``: how many
    updates, from the smallest worker's part of the data."""
    config: TrainConfig
    dataset: Path
    spec: dict
    world: int
    out: Path
    data: DataSpec
    optimizer: OptimizerSpec
    schedule: ScheduleSpec
    local: LocalSpec | None
    length: RunLength

    @property
    def mode(self):
        """How the run updates: ``modes.Sync``, ``LocalSGD`` or ``Async``."""
        return mode_of(self.config)


def plan(c: TrainConfig, cpus: int, resuming: bool = False, log=print, progress=True) -> RunPlan:
    """The plan of a run of ``c`` on a cluster of ``cpus`` CPUs: prepares the dataset when it is a
    named source not prepared yet, and claims the run folder (``run_folder``)."""
    path = prepared_dataset(c, log, progress)
    dataset = open_dataset(path)
    spec = model_spec(c, dataset)
    world = world_size(c, cpus)
    length, optimizer, schedule, local = _sized(c, dataset, world)
    out = run_folder(c, resuming=resuming, log=log)
    return RunPlan(config=dataclasses.replace(c, out=str(out)), dataset=path, spec=spec, world=world, out=out,
                   data=data_spec(c, path, world), optimizer=optimizer, schedule=schedule, local=local,
                   length=length)


def resized(p: RunPlan, world: int) -> RunPlan:
    """Plan ``p`` for ``world`` workers (a change of membership, ``train.membership``): the run's
    length, its schedule, local SGD's rounds, with ``scale_lr`` its learning rate and with
    ``global_batch`` the per-worker batch follow."""
    length, optimizer, schedule, local = _sized(p.config, open_dataset(p.dataset), world)
    return dataclasses.replace(p, world=world, length=length, optimizer=optimizer, schedule=schedule, local=local,
                               data=data_spec(p.config, p.dataset, world))


def _sized(c: TrainConfig, dataset: ShardedDataset, world: int):
    """(length, optimizer, schedule, local SGD) of ``c`` with ``world`` workers."""
    length = run_length(c, dataset, world)
    optimizer, schedule = optimizer_spec(c, world), schedule_spec(c, length.total_updates)
    local = None if c.sync_every == 1 else LocalSpec(optimizer, schedule, c.sync_every, length.steps_per_epoch,
                                                     length.total_updates)
    return length, optimizer, schedule, local


def kernel_choices(p: RunPlan, resuming: bool = False) -> dict:
    """The run's convolution algorithm of each conv layer (``ops.conv_choice``), fixed once: read from
    RUN/kernels.json when resuming a run that has one, else chosen here by one forward and backward of
    the model at the run's batch size - calibrating the shapes this host has not timed yet, and
    compiling the fused kernels into numba's cache before the workers start - and recorded there."""
    path = p.out / "kernels.json"
    if resuming and path.is_file():
        try:
            return json.loads(path.read_text())["convolutions"]
        except (ValueError, KeyError, TypeError) as e:
            raise TrainingError(f"{path}: unreadable ({e}); remove it to choose the algorithms again") from None
    start = time.perf_counter()
    model, shape = build(p.spec), open_dataset(p.dataset).input_shape
    x = np.zeros((p.data.batch_size, *shape), np.float32)
    try:
        with conv_choice.recording() as table, train_mode():
            ops.softmax_cross_entropy(model(x), np.zeros(len(x), np.int64)).backward()
    except ValueError as e:
        raise TrainingError(f"the model cannot train on a batch of {len(x)} inputs {tuple(shape)}: {e}") from None
    atomic_write_text(path, json.dumps({"convolutions": table, "kernels": kernels.mode(), "host": describe_host(),
                                        "seconds": round(time.perf_counter() - start, 3)}, indent=1))
    return table


def start_backend(c: TrainConfig, log=print):
    """The backend ``c`` asks for; a user's model code travels to every node in the Ray job's
    runtime environment. Without --address, a Ray cluster already running on this machine (``ray
    start``) is joined, as ``ray.init`` does, and said so in one line."""
    env = None
    if builders.is_reference(c.model):
        try:
            env = builders.runtime_env(builders.make_spec(c.model, (), 0))
        except builders.BuilderError as e:
            raise TrainingError(str(e)) from None
    backend = make_backend(c.backend, c.address, runtime_env=env)
    if getattr(backend, "joined", None):
        log(f"joined the Ray cluster already running on this machine ({backend.joined}); for a cluster of its "
            "own, stop that one (ray stop) or pass --address local")
    return backend


def run_length(c: TrainConfig, dataset: ShardedDataset, world: int) -> RunLength:
    """The run's length: ``c.epochs`` of the smallest worker part's full batches (or ``c.max_steps``)."""
    batch = c.worker_batch(world)
    per_worker = min(len(Loader(dataset, "train", r, world, batch, labels=c.labels, drop_last=True))
                     for r in range(world))
    if per_worker < 1:
        raise TrainingError(f"batch size {batch} is larger than a worker's part of the training data "
                            f"({dataset.path}, {world} workers); use a smaller --batch-size or fewer workers")
    return RunLength(per_worker, c.epochs, world, c.mode, c.max_steps)


def dataset_path(c: TrainConfig) -> Path:
    """``c.dataset`` as a path of its own when it is one, else the folder of that name under ``c.data``."""
    own = Path(c.dataset).expanduser()
    return own if ("/" in c.dataset or own.is_absolute()) else Path(c.data) / c.dataset


def prepared_dataset(c: TrainConfig, log=print, progress=True) -> Path:
    """The dataset folder, absolute. A named source (mnist, ...) missing under ``c.data``, whatever
    that folder, is prepared there first: from ``c.source`` when given, else downloaded (into
    ``c.data/.downloads``)."""
    path = dataset_path(c)
    if not (path / MANIFEST).is_file():
        if c.dataset not in SOURCES:
            raise TrainingError(f"{path}: no prepared dataset; make it with `distnn prepare idx|npz|folder|hdf5 "
                                f"--source YOUR_DATA --name {path.name} --out {path.parent}`")
        log(f"{path}: not prepared yet; preparing it now from {c.source or 'a download'}")
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


def data_spec(c: TrainConfig, path: Path, world: int) -> DataSpec:
    """What the workers read: the manifest travels with it, for machines that lack the folder."""
    return DataSpec(path=str(path), batch_size=c.worker_batch(world), labels=c.labels, seed=c.seed, augment=c.augment,
                    augment_pad=4 if c.augment_pad is None else c.augment_pad, label_smoothing=c.label_smoothing,
                    manifest=(Path(path) / MANIFEST).read_text())


def optimizer_spec(c: TrainConfig, world: int) -> OptimizerSpec:
    """The servers' optimizer; with ``scale_lr`` (sync) the base rate times the number of workers."""
    lr = mode_of(c).scaled_lr(c.lr, world, c.scale_lr)
    options = tuple((k, tuple(v) if isinstance(v, list) else v) for k, v in sorted(c.optimizer_options.items()))
    return OptimizerSpec(name=c.optimizer, lr=lr, momentum=c.momentum, weight_decay=c.weight_decay, options=options)


def schedule_spec(c: TrainConfig, total_updates: int) -> ScheduleSpec:
    return ScheduleSpec(name=c.lr_schedule, total_steps=total_updates, warmup_steps=c.warmup)


def world_size(c: TrainConfig, cpus: int) -> int:
    """``c.workers``, or one per ``c.threads`` CPUs of the cluster; a range MIN:MAX takes as many as the
    CPUs hold, at least MIN (a Ray cluster that cannot hold MIN stops the start at its deadline) and
    at most MAX (the local backend: MAX). Refuses a fixed number more than a Ray cluster has."""
    low, high = workers_range(c.workers)
    if low < high:
        return high if c.backend == "local" else max(low, min(high, cpus // c.threads))
    world = low or max(1, cpus // c.threads)
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


def write_run_files(p: RunPlan) -> None:
    """RUN/config.json (how to rebuild the run) and RUN/dataset.json (what a prediction needs without
    the dataset: its kind, shape, normalisation and class names)."""
    atomic_write_text(p.out / "config.json",
                      json.dumps({"config": p.config.as_dict(), "spec": p.spec, "workers": p.world}, indent=1))
    dataset, labels = open_dataset(p.dataset), p.config.labels
    info = {"path": str(dataset.path), "kind": dataset.kind, "input_shape": list(dataset.input_shape),
            "mean": dataset.manifest["mean"], "std": dataset.manifest["std"],
            "labels": dataset.label_field(labels), "classes": dataset.class_names(labels)}
    atomic_write_text(p.out / "dataset.json", json.dumps(info, indent=1))

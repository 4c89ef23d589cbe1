"""Training configuration: the one list of options. Each field of ``TrainConfig`` carries its help
text and, where it has them, its choices (from the registries: the model zoo, the optimizers, the
schedules, the dataset sources); the TOML keys, the ``distnn train`` flags and their ``--help`` all
come from here. ``validate`` rejects values out of range and options that do not apply to the chosen
optimizer or mode, with a message that names them."""
from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .data.sources import SOURCES
from .models import ZOO
from .models.builders import is_reference
from .optim import OPTIMIZERS, hyperparameters, make_optimizer
from .schedules import SCHEDULES
from .parallel.compress import parse as parse_compress

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


class ConfigError(ValueError):
    """A config key, type or value that is wrong; the message names it."""


def option(default, help: str, choices=None, const=None, **kw):
    """A config field with its help text and choices (None among them: the option may be unset);
    ``const``: the value of its flag given without one (``--mlflow`` alone)."""
    return field(default=default, metadata={"help": help, "choices": choices, "const": const}, **kw)


MOMENTUM_OPTIMIZERS = ("momentum", "nesterov")


@dataclass
class TrainConfig:
    model: str | None = option(None, f"the network: a zoo model ({', '.join(ZOO)}; default: lenet5) or a builder "
                                     "FILE.py:FUNCTION or package.module:FUNCTION")
    layers: list | None = option(None, "the network as a layer list (TOML [[layers]] tables) instead of a model")
    dataset: str = option("mnist", f"a prepared dataset: a folder under --data or a path; {', '.join(SOURCES)} "
                                   "are prepared when missing")
    labels: str | None = option(None, "which label field, for datasets with several (CIFAR-100: fine, coarse; "
                                      "default: the first)")
    data: str = option("datasets", "folder holding prepared datasets")
    source: str | None = option(None, "raw files to prepare a missing dataset from (default: download)")
    fetch_data: bool = option(True, "a machine that lacks the shards its workers read (or holds copies that differ "
                                    "from the manifest) gets them from the driver's machine into its cache "
                                    "(DISTNN_CACHE_DIR); --no-fetch-data: a missing shard stops the run")
    workers: int | str = option(0, "gradient workers: N, or MIN:MAX to follow the cluster (start once MIN can be "
                                   "placed, use up to MAX, go on with the survivors when a node is lost, grow back "
                                   "when one joins; Ray only); 0: one per CPU of the cluster")
    threads: int = option(1, "BLAS threads per worker")
    backend: str = option("ray", "where workers run: a Ray cluster, or one process (debugging)", ("ray", "local"))
    address: str | None = option(None, "Ray cluster to join: auto or HOST:PORT, or local for a cluster of the "
                                       "run's own (default: RAY_ADDRESS, else the cluster `ray start` left "
                                       "running on this machine, else a local cluster of the run's own)")
    mode: str = option("sync", "sync: one update from all workers' gradients; async: one per gradient",
                       ("sync", "async"))
    staleness: int | None = option(None, "async: how far a worker may run ahead of the slowest (default: no bound)")
    pipeline: bool = option(False, "async: a worker sends a gradient and computes its next batch at once, from "
                                   "the parameters the reply before brought (faster; each gradient one update "
                                   "staler)")
    sync_every: int = option(1, "sync: each worker takes this many steps with its own optimizer between "
                                "averagings of the workers' parameters (local SGD); 1: one update per step")
    servers: int = option(1, "parameter-server shards")
    data_plane: str = option("shm", "a step's gradients and parameters between the processes of one node go "
                                    "through shared memory, one message per node to a shard elsewhere (shm), or "
                                    "each worker's through Ray calls (ray)",
                             ("shm", "ray"))
    start_timeout: float = option(120.0, "seconds to wait for the workers and servers to be placed and started "
                                         "(at the start and after a recovery) before stopping with what could not "
                                         "be placed")
    step_timeout: float = option(600.0, "seconds any call on the workers or servers (a chunk of steps, a test, a "
                                        "checkpoint's gathering) may take before the run stops, naming what did not "
                                        "answer (a process that hangs without dying)")
    compress: str = option("none", "gradients on the wire: none, fp16 or topk:FRACTION (e.g. topk:0.01), with "
                                   "error feedback")
    epochs: int = option(3, "passes over the training data")
    batch_size: int = option(64, "examples per worker per step")
    global_batch: int | None = option(None, "hold the global batch at this many examples per step, whatever the "
                                            "number of workers (each takes its share, rounded down; replaces "
                                            "batch_size; default: batch_size per worker, the global batch following "
                                            "the workers)")
    optimizer: str = option("adam", "the servers' optimizer", tuple(OPTIMIZERS))
    lr: float = option(0.006, "base learning rate")
    momentum: float | None = option(None, "momentum / nesterov only (default: 0.9)")
    weight_decay: float = option(0.0, "L2 (decoupled for adamw), masked off biases and norm parameters")
    optimizer_options: dict = option(dataclasses.MISSING, "the optimizer's other hyperparameters, a TOML inline "
                                     "table, e.g. '{betas = [0.9, 0.99], eps = 1e-7}' (adam); each optimizer's "
                                     "are its class's arguments in distnn/optim.py", default_factory=dict)
    lr_schedule: str = option("cosine", "learning-rate schedule after warmup", tuple(SCHEDULES))
    warmup: int = option(100, "linear warmup steps")
    scale_lr: bool = option(False, "sync: multiply lr by the number of workers")
    seed: int = option(0, "seeds initialisation, data order, augmentation and dropout")
    out: str | None = option(None, "run folder (default: runs/MODEL-DATASET-TIME)")
    overwrite: str | None = option(None, "--out already holds a run: move it aside (OUT.old-TIME) or remove it "
                                         "(default: refuse; --resume continues it)", (None, "move", "remove"))
    log_every: int = option(20, "steps between metrics lines")
    max_steps: int = option(0, "stop after this many updates (0: run all epochs)")
    checkpoint_every: int = option(0, "steps between checkpoints (0: only at epoch ends and on Ctrl-C / SIGTERM)")
    keep_checkpoints: int = option(3, "newest checkpoints kept")
    label_smoothing: float = option(0.0, "label smoothing of the cross-entropy")
    tensorboard: bool = option(False, "also write the metrics stream as TensorBoard event files in RUN/tensorboard "
                                      "(pip install 'distnn[tensorboard]')")
    mlflow: str | None = option(None, "also log the run to MLflow: a tracking URI, or alone for MLFLOW_TRACKING_URI "
                                      "(else MLflow's default); options, metrics, model.h5 (pip install "
                                      "'distnn[mlflow]')", const="default")
    augment: str | None = option(None, "training augmentation (default: crop+flip for 3-channel images, else none)",
                                 (None, "none", "crop", "crop+flip"))
    augment_pad: int | None = option(None, "pixels of zero padding before the random crop (default: 4)")
    model_options: dict = option(dataclasses.MISSING, "options of the zoo model or the builder, a TOML inline table, "
                                 "e.g. '{dropout = 0.3}'", default_factory=dict)

    def validate(self) -> "TrainConfig":
        for f in dataclasses.fields(self):
            allowed = f.metadata["choices"]
            if allowed and getattr(self, f.name) not in allowed:
                raise ConfigError(f"{f.name} = {getattr(self, f.name)!r} is not one of "
                                  f"{', '.join(str(a) for a in allowed if a is not None)}")
        if self.global_batch is not None and self.global_batch < 1:
            raise ConfigError(f"global_batch must be >= 1, got {self.global_batch}")
        for name in ("epochs", "batch_size", "servers", "threads", "log_every", "sync_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        workers_range(self.workers)
        for name in ("warmup", "max_steps", "checkpoint_every", "keep_checkpoints", "augment_pad",
                     "weight_decay", "label_smoothing"):
            if (getattr(self, name) or 0) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ConfigError(f"lr must be > 0, got {self.lr}")
        for name in ("start_timeout", "step_timeout"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.model is not None and self.model not in ZOO and not is_reference(self.model):
            raise ConfigError(f"model = {self.model!r} is not a zoo model ({', '.join(ZOO)}) nor a builder "
                              "FILE.py:FUNCTION or package.module:FUNCTION")
        if self.model is not None and self.layers is not None:
            raise ConfigError("give either model or layers, not both")
        if self.layers is not None and (not isinstance(self.layers, list) or not self.layers
                                        or not all(isinstance(layer, dict) for layer in self.layers)):
            raise ConfigError("layers must be a non-empty list of tables ([[layers]] in TOML)")
        self._check_applies()
        try:
            parse_compress(self.compress)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        return self

    def _check_applies(self):
        """Options set where they would be ignored, named with the setting that rules them out."""
        async_, sync = self.mode == "async", self.mode == "sync"
        # (option, given, what it needs: [(condition, its wording, the setting named when it fails)])
        rules = [("staleness", self.staleness is not None, [(async_, "mode = 'async'", "mode")]),
                 ("pipeline", self.pipeline, [(async_, "mode = 'async'", "mode"),
                                              (self.staleness != 0, "a staleness bound of at least 1", "staleness")]),
                 ("momentum", self.momentum is not None,
                  [(self.optimizer in MOMENTUM_OPTIMIZERS, "optimizer = 'momentum' or 'nesterov'", "optimizer")]),
                 ("scale_lr", self.scale_lr, [(sync, "mode = 'sync'", "mode"),
                                              (self.global_batch is None, "a global batch that follows the "
                                               "workers (not global_batch)", "global_batch")]),
                 ("sync_every", self.sync_every != 1, [(sync, "mode = 'sync'", "mode"),
                                                       (self.compress == "none", "compress = 'none'", "compress")]),
                 ("address", self.address is not None, [(self.backend == "ray", "backend = 'ray'", "backend")]),
                 ("augment_pad", self.augment_pad is not None,
                  [(self.augment != "none", "augment = 'crop' or 'crop+flip'", "augment")])]
        for name, given, needs in rules:
            failed = [key for ok, _, key in needs if not ok]
            if given and failed:
                raise ConfigError(f"{name} = {getattr(self, name)!r} applies only with "
                                  f"{' and '.join(words for _, words, _ in needs)}; drop it "
                                  f"(here {failed[0]} = {getattr(self, failed[0])!r})")
        if self.sync_every > 1 and self.checkpoint_every % self.sync_every:
            raise ConfigError(f"checkpoint_every = {self.checkpoint_every} must be a multiple of sync_every = "
                              f"{self.sync_every} (a checkpoint is taken where the workers' parameters agree)")
        if self.momentum is not None and not 0 <= self.momentum < 1:
            raise ConfigError(f"momentum must be in [0, 1), got {self.momentum}")
        own = set(hyperparameters(self.optimizer)) - {"lr", "weight_decay", "momentum", "nesterov"}   # options
        for key in self.optimizer_options:
            if key not in own:
                raise ConfigError(f"optimizer_options: {self.optimizer} has no hyperparameter {key!r}"
                                  + (f"; its own are {', '.join(sorted(own))}" if own else "; it has none beyond "
                                     "lr, weight_decay and momentum, which have options of their own"))
        try:   # the values, as the optimizer itself checks them
            make_optimizer(self.optimizer, 1, lr=self.lr, **self.optimizer_options).step(np.ones(1, np.float32),
                                                                                        np.ones(1, np.float32))
        except (ValueError, TypeError) as e:
            raise ConfigError(f"optimizer_options = {self.optimizer_options!r}: {e}") from None

    def worker_batch(self, world: int) -> int:
        """Examples per worker per step with ``world`` workers: ``batch_size``, or the share of
        ``global_batch``."""
        return self.batch_size if self.global_batch is None else max(1, self.global_batch // world)

    @property
    def elastic(self) -> bool:
        """``workers`` is a range MIN:MAX with MIN < MAX: the run follows the cluster."""
        low, high = workers_range(self.workers)
        return low < high

    @property
    def model_name(self) -> str:
        """A short name of the network for run folders and messages."""
        if self.layers is not None:
            return "layers"
        return (self.model or "lenet5").rpartition(":")[2]

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def workers_range(value) -> tuple[int, int]:
    """(MIN, MAX) of ``workers``: N is (N, N) (0: as many as the cluster's CPUs), "MIN:MAX" a range."""
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 0:
            raise ConfigError(f"workers must be >= 0, got {value}")
        return value, value
    low, sep, high = str(value).partition(":")
    if not (sep and low.strip().isdigit() and high.strip().isdigit() and 1 <= int(low) <= int(high)):
        raise ConfigError(f"workers = {value!r}: give a number, or MIN:MAX with 1 <= MIN <= MAX (e.g. 1:4)")
    return int(low), int(high)


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}

# The options in groups, for --help (keys and flags stay flat); each in one (tests/test_options.py)
GROUPS = {
    "model": ("model", "layers", "model_options"),
    "data": ("dataset", "labels", "data", "source", "fetch_data", "augment", "augment_pad", "label_smoothing"),
    "training": ("epochs", "batch_size", "global_batch", "max_steps", "seed"),
    "optimizer": ("optimizer", "lr", "momentum", "weight_decay", "optimizer_options", "lr_schedule", "warmup",
                  "scale_lr"),
    "cluster": ("workers", "threads", "backend", "address", "mode", "staleness", "pipeline", "sync_every", "servers",
                "data_plane", "compress"),
    "faults": ("start_timeout", "step_timeout", "checkpoint_every", "keep_checkpoints"),
    "logging": ("out", "overwrite", "log_every", "tensorboard", "mlflow"),
}


def field_kind(name: str) -> tuple[str, bool]:
    """('int' | 'float' | 'bool' | 'str' | 'dict' | 'list', whether None is allowed) of a config field."""
    kind = str(FIELDS[name].type)
    return kind.split("|")[0].strip(), "None" in kind


def check_type(key, value):
    """``value`` of config key ``key`` as its field's type (an int is a float too); ConfigError else."""
    base, optional = field_kind(key)
    if value is None and optional:
        return value
    if key == "workers" and isinstance(value, str):
        workers_range(value)
        return value
    ok = {"int": isinstance(value, int) and not isinstance(value, bool),
          "float": isinstance(value, (int, float)) and not isinstance(value, bool),
          "bool": isinstance(value, bool), "dict": isinstance(value, dict), "str": isinstance(value, str),
          "list": isinstance(value, list)}[base]
    if not ok:
        what = {"float": "a number", "int": "an integer", "bool": "true or false", "dict": "a table",
                "list": "a list"}.get(base, "a " + base)
        raise ConfigError(f"{key} must be {what}, got {value!r} ({type(value).__name__})")
    return float(value) if base == "float" else value


def load_config(path=None, overrides: dict | None = None) -> TrainConfig:
    """Defaults, then the TOML file (its keys are TrainConfig's fields), then ``overrides``
    (command-line flags that were given)."""
    values = {}
    if path is not None:
        path = Path(path)
        try:
            values = tomllib.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"{path}: config file not found") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{path}: not valid TOML ({e})") from None
        for key in values:
            if key not in FIELDS:
                raise ConfigError(f"{path}: unknown key {key!r}; known keys: {', '.join(FIELDS)}")
        try:
            values = {k: check_type(k, v) for k, v in values.items()}
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None
    for key, value in (overrides or {}).items():
        if value is not None:
            values[key] = value
    try:
        return TrainConfig(**values).validate()
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}" if path is not None else str(e)) from None

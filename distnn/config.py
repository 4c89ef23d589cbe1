"""Training configuration: defaults, a TOML file, command-line overrides, validation."""
from __future__ import annotations

import dataclasses
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


class ConfigError(ValueError):
    """A config key, type or value that is wrong; the message names it."""


@dataclass
class TrainConfig:
    model: str = "lenet5"
    dataset: str = "mnist"
    labels: str | None = None            # cifar100: fine | coarse
    data: str = "datasets"               # folder holding prepared datasets
    source: str | None = None            # raw files for preparing a missing dataset
    workers: int = 0                     # 0: one per CPU of the cluster
    threads: int = 1                     # BLAS threads per worker
    backend: str = "ray"                 # ray | local
    address: str | None = None           # Ray cluster: auto | HOST:PORT (default RAY_ADDRESS or local)
    mode: str = "sync"                   # sync | async
    staleness: int | None = None         # async: bound on how far a worker may run ahead
    servers: int = 1                     # parameter-server shards
    epochs: int = 3
    batch_size: int = 64                 # per worker
    optimizer: str = "adam"
    lr: float = 0.006
    momentum: float = 0.9                # for momentum / nesterov
    weight_decay: float = 0.0
    lr_schedule: str = "cosine"          # constant | step | exponential | cosine
    warmup: int = 100                    # linear warmup steps
    scale_lr: bool = False               # multiply lr by the number of workers (sync)
    seed: int = 0
    out: str | None = None               # run folder (default runs/<model>-<dataset>-<time>)
    log_every: int = 20                  # steps between metrics lines
    max_steps: int = 0                   # stop after this many updates (0: run all epochs)
    checkpoint_every: int = 0            # steps between checkpoints (0: only at epoch ends and on stop)
    keep_checkpoints: int = 3            # newest checkpoints kept
    label_smoothing: float = 0.0
    augment: str | None = None           # none | crop | crop+flip (default: crop+flip for CIFAR, none for MNIST)
    augment_pad: int = 4                 # pixels of zero padding before the random crop
    model_options: dict = field(default_factory=dict)   # extra zoo options, e.g. {dropout = 0.3}

    CHOICES = {"backend": ("ray", "local"), "mode": ("sync", "async"), "dataset": ("mnist", "cifar100"),
               "labels": (None, "fine", "coarse"), "augment": (None, "none", "crop", "crop+flip"),
               "model": ("mlp", "lenet5", "cifar_convnet", "lstm_classifier"),
               "optimizer": ("sgd", "momentum", "nesterov", "adagrad", "rmsprop", "adadelta", "adam", "adamw"),
               "lr_schedule": ("constant", "step", "exponential", "cosine")}

    def validate(self) -> "TrainConfig":
        for name, allowed in self.CHOICES.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(f"{name} = {getattr(self, name)!r} is not one of "
                                  f"{', '.join(str(a) for a in allowed if a is not None)}")
        for name in ("epochs", "batch_size", "servers", "threads", "log_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("workers", "warmup", "max_steps", "checkpoint_every", "keep_checkpoints", "augment_pad"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ConfigError(f"lr must be > 0, got {self.lr}")
        if self.staleness is not None and (self.staleness < 0 or self.mode != "async"):
            raise ConfigError("staleness must be >= 0 and goes with mode = 'async'")
        if self.dataset == "mnist" and self.labels not in (None,):
            raise ConfigError("labels (fine | coarse) applies to cifar100 only")
        if self.address is None and self.backend == "ray":
            self.address = os.environ.get("RAY_ADDRESS") or None
        return self

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}


def _check_type(key, value):
    default = getattr(TrainConfig(), key) if key != "model_options" else {}
    kind = FIELDS[key].type
    ok = {"int": isinstance(value, int) and not isinstance(value, bool),
          "float": isinstance(value, (int, float)) and not isinstance(value, bool),
          "bool": isinstance(value, bool), "dict": isinstance(value, dict),
          "str": isinstance(value, str)}
    base = kind.split("|")[0].strip() if isinstance(kind, str) else type(default).__name__
    if value is None and "None" in str(kind):
        return value
    if base in ok and not ok[base]:
        raise ConfigError(f"{key} must be {'a number' if base == 'float' else 'an integer' if base == 'int' else 'a ' + base}, "
                          f"got {value!r} ({type(value).__name__})")
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
            values = {k: _check_type(k, v) for k, v in values.items()}
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None
    for key, value in (overrides or {}).items():
        if value is not None:
            values[key] = value
    return TrainConfig(**values).validate()

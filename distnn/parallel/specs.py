"""The settings a worker and a server receive, as typed, picklable records (what crosses to a Ray
actor is one of these, never a dict read with ``.get`` defaults)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..optim import Optimizer, make_optimizer
from ..schedules import make_schedule


@dataclass(frozen=True)
class DataSpec:
    """What a GradientWorker reads and how.

    ``path``: a prepared dataset folder; ``batch_size``: per worker; ``labels``: the label field
    (None: the dataset's default; CIFAR-100: 'fine' or 'coarse'); ``seed``: seeds data order,
    augmentation and dropout with (seed, rank, epoch, batch); ``augment``: None (the dataset's default),
    'none', 'crop' or 'crop+flip'; ``augment_pad``: zero padding before the random crop; ``manifest``: the
    manifest's text as the driver read it (a worker's machine may lack the folder: ``data.fetch``).
    """
    path: str
    batch_size: int
    labels: str | None = None
    seed: int = 0
    augment: str | None = None
    augment_pad: int = 4
    label_smoothing: float = 0.0
    eval_batch_size: int = 500
    manifest: str | None = None


@dataclass(frozen=True)
class OptimizerSpec:
    """An optimizer by name with its base learning rate; ``momentum`` only for momentum / nesterov
    (None: the optimizer's default), ``weight_decay`` masked off biases and norm parameters;
    ``options``: its other hyperparameters as (name, value) pairs (``optim.hyperparameters``)."""
    name: str
    lr: float
    momentum: float | None = None
    weight_decay: float = 0.0
    options: tuple = ()

    def make(self, size: int, decay_mask: np.ndarray | None = None) -> Optimizer:
        options = {"lr": self.lr, **dict(self.options)}
        if self.momentum is not None:
            options["momentum"] = self.momentum
        if self.weight_decay:
            options.update(weight_decay=self.weight_decay, decay_mask=decay_mask)
        return make_optimizer(self.name, size, **options)


@dataclass(frozen=True)
class ScheduleSpec:
    """A learning-rate schedule over ``total_steps`` updates with ``warmup_steps`` of linear warmup."""
    name: str = "constant"
    total_steps: int = 1
    warmup_steps: int = 0

    def make(self):
        """step -> multiplier of the base learning rate."""
        return make_schedule(self.name, self.total_steps, self.warmup_steps)


@dataclass(frozen=True)
class LocalSpec:
    """Local SGD (``sync_every`` > 1): a worker takes ``every`` steps with its own ``optimizer`` (the
    learning rate of step s: ``optimizer.lr * schedule(s)``) and then sends how far its parameters
    moved; the server averages those moves. A round also ends at every epoch's end and at the run's
    last step (``steps_per_epoch``, ``total``)."""
    optimizer: OptimizerSpec
    schedule: ScheduleSpec
    every: int
    steps_per_epoch: int
    total: int

    def round_ends(self, step: int) -> bool:
        """Whether the workers' parameters are averaged after ``step``."""
        done = step + 1
        return done % self.every == 0 or done % self.steps_per_epoch == 0 or done >= self.total

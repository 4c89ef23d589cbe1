"""What several test modules do: keep a command or a run quiet (``silent``, ``QUIET``), train a config
quietly, read its model file, compare two runs bit for bit."""
from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np

from distnn.train import Trainer


def silent(*args, **kwargs) -> None:
    """A ``log`` that says nothing."""


QUIET = {"progress": False, "log": silent}   # keyword arguments of prepare, plan and Trainer: no output


def train(config, backend=None, hook=None) -> dict:
    """Run ``config`` to its end without console output (``hook``: ``Trainer``'s ``on_step``); its
    summary."""
    trainer = Trainer(config, backend=backend, on_step=hook, **QUIET)
    try:
        return trainer.run()
    finally:
        trainer.close()


def final_state(run) -> dict:
    """Every array of the run's model.h5: "params/NAME" and "buffers/NAME"."""
    with h5py.File(Path(run) / "model.h5") as f:
        return {f"{g}/{k}": f[g][k][()] for g in ("params", "buffers") for k in f[g]}


def same(a: dict, b: dict) -> bool:
    """The same arrays under the same names, bit for bit."""
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)

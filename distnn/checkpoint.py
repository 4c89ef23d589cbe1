"""Saving and loading models (and, for training runs, full checkpoints) as HDF5.

A model file holds one dataset per parameter and buffer name (``features.0.weight``) under
``params/`` and ``buffers/``, plus the model spec as JSON in the file's attributes, so plain h5py
reads it. Files are written to a temporary name and renamed into place.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import h5py
import numpy as np


class CheckpointError(Exception):
    """A model or checkpoint file that is missing, unreadable or does not fit the model."""


def _atomic_h5(path: Path, write):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with h5py.File(tmp, "w") as f:
            write(f)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def save_model(model, path, spec: dict | None = None, extra: dict | None = None):
    """Write the model's parameters and buffers (and its spec) to ``path``."""
    def write(f):
        g = f.create_group("params")
        for name, p in model.named_parameters():
            g.create_dataset(name, data=p.data)
        b = f.create_group("buffers")
        for name, buf in model.named_buffers():
            b.create_dataset(name, data=buf)
        if spec is not None:
            f.attrs["spec"] = json.dumps(spec)
        for k, v in (extra or {}).items():
            f.attrs[k] = json.dumps(v)
    _atomic_h5(path, write)


def read_model_file(path):
    """(state dict, spec or None) of a model file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such model file")
    try:
        with h5py.File(path, "r") as f:
            state = {}
            for group in ("params", "buffers"):
                if group in f:
                    f[group].visititems(lambda name, obj: state.__setitem__(name, obj[()]) if isinstance(obj, h5py.Dataset) else None)
            spec = json.loads(f.attrs["spec"]) if "spec" in f.attrs else None
    except OSError as e:
        raise CheckpointError(f"{path}: unreadable HDF5 file ({e})") from None
    return state, spec


def load_model(path, model=None):
    """Load a model file into ``model`` (or build one from the spec stored in the file)."""
    state, spec = read_model_file(path)
    if model is None:
        if spec is None:
            raise CheckpointError(f"{path}: holds no model spec; pass the model to load into")
        from .models import build_model
        model = build_model(spec)
    try:
        model.load_state_dict({k: np.asarray(v) for k, v in state.items()}, source=str(path))
    except ValueError as e:
        raise CheckpointError(str(e)) from None
    return model

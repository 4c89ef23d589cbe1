"""Saving and loading models (and, for training runs, full checkpoints) as HDF5.

A model file holds one dataset per parameter and buffer name (``features.0.weight``) under
``params/`` and ``buffers/``, plus the model spec as JSON in the file's attributes, so plain h5py
reads it. Files are written to a temporary name and renamed into place.
"""
from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np

from ._io import atomic_path


class CheckpointError(Exception):
    """A model or checkpoint file that is missing, unreadable or does not fit the model."""


def _atomic_h5(path: Path, write, needed: int | None = None):
    """Write an HDF5 file through ``atomic_path``: complete or absent, never half-written."""
    with atomic_path(path, needed) as tmp:
        with h5py.File(tmp, "w") as f:
            write(f)


def _write_model(f, model):
    """One dataset per parameter under params/ and per buffer under buffers/, by name."""
    g = f.create_group("params")
    for name, p in model.named_parameters():
        g.create_dataset(name, data=p.data)
    b = f.create_group("buffers")
    for name, buf in model.named_buffers():
        b.create_dataset(name, data=buf)


def save_model(model, path, spec: dict | None = None, extra: dict | None = None):
    """Write the model's parameters and buffers (and its spec) to ``path``."""
    def write(f):
        _write_model(f, model)
        if spec is not None:
            f.attrs["spec"] = json.dumps(spec)
        for k, v in (extra or {}).items():
            f.attrs[k] = json.dumps(v)
    _atomic_h5(path, write, _size(model))


def _size(model, copies: int = 1) -> int:
    """Bytes of ``copies`` of the model's parameters and buffers, plus HDF5's overhead."""
    arrays = [p.data for p in model.parameters()] + [b for _, b in model.named_buffers()]
    return copies * sum(a.nbytes for a in arrays) + 64 * 1024


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
        try:
            model = build_model(spec)
        except ValueError as e:  # a builder file gone or changed, an unknown layer
            raise CheckpointError(f"{path}: cannot rebuild its model: {e}") from None
    try:
        model.load_state_dict({k: np.asarray(v) for k, v in state.items()}, source=str(path))
    except ValueError as e:
        raise CheckpointError(str(e)) from None
    return model


# -- training checkpoints -----------------------------------------------------------------------------

CHECKPOINT_FORMAT = 1


def save_checkpoint(path, model, *, step: int, servers: list[dict], worker_buffers: np.ndarray, config: dict,
                    spec: dict, extra: dict | None = None, worker_states: np.ndarray | None = None):
    """Everything a run needs to continue exactly where it stopped.

    ``model``: holds the current parameters and the workers' mean buffers (so the file is also a model
    file: ``params/``, ``buffers/``); ``servers``: each shard's ``state()`` (its slice, update count and
    optimizer slots); ``worker_buffers`` (N, B): each worker's own batch-norm statistics; the data
    position follows from ``step``, and every random draw from (seed, rank, epoch, batch);
    ``worker_states`` (N, S): what each worker carries beyond them (``GradientWorker.local_state``).
    """
    def write(f):
        _write_model(f, model)
        f.create_dataset("workers/buffers", data=worker_buffers)
        if worker_states is not None:
            f.create_dataset("workers/state", data=worker_states)
        for k, state in enumerate(servers):
            s = f.create_group(f"servers/{k}")
            s.attrs["version"] = state["version"]
            s.create_dataset("params", data=state["params"])
            for key, value in state["optimizer"].items():
                s.create_dataset(f"optimizer/{key}", data=value)
        f.attrs["format"] = CHECKPOINT_FORMAT
        f.attrs["step"] = step
        f.attrs["spec"] = json.dumps(spec)
        f.attrs["config"] = json.dumps(config)
        for k, v in (extra or {}).items():
            f.attrs[k] = json.dumps(v)
    slots = sum(v.nbytes for st in servers for v in st["optimizer"].values())
    states = 0 if worker_states is None else worker_states.nbytes
    _atomic_h5(path, write, 2 * _size(model) + slots + worker_buffers.nbytes + states)


def load_checkpoint(path) -> dict:
    """The contents of a checkpoint: step, config, spec, servers (states), worker_buffers."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint")
    try:
        with h5py.File(path, "r") as f:
            if f.attrs.get("format") != CHECKPOINT_FORMAT or "servers" not in f:
                raise CheckpointError(f"{path}: not a distnn training checkpoint (a model file?)")
            servers = []
            for k in sorted(f["servers"], key=int):
                s = f["servers"][k]
                servers.append({"version": int(s.attrs["version"]), "params": s["params"][()],
                                "optimizer": {key: s["optimizer"][key][()] for key in s["optimizer"]}})
            return {"step": int(f.attrs["step"]), "config": json.loads(f.attrs["config"]),
                    "spec": json.loads(f.attrs["spec"]), "servers": servers,
                    "worker_buffers": f["workers/buffers"][()], "path": str(path),
                    "worker_states": _worker_states(f),
                    "done": json.loads(f.attrs["done"]) if "done" in f.attrs else None}
    except (OSError, KeyError) as e:
        raise CheckpointError(f"{path}: unreadable or incomplete checkpoint ({e})") from None


def _worker_states(f):
    """(N, S) float64, or None; checkpoints before local SGD held only --compress residuals."""
    for name in ("workers/state", "workers/residuals"):
        if name in f:
            return f[name][()].astype(np.float64)
    return None


def latest_checkpoint(run_or_file) -> Path:
    """A checkpoint file itself, or the newest one in RUN/checkpoints."""
    path = Path(run_or_file)
    if path.is_file():
        return path
    found = sorted((path / "checkpoints").glob("step-*.h5"))
    if not found:
        raise CheckpointError(f"{path}: no checkpoints in {path / 'checkpoints'}; give a run folder of distnn train "
                              "or a checkpoint .h5 file")
    return found[-1]


def prune_checkpoints(folder: Path, keep: int):
    """Delete all but the newest ``keep`` checkpoints."""
    for old in sorted(Path(folder).glob("step-*.h5"))[:-keep] if keep > 0 else []:
        old.unlink()

"""Exchanging weights with PyTorch: state dicts in PyTorch's naming and shapes.

distnn's layers already use PyTorch's shapes (Linear (out, in), Conv2d (out, in, kh, kw), LSTM gates
i, f, g, o) and a zoo model is a Sequential whose parameter names match an ``nn.Sequential``'s
(``0.weight``). Two things differ: a recurrent layer's parameters carry PyTorch's layer suffix
(``weight_ih`` <-> ``weight_ih_l0``), and PyTorch's batch norm keeps a ``num_batches_tracked`` counter.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .nn import LSTM, RNN

RECURRENT = ("weight_ih", "weight_hh", "bias_ih", "bias_hh")


def _recurrent_prefixes(model) -> set:
    return {path for path, m in model.named_modules() if isinstance(m, (RNN, LSTM))}


def to_torch_names(model) -> dict:
    """The model's parameters and buffers as a dict of arrays named as in a PyTorch state dict."""
    recurrent = _recurrent_prefixes(model)
    out = {}
    for name, value in model.state_dict().items():
        prefix, _, leaf = name.rpartition(".")
        if prefix in recurrent and leaf in RECURRENT:
            name = f"{name}_l0"
        out[name] = value
        if leaf == "running_var":
            out[f"{prefix}.num_batches_tracked"] = np.array(0, np.int64)
    return out


def from_torch_names(model, state: dict, source="state dict") -> None:
    """Load a PyTorch-named state dict (arrays) into ``model``."""
    recurrent = _recurrent_prefixes(model)
    ours = {}
    for name, value in state.items():
        prefix, _, leaf = name.rpartition(".")
        if leaf == "num_batches_tracked":
            continue
        if prefix in recurrent and leaf.endswith("_l0") and leaf[:-3] in RECURRENT:
            name = f"{prefix}.{leaf[:-3]}"
        ours[name] = np.asarray(value, np.float32)
    model.load_state_dict(ours, source=source)


def export(model, path, fmt: str) -> Path:
    """Write the model as ``npz`` (numpy arrays by PyTorch name) or ``torch`` (a ``.pt`` state dict;
    needs PyTorch). Written to a temporary name, then renamed."""
    path = Path(path)
    state = to_torch_names(model)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        if fmt == "npz":
            with open(tmp, "wb") as f:
                np.savez(f, **state)
        elif fmt == "torch":
            try:
                import torch
            except ImportError:
                raise ValueError("--format torch needs PyTorch (pip install torch==2.13.0); "
                                 "--format npz needs nothing") from None
            torch.save({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state.items()}, tmp)
        else:
            raise ValueError(f"unknown format {fmt!r}; choose torch or npz")
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def read_state(path) -> dict:
    """A state dict from an .npz or a PyTorch .pt file, as numpy arrays."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such file")
    if path.suffix == ".npz":
        with np.load(path) as z:
            return {k: z[k] for k in z.files}
    try:
        import torch
    except ImportError:
        raise ValueError(f"{path}: reading a .pt file needs PyTorch (pip install torch==2.13.0)") from None
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise ValueError(f"{path}: not a state dict")
    return {k: v.detach().numpy() for k, v in state.items()}

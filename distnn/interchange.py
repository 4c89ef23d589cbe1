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

from .nn import LSTM, RNN, BatchNorm1d, BatchNorm2d

RECURRENT = ("weight_ih", "weight_hh", "bias_ih", "bias_hh")


def _recurrent_prefixes(model) -> set:
    return {path for path, m in model.named_modules() if isinstance(m, (RNN, LSTM))}


def _batch_norm_prefixes(model) -> set:
    return {path for path, m in model.named_modules() if isinstance(m, (BatchNorm1d, BatchNorm2d))}


def to_torch_names(model) -> dict:
    """The model's parameters and buffers as a dict of arrays named as in a PyTorch state dict."""
    recurrent, batch_norms = _recurrent_prefixes(model), _batch_norm_prefixes(model)
    out = {}
    for name, value in model.state_dict().items():
        prefix, _, leaf = name.rpartition(".")
        if prefix in recurrent and leaf in RECURRENT:
            name = f"{name}_l0"
        out[name] = value
    for prefix in sorted(batch_norms):   # PyTorch's BatchNorm counts its batches; distnn's does not
        out[f"{prefix}.num_batches_tracked" if prefix else "num_batches_tracked"] = np.array(0, np.int64)
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


_PLAIN = ("ReLU", "Sigmoid", "Tanh", "Softplus", "GELU", "SELU", "ELU", "Flatten")


def torch_twin(spec: dict):
    """The network of a model spec in PyTorch: an ``nn.Sequential`` whose state dict has the names and
    shapes of ``to_torch_names(build_model(spec))``, so one model's weights load into the other. For
    checks and benchmarks against PyTorch; needs PyTorch. Recurrent layers take batch-first input."""
    try:
        import torch
    except ImportError:
        raise ValueError("a PyTorch twin needs PyTorch (pip install torch==2.13.0)") from None
    from .models import layer_specs
    nn = torch.nn
    if spec.get("model") == "resnet20":
        return _torch_resnet20(torch, spec.get("num_classes", 10), (spec.get("input_shape") or [3])[0])

    class Reshape(nn.Module):
        def __init__(self, shape):
            super().__init__()
            self.shape = tuple(shape)

        def forward(self, x):
            return x.reshape(x.shape[0], *self.shape)

    def recurrent(kind, input_size, hidden_size, output="all"):
        base = getattr(nn, kind)

        class Layer(base):  # nn.LSTM / nn.RNN itself, so its parameters keep PyTorch's names
            def forward(self, x):
                seq, state = super().forward(x)
                if output == "last":
                    return (state[0] if kind == "LSTM" else state)[-1]
                return seq if output == "sequence" else (seq, state)
        return Layer(input_size, hidden_size, batch_first=True)

    layers = []
    for i, layer in enumerate(layer_specs(spec)):
        kind, kw = layer["type"], {k: v for k, v in layer.items() if k not in ("type", "init_fn")}
        if kind in ("Linear", "Conv2d", "MaxPool2d", "AvgPool2d", "BatchNorm1d", "BatchNorm2d", "Dropout",
                    "Embedding"):
            layers.append(getattr(nn, kind)(**kw))
        elif kind == "LeakyReLU":
            layers.append(nn.LeakyReLU(kw.get("slope", 0.01)))
        elif kind in _PLAIN and not kw:
            layers.append(getattr(nn, kind)())
        elif kind == "Reshape":
            layers.append(Reshape(kw["shape"]))
        elif kind in ("LSTM", "RNN"):
            layers.append(recurrent(kind, **kw))
        else:
            raise ValueError(f"layer {i}: no PyTorch twin for {kind!r} with options {kw}")
    return nn.Sequential(*layers)


def _torch_resnet20(torch, num_classes: int, in_channels: int):
    """models.resnet.ResNet in PyTorch, under the same parameter names."""
    nn, F = torch.nn, torch.nn.functional

    class Block(nn.Module):
        def __init__(self, cin, cout, stride):
            super().__init__()
            self.conv1, self.bn1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout)
            self.conv2, self.bn2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout)
            self.stride, self.extra = stride, cout - cin

        def forward(self, x):
            out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
            if self.stride != 1 or self.extra:
                half = self.extra // 2
                x = F.pad(x[:, :, ::self.stride, ::self.stride], (0, 0, 0, 0, half, half))
            return F.relu(out + x)

    class ResNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16)
            self.blocks, cin = [], 16
            for stage, width in enumerate((16, 32, 64)):
                for i in range(3):
                    name = f"layer{stage + 1}_{i}"
                    self.add_module(name, Block(cin, width, 2 if stage and not i else 1))
                    self.blocks.append(name)
                    cin = width
            self.fc = nn.Linear(64, num_classes)

        def forward(self, x):
            x = F.relu(self.bn(self.conv(x)))
            for name in self.blocks:
                x = getattr(self, name)(x)
            return self.fc(x.mean(dim=(2, 3)))

    return ResNet()

"""The model zoo and ``build_model(spec)``: a plain, JSON-serialisable spec -> a Module.

A spec is either a zoo name with options, ``{"model": "lenet5", "num_classes": 10, "seed": 0}``, or
an explicit layer list, ``{"layers": [{"type": "Linear", "in_features": 784, "out_features": 10}],
"seed": 0}``. Either way the result is a Sequential whose parameters are packed into one flat float32
vector, initialised from ``numpy.random.default_rng(seed)``, so every worker that builds the same spec
holds the same network.
"""
from __future__ import annotations

import copy
import inspect

import numpy as np

from .autograd import eval_mode, no_grad
from .nn import LAYERS, Sequential
from .ops import softmax_cross_entropy


def _mlp(num_classes=10, in_features=784, hidden=(256, 128)):
    layers = [{"type": "Flatten"}]
    sizes = [in_features, *hidden]
    for a, b in zip(sizes, sizes[1:]):
        layers += [{"type": "Linear", "in_features": a, "out_features": b}, {"type": "ReLU"}]
    return layers + [{"type": "Linear", "in_features": sizes[-1], "out_features": num_classes}]


def _lenet5(num_classes=10, in_channels=1):
    """LeCun et al. (1998) with ReLU and max pooling, for 28x28 inputs (the first conv pads by 2)."""
    return [
        {"type": "Conv2d", "in_channels": in_channels, "out_channels": 6, "kernel_size": 5, "padding": 2},
        {"type": "ReLU"}, {"type": "MaxPool2d", "kernel_size": 2},
        {"type": "Conv2d", "in_channels": 6, "out_channels": 16, "kernel_size": 5},
        {"type": "ReLU"}, {"type": "MaxPool2d", "kernel_size": 2},
        {"type": "Flatten"},
        {"type": "Linear", "in_features": 400, "out_features": 120}, {"type": "ReLU"},
        {"type": "Linear", "in_features": 120, "out_features": 84}, {"type": "ReLU"},
        {"type": "Linear", "in_features": 84, "out_features": num_classes},
    ]


def _cifar_convnet(num_classes=100, in_channels=3, widths=(32, 64), fc=256, dropout=0.5):
    """3x32x32 -> [conv3x3-BN-ReLU x2, maxpool 2] per width -> fc -> ReLU -> dropout -> classes."""
    layers, c, size = [], in_channels, 32
    for w in widths:
        for _ in range(2):
            layers += [{"type": "Conv2d", "in_channels": c, "out_channels": w, "kernel_size": 3,
                        "padding": "same", "bias": False},
                       {"type": "BatchNorm2d", "num_features": w}, {"type": "ReLU"}]
            c = w
        layers.append({"type": "MaxPool2d", "kernel_size": 2})
        size //= 2
    return layers + [
        {"type": "Flatten"},
        {"type": "Linear", "in_features": c * size * size, "out_features": fc}, {"type": "ReLU"},
        {"type": "Dropout", "p": dropout},
        {"type": "Linear", "in_features": fc, "out_features": num_classes},
    ]


def _lstm_classifier(num_classes=10, steps=28, features=28, hidden=128):
    """A (N, 1, 28, 28) image read as 28 steps of 28 features; the last hidden state is classified."""
    return [
        {"type": "Reshape", "shape": [steps, features]},
        {"type": "LSTM", "input_size": features, "hidden_size": hidden, "output": "last"},
        {"type": "Linear", "in_features": hidden, "out_features": num_classes},
    ]


ZOO = {"mlp": _mlp, "lenet5": _lenet5, "cifar_convnet": _cifar_convnet, "lstm_classifier": _lstm_classifier}
INPUT_SHAPES = {"mlp": (1, 28, 28), "lenet5": (1, 28, 28), "cifar_convnet": (3, 32, 32),
                "lstm_classifier": (1, 28, 28)}


def layer_specs(spec: dict) -> list[dict]:
    """The explicit layer list of a spec (a zoo spec is expanded)."""
    if not isinstance(spec, dict):
        raise ValueError(f"a model spec must be a dict, got {type(spec).__name__}")
    if "layers" in spec:
        unknown = set(spec) - {"layers", "seed"}
        if unknown:
            raise ValueError(f"model spec: unknown keys {sorted(unknown)}; a layer-list spec has 'layers' and 'seed'")
        return copy.deepcopy(spec["layers"])
    name = spec.get("model")
    if name not in ZOO:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(ZOO)} (or give 'layers')")
    options = {k: v for k, v in spec.items() if k not in ("model", "seed")}
    allowed = inspect.signature(ZOO[name]).parameters
    unknown = set(options) - set(allowed)
    if unknown:
        raise ValueError(f"model {name!r}: unknown options {sorted(unknown)}; known: {', '.join(allowed)}")
    return ZOO[name](**options)


def build_model(spec: dict) -> Sequential:
    """Build the network a spec describes; its parameters packed into one flat float32 vector."""
    rng = np.random.default_rng(spec.get("seed", 0) if isinstance(spec, dict) else 0)
    layers = []
    for i, layer in enumerate(layer_specs(spec)):
        kind = layer.pop("type", None) if isinstance(layer, dict) else None
        if kind not in LAYERS:
            raise ValueError(f"layer {i}: unknown type {kind!r}; known layers: {', '.join(LAYERS)}")
        cls = LAYERS[kind]
        params = inspect.signature(cls.__init__).parameters
        if "rng" in params:
            layer["rng"] = rng
        accepts_any = any(p.kind is p.VAR_KEYWORD for p in params.values())
        unknown = set(layer) - set(params) if not accepts_any else set()
        if unknown:
            known = [p for p in params if p not in ("self", "rng")]
            raise ValueError(f"layer {i} ({kind}): unknown options {sorted(unknown)}; known: {', '.join(known)}")
        if "shape" in layer and kind == "Reshape":
            layers.append(cls(*layer["shape"]))
            continue
        try:
            layers.append(cls(**layer))
        except TypeError as e:
            raise ValueError(f"layer {i} ({kind}): {e}") from None
    model = Sequential(*layers)
    model.pack_parameters(np.float32)
    return model


def evaluate(model, batches) -> dict:
    """Summed loss, correct predictions and count of ``model`` over ``(x, y)`` batches, in eval mode."""
    loss_sum, correct, count = 0.0, 0, 0
    with eval_mode(), no_grad():
        for x, y in batches:
            logits = model(x)
            loss_sum += float(softmax_cross_entropy(logits, y).data) * len(y)
            correct += int((logits.data.argmax(axis=1) == y).sum())
            count += len(y)
    return {"loss_sum": loss_sum, "correct": correct, "count": count}


def input_shape(spec: dict) -> tuple:
    """(C, H, W) a zoo model expects (None for a layer-list spec)."""
    return INPUT_SHAPES.get(spec.get("model")) if isinstance(spec, dict) else None

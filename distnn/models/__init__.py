"""How any network is built and rebuilt: ``build_model(spec)`` for a plain, JSON-serialisable spec.

A spec is one of
- a zoo model, ``{"model": "lenet5", "num_classes": 10, "input_shape": [1, 28, 28], "seed": 0, **options}``
  (``zoo.py``: layer lists sized from the input shape; ``resnet.py``: a Module subclass);
- a layer list, ``{"layers": [{"type": "Linear", "in_features": 784, "out_features": 10}], "seed": 0}``;
- a user's builder, ``{"builder": "nets.py:build" | "mypkg.nets:build", "sha256": ..., "input_shape":
  [...], "num_classes": K, "options": {...}, "seed": 0}`` (``builders.py``).
Either way the result is a Module whose parameters are packed into one flat float32 vector, with
initial weights drawn from ``default_rng(seed)``, so every process that builds a spec holds the same
network. Run folders, model files and checkpoints store the spec.
"""
from __future__ import annotations

import copy
import inspect

import numpy as np

from .. import init
from ..autograd import eval_mode, no_grad
from ..nn import LAYERS, Module, Sequential
from ..ops import softmax_cross_entropy
from . import builders
from .builders import BuilderError
from .resnet import resnet20
from .zoo import LAYER_ZOO

ZOO = {**LAYER_ZOO, "resnet20": resnet20}
INPUT_SHAPES = {"mlp": (1, 28, 28), "lenet5": (1, 28, 28), "cifar_convnet": (3, 32, 32),
                "lstm_classifier": (1, 28, 28), "resnet20": (3, 32, 32)}


def _zoo_options(name, spec) -> dict:
    options = {k: v for k, v in spec.items() if k not in ("model", "seed")}
    allowed = inspect.signature(ZOO[name]).parameters
    unknown = set(options) - set(allowed)
    if unknown:
        raise ValueError(f"model {name!r}: unknown options {sorted(unknown)}; known: {', '.join(allowed)}")
    if "input_shape" in options:
        options["input_shape"] = tuple(options["input_shape"])
    return options


def layer_specs(spec: dict) -> list[dict]:
    """The explicit layer list of a layer-list or layer-zoo spec."""
    if not isinstance(spec, dict):
        raise ValueError(f"a model spec must be a dict, got {type(spec).__name__}")
    if "layers" in spec:
        unknown = set(spec) - {"layers", "seed"}
        if unknown:
            raise ValueError(f"model spec: unknown keys {sorted(unknown)}; a layer-list spec has 'layers' and 'seed'")
        return copy.deepcopy(spec["layers"])
    name = spec.get("model")
    if name not in LAYER_ZOO:
        raise ValueError(f"{name!r} is not a layer-list zoo model ({', '.join(LAYER_ZOO)})")
    return LAYER_ZOO[name](**_zoo_options(name, spec))


def _layer(i: int, layer, rng):
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
        return cls(*layer["shape"])
    try:
        return cls(**layer)
    except TypeError as e:
        raise ValueError(f"layer {i} ({kind}): {e}") from None


def build_model(spec: dict) -> Module:
    """Build the network a spec describes; its parameters packed into one flat float32 vector."""
    if not isinstance(spec, dict):
        raise ValueError(f"a model spec must be a dict, got {type(spec).__name__}")
    seed = spec.get("seed", 0)
    with init.seeded(seed):
        if "builder" in spec:
            model = builders.build(spec)
        elif "layers" in spec or spec.get("model") in LAYER_ZOO:
            rng = np.random.default_rng(seed)
            model = Sequential(*(_layer(i, layer, rng) for i, layer in enumerate(layer_specs(spec))))
        elif spec.get("model") in ZOO:
            model = ZOO[spec["model"]](**_zoo_options(spec["model"], spec))
        else:
            raise ValueError(f"unknown model {spec.get('model')!r}; known models: {', '.join(ZOO)} "
                             "(or give 'layers', or a builder FILE.py:FUNCTION)")
    return model.pack_parameters(np.float32)


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


def input_shape(spec: dict) -> tuple | None:
    """The input shape (C, H, W) or (D,) a spec expects, when it says or its zoo model has a default."""
    if not isinstance(spec, dict):
        return None
    if "input_shape" in spec:
        return tuple(spec["input_shape"])
    return INPUT_SHAPES.get(spec.get("model"))


__all__ = ["ZOO", "BuilderError", "build_model", "evaluate", "input_shape", "layer_specs"]

"""The layer-list zoo: each function returns the layer specs of a network, sized from the input
shape (C, H, W) of the dataset (or (D,) features for the mlp) and its number of classes."""
from __future__ import annotations

import math


def _mlp(num_classes=10, in_features=None, hidden=(256, 128), input_shape=(1, 28, 28)):
    """Flatten -> [Linear -> ReLU] per hidden width -> Linear to the classes."""
    layers = [{"type": "Flatten"}]
    sizes = [in_features or math.prod(input_shape), *hidden]
    for a, b in zip(sizes, sizes[1:]):
        layers += [{"type": "Linear", "in_features": a, "out_features": b}, {"type": "ReLU"}]
    return layers + [{"type": "Linear", "in_features": sizes[-1], "out_features": num_classes}]


def _lenet5(num_classes=10, in_channels=None, input_shape=(1, 28, 28)):
    """LeCun et al. (1998) with ReLU and max pooling; the first conv pads by 2, so a 28x28 input gives
    the classic 16x5x5 features."""
    c, h, w = input_shape
    fh, fw = (h // 2 - 4) // 2, (w // 2 - 4) // 2
    if min(fh, fw) < 1:
        raise ValueError(f"lenet5 needs images of at least 12x12, got {h}x{w}")
    return [
        {"type": "Conv2d", "in_channels": in_channels or c, "out_channels": 6, "kernel_size": 5, "padding": 2},
        {"type": "ReLU"}, {"type": "MaxPool2d", "kernel_size": 2},
        {"type": "Conv2d", "in_channels": 6, "out_channels": 16, "kernel_size": 5},
        {"type": "ReLU"}, {"type": "MaxPool2d", "kernel_size": 2},
        {"type": "Flatten"},
        {"type": "Linear", "in_features": 16 * fh * fw, "out_features": 120}, {"type": "ReLU"},
        {"type": "Linear", "in_features": 120, "out_features": 84}, {"type": "ReLU"},
        {"type": "Linear", "in_features": 84, "out_features": num_classes},
    ]


def _cifar_convnet(num_classes=100, in_channels=None, widths=(32, 64), fc=256, dropout=0.5, input_shape=(3, 32, 32)):
    """(C, H, W) -> [conv3x3-BN-ReLU x2, maxpool 2] per width -> fc -> ReLU -> dropout -> classes."""
    c, h, w = input_shape
    c = in_channels or c
    layers = []
    for width in widths:
        for _ in range(2):
            layers += [{"type": "Conv2d", "in_channels": c, "out_channels": width, "kernel_size": 3,
                        "padding": "same", "bias": False},
                       {"type": "BatchNorm2d", "num_features": width}, {"type": "ReLU"}]
            c = width
        layers.append({"type": "MaxPool2d", "kernel_size": 2})
        h, w = h // 2, w // 2
    return layers + [
        {"type": "Flatten"},
        {"type": "Linear", "in_features": c * h * w, "out_features": fc}, {"type": "ReLU"},
        {"type": "Dropout", "p": dropout},
        {"type": "Linear", "in_features": fc, "out_features": num_classes},
    ]


def _lstm_classifier(num_classes=10, steps=None, features=None, hidden=128, input_shape=(1, 28, 28)):
    """A (N, C, H, W) image read as H steps of C*W features; the last hidden state is classified."""
    c, h, w = input_shape
    steps, features = steps or h, features or c * w
    return [
        {"type": "Reshape", "shape": [steps, features]},
        {"type": "LSTM", "input_size": features, "hidden_size": hidden, "output": "last"},
        {"type": "Linear", "in_features": hidden, "out_features": num_classes},
    ]


LAYER_ZOO = {"mlp": _mlp, "lenet5": _lenet5, "cifar_convnet": _cifar_convnet, "lstm_classifier": _lstm_classifier}

"""Modules: layers with named parameters, the flat parameter buffer, containers."""
from .layers import (ELU, GELU, AvgPool2d, GlobalAvgPool2d, BatchNorm1d, BatchNorm2d, Conv2d, Dropout, Embedding, Flatten,
                     LeakyReLU, Linear, LogSoftmax, MaxPool2d, PReLU, ReLU, Reshape, SELU, Sigmoid, Softmax,
                     Softplus, Tanh)
from .module import Module, Parameter, Sequential
from .recurrent import LSTM, RNN

LAYERS = {cls.__name__: cls for cls in (
    Linear, Conv2d, MaxPool2d, AvgPool2d, GlobalAvgPool2d, BatchNorm1d, BatchNorm2d, Dropout, Flatten, Reshape, Embedding,
    ReLU, LeakyReLU, ELU, SELU, PReLU, Sigmoid, Tanh, Softplus, GELU, Softmax, LogSoftmax, RNN, LSTM)}

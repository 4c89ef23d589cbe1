"""Operators on Variables. The public names are the lower-case functions (``conv2d``, ``relu``,
``softmax_cross_entropy`` ...), one per operator; the operator classes behind them (small classes
with ``forward``/``backward`` on ndarrays) stay in their modules (``distnn.ops.conv.Conv2d``) so that
no name here means something else in ``distnn.nn``, where ``Conv2d`` is the layer.

Modules: basic (arithmetic, matmul, linear), shape (reshape ... embedding), layout (memory orders of
images), conv (with conv_choice, winograd, shifted), pool, norm (batch norm, dropout), activation, loss, recurrent.
"""
from ..autograd import Operator
from . import (activation, basic, conv, conv_choice, layout, loss, norm, pool, recurrent, shape,  # noqa: F401
               shifted, winograd)
from .activation import (add_relu, elu, gelu, leaky_relu, log_softmax, prelu, relu, selu, sigmoid, softmax,
                         softplus, tanh)
from .basic import add, div, exp, linear, log, matmul, mul, neg, pow, sub
from .conv import conv2d
from .loss import bce_with_logits, mse, softmax_cross_entropy
from .norm import batch_norm, dropout, dropout_mask
from .pool import avg_pool2d, max_pool2d
from .recurrent import lstm_cell, lstm_sequence, rnn_cell
from .shape import concat, embedding, flatten, getitem, mean, reshape, stack, sum, transpose, unstack


def all_operators():
    """Every concrete Operator class defined in distnn.ops (the gradient-check test enumerates these)."""
    found, todo = set(), list(Operator.__subclasses__())
    while todo:
        cls = todo.pop()
        todo.extend(cls.__subclasses__())
        if cls.__module__.startswith(__name__) and not cls.__name__.startswith("_"):
            found.add(cls)
    return sorted(found, key=lambda c: c.__name__)

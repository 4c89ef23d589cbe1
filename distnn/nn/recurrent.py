"""RNN and LSTM layers over batch-first sequences, one layer each, with PyTorch's parameter names and
shapes (weight_ih (G*H, F), weight_hh (G*H, H), bias_ih, bias_hh; LSTM gates stacked i, f, g, o)."""
from __future__ import annotations

import numpy as np

from .. import init, ops
from ..autograd import Variable
from ..ops.recurrent import RNNCell
from .layers import _rng, check_input
from .module import Module, Parameter


class _Recurrent(Module):
    gates = 1
    outputs = ("all", "sequence", "last")

    def __init__(self, input_size, hidden_size, output="all", rng=None):
        super().__init__()
        if output not in self.outputs:
            raise ValueError(f"{type(self).__name__}: output must be one of {self.outputs}, got {output!r}")
        rng = _rng(rng)
        g = self.gates
        self.input_size, self.hidden_size, self.output = input_size, hidden_size, output
        self.weight_ih = Parameter(init.glorot_uniform((g * hidden_size, input_size), rng))
        self.weight_hh = Parameter(init.orthogonal((g * hidden_size, hidden_size), rng))
        self.bias_ih = Parameter(self._bias())
        self.bias_hh = Parameter(init.zeros(g * hidden_size))

    def _bias(self):
        return init.zeros(self.gates * self.hidden_size)

    def _inputs(self, x):
        x = check_input(self, x, 3, f"(N, T, {self.input_size})", 2, self.input_size)
        n, t, _ = x.shape
        # the input projection of every step in one product: (N, T, F) -> (N, T, G*H)
        xw = ops.linear(x, self.weight_ih, self.bias_ih + self.bias_hh)
        return n, t, ops.unstack(xw, axis=1)

    def _zeros(self, n):
        return Variable(np.zeros((n, self.hidden_size), self.weight_hh.dtype))

    def _result(self, hs, last):
        if self.output == "last":
            return last[0] if isinstance(last, tuple) else last
        seq = ops.stack(hs, axis=1)
        return seq if self.output == "sequence" else (seq, last)

    def extra_repr(self):
        return f"{self.input_size}, {self.hidden_size}, output={self.output!r}"


class RNN(_Recurrent):
    """Elman RNN: h_t = tanh(x_t W_ih^T + b_ih + h_{t-1} W_hh^T + b_hh).

    x (N, T, F) -> by ``output``: 'all' (default) (hs (N, T, H), h_T (N, H)); 'sequence' hs;
    'last' h_T. ``h0`` defaults to zeros.
    """

    def forward(self, x, h0=None):
        n, t, xw = self._inputs(x)
        h = self._zeros(n) if h0 is None else h0
        hs = []
        for step in range(t):
            h = RNNCell()(xw[step], h, self.weight_hh)
            hs.append(h)
        return self._result(hs, h)


class LSTM(_Recurrent):
    """LSTM (Hochreiter and Schmidhuber, 1997) with the forget-gate bias initialised to 1.

    x (N, T, F) -> by ``output``: 'all' (default) (hs (N, T, H), (h_T, c_T)); 'sequence' hs;
    'last' h_T. ``state`` (h0, c0) defaults to zeros.
    """

    gates = 4

    def _bias(self):
        return init.lstm_bias(self.hidden_size)

    def forward(self, x, state=None):
        x = check_input(self, x, 3, f"(N, T, {self.input_size})", 2, self.input_size)
        n = x.shape[0]
        h0, c0 = (self._zeros(n), self._zeros(n)) if state is None else state
        seq, h, c = ops.lstm_sequence(x, h0, c0, self.weight_ih, self.weight_hh, self.bias_ih + self.bias_hh)
        if self.output == "last":
            return h
        return seq if self.output == "sequence" else (seq, (h, c))

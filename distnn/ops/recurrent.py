"""Recurrent cells with fused gates.

The input projection x W_ih^T + b does not depend on the previous step: the cell operators here take
it precomputed (``xw``), and the LSTM sequence operator folds it into each step's recurrent product.
A cell's backward receives the gradient of its outputs from the layers above *and* from step t+1
(through h and, for the LSTM, through c): the engine sums both, which is the path the student
framework's LSTM dropped.
"""
from __future__ import annotations

from .. import kernels
from ..autograd import Operator
from .activation import sigmoid_array
from .basic import add, linear

import numpy as np


class RNNCell(Operator):
    """h' = tanh(xw + h W_hh^T). xw (N, H), h (N, H), W_hh (H, H) -> h' (N, H)."""

    def forward(self, xw, h, w_hh):
        self.h, self.w_hh = h, w_hh
        self.y = np.tanh(xw + h @ w_hh.T)
        return self.y

    def backward(self, gy):
        ga = gy * (1 - self.y * self.y)
        gh = ga @ self.w_hh if self.needs_grad[1] else None
        gw = ga.T @ self.h if self.needs_grad[2] else None
        return ga, gh, gw


class LSTMCell(Operator):
    """One LSTM step with the four gates stacked i, f, g, o (PyTorch's order).

    xw (N, 4H) = x W_ih^T + b_ih + b_hh, h and c (N, H), W_hh (4H, H):
      [a_i a_f a_g a_o] = xw + h W_hh^T
      i = s(a_i), f = s(a_f), g = tanh(a_g), o = s(a_o)
      c' = f c + i g,  h' = o tanh(c')
    Returns (h', c'). Backward, with dh' and dc' (the latter from step t+1):
      dc = dc' + dh' o (1 - tanh(c')^2)
      da_i = dc g i (1 - i), da_f = dc c f (1 - f), da_g = dc i (1 - g^2), da_o = dh' tanh(c') o (1 - o)
      dc_prev = dc f, dh_prev = da W_hh, dW_hh = da^T h.
    """

    def forward(self, xw, h, c, w_hh):
        hidden = h.shape[1]
        a = xw + h @ w_hh.T
        gates = np.empty_like(a)
        gates[:, :2 * hidden] = sigmoid_array(a[:, :2 * hidden])
        gates[:, 2 * hidden:3 * hidden] = np.tanh(a[:, 2 * hidden:3 * hidden])
        gates[:, 3 * hidden:] = sigmoid_array(a[:, 3 * hidden:])
        i, f, g, o = np.split(gates, 4, axis=1)
        c_new = f * c + i * g
        tc = np.tanh(c_new)
        self.h, self.c, self.w_hh, self.gates, self.tc = h, c, w_hh, gates, tc
        return o * tc, c_new

    def backward(self, gh, gc):
        i, f, g, o = np.split(self.gates, 4, axis=1)
        tc = self.tc
        dc = gc + gh * o * (1 - tc * tc)
        da = np.empty_like(self.gates)
        hidden = tc.shape[1]
        da[:, :hidden] = dc * g * i * (1 - i)
        da[:, hidden:2 * hidden] = dc * self.c * f * (1 - f)
        da[:, 2 * hidden:3 * hidden] = dc * i * (1 - g * g)
        da[:, 3 * hidden:] = gh * tc * o * (1 - o)
        gh_prev = da @ self.w_hh if self.needs_grad[1] else None
        gc_prev = dc * f if self.needs_grad[2] else None
        gw = da.T @ self.h if self.needs_grad[3] else None
        return da, gh_prev, gc_prev, gw


class LSTMSequence(Operator):
    """T LSTM steps in one operator (the same maths as T LSTMCells), for speed: one Python call per
    sequence, one matrix product per step and one for all the weights' gradients.

    x (N, T, F), h0 and c0 (N, H), W_ih (4H, F), W_hh (4H, H), b (4H,) = b_ih + b_hh (optional)
    -> hs (N, T, H), h_T (N, H), c_T (N, H). Each step's pre-activations come from one product,
    z_t [W_hh W_ih b]^T with z_t = [h_t, x_t, 1] (N, H + F + 1), so that the input projection and the
    bias ride in the recurrent product rather than in a (T, N, 4H) array of their own written and read
    once more; the steps' z_t are one time-major (T + 1, N, K) array, and the step writes h_{t+1}
    straight into z_{t+1}. Backward runs the recursion of LSTMCell from t = T-1 down, carrying dh and
    dc from step t+1 into step t, and then [dW_hh dW_ih db] = da^T z, one (T*N, 4H)^T (T*N, K)
    product; the compiled path writes da over the saved gates, unless the graph is retained. Step
    0's product leaves out the state's columns when h0 is zero, and step 0's dh_prev product is not
    made when h0 needs no gradient.
    """

    none_for_unused_outputs = True   # a classifier that reads h_T only leaves hs (N, T, H) without gradient

    def forward(self, x, h0, c0, w_ih, w_hh, b=None):
        n, t, features = x.shape
        g4, hidden = w_hh.shape
        k = hidden + features + (b is not None)
        # sigmoid(a) = 0.5 tanh(a / 2) + 0.5, so all four gates are one tanh of the scaled
        # pre-activations: gates = tanh(a * scale) * scale + shift (scale 1/2, shift 1/2 except for g).
        scale = np.full(g4, 0.5, x.dtype)
        scale[2 * hidden:3 * hidden] = 1
        shift = scale.copy()
        shift[2 * hidden:3 * hidden] = 0
        weights = np.empty((k, g4), x.dtype)   # [W_hh W_ih b]^T, its columns scaled (exactly: by 1/2 or 1)
        weights[:hidden], weights[hidden:hidden + features] = w_hh.T, w_ih.T
        if b is not None:
            weights[-1] = b
        weights *= scale
        z = np.empty((t + 1, n, k), x.dtype)   # z[s] = [h_s, x_s, 1]: the state and input entering step s
        z[0, :, :hidden] = h0
        z[:t, :, hidden:hidden + features] = x.transpose(1, 0, 2)   # (z[t] holds only h_T)
        if b is not None:
            z[:t, :, -1] = 1
        gates = np.empty((t, n, g4), x.dtype)
        cs = np.empty((t + 1, n, hidden), x.dtype)   # cs[s] is the cell state entering step s
        tcs = np.empty((t, n, hidden), x.dtype)
        cs[0] = c0
        fused = kernels.compiled()
        if fused is None:
            scale, shift = np.tile(scale, (n, 1)), np.tile(shift, (n, 1))  # (N, 4H): no broadcasting per step
            ig = np.empty((n, hidden), x.dtype)
        zero_start = not h0.any()   # the usual h0 = 0: step 0's product needs only [x_0, 1]
        for s in range(t):
            g = gates[s]
            if s == 0 and zero_start:
                np.matmul(z[0, :, hidden:], weights[hidden:], out=g)
            else:
                np.matmul(z[s], weights, out=g)
            if fused is not None:   # the rest of the step in one pass; float32's tanh vectorised
                fused.lstm_forward_step(g, scale, shift, cs[s], cs[s + 1], tcs[s], z[s + 1], x.dtype == np.float32)
                continue
            np.tanh(g, out=g)
            g *= scale
            g += shift
            np.multiply(g[:, hidden:2 * hidden], cs[s], out=cs[s + 1])
            np.multiply(g[:, :hidden], g[:, 2 * hidden:3 * hidden], out=ig)
            cs[s + 1] += ig
            np.tanh(cs[s + 1], out=tcs[s])
            np.multiply(g[:, 3 * hidden:], tcs[s], out=z[s + 1, :, :hidden])
        self.gates, self.cs, self.z, self.tcs, self.w_ih, self.w_hh = gates, cs, z, tcs, w_ih, w_hh
        hs = z[1:, :, :hidden]
        return hs.transpose(1, 0, 2), hs[t - 1].copy(), cs[t].copy()  # hs: a view, (N, T, H)

    def backward(self, g_seq, g_h, g_c):
        gates, cs, tcs, w_hh = self.gates, self.cs, self.tcs, self.w_hh
        t, n, g4 = gates.shape
        hidden = g4 // 4
        dh = np.zeros((n, hidden), gates.dtype) if g_h is None else g_h.copy()
        dc = np.zeros((n, hidden), gates.dtype) if g_c is None else g_c.copy()
        fused = kernels.compiled()
        if fused is not None:   # the same recursion, each step's element-wise part in one pass
            da = gates if self.may_overwrite_saved else gates.copy()   # the kernel turns gates into da
            if g_seq is None:
                g_steps = np.broadcast_to(np.zeros((n, hidden), gates.dtype), (t, n, hidden))
            else:   # time-major, so that each step's rows are contiguous: the kernel on the strided
                # rows of g_seq[:, s] ran 1.4-1.7x slower
                g_steps = np.ascontiguousarray(g_seq.transpose(1, 0, 2))
            for s in range(t - 1, -1, -1):
                fused.lstm_backward_step(dh, dc, g_steps[s], da[s], cs[s], tcs[s])
                if s or self.needs_grad[1]:
                    np.matmul(da[s], w_hh, out=dh)   # dh_prev = da W_hh
            return self._grads(da, dh, dc)
        gv = gates.reshape(t, n, 4, hidden)
        i, f, g, o = (gv[:, :, j] for j in range(4))
        # Everything that does not depend on dh and dc, for all steps at once (a few large array
        # operations instead of many small ones inside the loop):
        #   da_i = dc g i(1-i),  da_f = dc c f(1-f),  da_g = dc i (1-g^2),  da_o = dh tanh(c') o(1-o)
        #   dc += dh o (1 - tanh(c')^2)
        factor = np.subtract(1, gv)
        factor *= gv                                    # s(1-s) for the sigmoid gates i, f, o
        np.multiply(g, g, out=factor[:, :, 2])
        np.subtract(1, factor[:, :, 2], out=factor[:, :, 2])   # 1 - g^2 for the tanh gate
        factor[:, :, 0] *= g
        factor[:, :, 1] *= cs[:t]
        factor[:, :, 2] *= i
        factor[:, :, 3] *= tcs
        dc_from_dh = np.multiply(tcs, tcs)
        np.subtract(1, dc_from_dh, out=dc_from_dh)
        dc_from_dh *= o
        da = np.empty_like(gv)
        tmp = np.empty_like(dc)
        for s in range(t - 1, -1, -1):
            if g_seq is not None:
                dh += g_seq[:, s]
            np.multiply(dh, dc_from_dh[s], out=tmp)
            dc += tmp
            for j in range(3):
                np.multiply(factor[s, :, j], dc, out=da[s, :, j])
            np.multiply(factor[s, :, 3], dh, out=da[s, :, 3])
            if s or self.needs_grad[1]:
                np.matmul(da[s].reshape(n, g4), w_hh, out=dh)   # dh_prev = da W_hh
            dc *= f[s]                                        # dc_prev = dc f
        return self._grads(da.reshape(t, n, g4), dh, dc)

    def _grads(self, da, dh, dc):
        """The gradients of the inputs from da (T, N, 4H) and the dh, dc entering the first step."""
        t, n, g4 = da.shape
        hidden, features = self.w_hh.shape[1], self.w_ih.shape[1]
        rows = da.reshape(-1, g4)
        needs = self.needs_grad
        gx = (rows @ self.w_ih).reshape(t, n, features).transpose(1, 0, 2) if needs[0] else None
        gw_ih = gw_hh = gb = None
        if any(needs[3:]):
            z = self.z[:t].reshape(t * n, -1)
            gw = rows.T @ z   # (4H, K): [dW_hh dW_ih db]
            gw_hh = gw[:, :hidden] if needs[4] else None   # views of gw, a fresh array
            gw_ih = gw[:, hidden:hidden + features] if needs[3] else None
            gb = gw[:, -1] if len(needs) == 6 and needs[5] else None
        grads = (gx, dh if needs[1] else None, dc if needs[2] else None, gw_ih, gw_hh)
        return grads + (gb,) if len(needs) == 6 else grads


def rnn_cell(x, h, w_ih, w_hh, b_ih, b_hh):
    """One Elman step: tanh(x W_ih^T + b_ih + h W_hh^T + b_hh). Shapes as in PyTorch's RNNCell."""
    return RNNCell()(linear(x, w_ih, add(b_ih, b_hh)), h, w_hh)


def lstm_cell(x, h, c, w_ih, w_hh, b_ih, b_hh):
    """One LSTM step -> (h', c'). x (N, F), h and c (N, H), W_ih (4H, F), W_hh (4H, H), biases (4H,)."""
    return LSTMCell()(linear(x, w_ih, add(b_ih, b_hh)), h, c, w_hh)


def lstm_sequence(x, h0, c0, w_ih, w_hh, b=None):
    """T LSTM steps in one operator -> (hs (N, T, H), h_T (N, H), c_T (N, H)). x (N, T, F), h0 and
    c0 (N, H), W_ih (4H, F), W_hh (4H, H), b (4H,) = b_ih + b_hh."""
    args = (x, h0, c0, w_ih, w_hh) + (() if b is None else (b,))
    return LSTMSequence()(*args)

"""The numba kernels (see ``kernels/__init__.py``). Rows are (M, C): M positions of C channels,
C-contiguous; statistics are accumulated in float64 whatever the data's dtype."""
from __future__ import annotations

import math

import numpy as np
from numba import njit


@njit(cache=True, nogil=True)
def batch_stats(rows):
    """Per-channel mean and (biased) variance of rows (M, C) in one pass, in float64: the sums of
    d = x - k and d^2 with k the first row, var = E[d^2] - E[d]^2 (the shift by a value of the data
    keeps the difference from cancelling when the mean is large against the spread)."""
    m, c = rows.shape
    k = np.empty(c)
    for j in range(c):
        k[j] = rows[0, j]
    s1, s2 = np.zeros(c), np.zeros(c)
    for i in range(m):
        for j in range(c):
            d = rows[i, j] - k[j]
            s1[j] += d
            s2[j] += d * d
    mean = s1 / m
    return k + mean, np.maximum(s2 / m - mean * mean, 0.0)


@njit(cache=True, nogil=True)
def scale_shift(rows, scale, shift, relu, out):
    """out = rows * scale + shift per channel (C,), then max(., 0) when ``relu``."""
    m, c = rows.shape
    for i in range(m):
        for j in range(c):
            v = rows[i, j] * scale[j] + shift[j]
            out[i, j] = max(v, 0) if relu else v


@njit(cache=True, nogil=True)
def batch_norm_backward(g, rows, mean, invstd, scale, shift, relu, training, gx):
    """Gradients of y = [relu](rows * scale + shift) (``scale_shift``; scale = gamma invstd) over rows
    (M, C): gx written into ``gx`` (M, C); returns (ggamma, gbeta) in float64. With ``relu`` the
    mask y > 0 is recomputed from rows in ``scale_shift``'s arithmetic, bit for bit the forward's, so
    y is never read. With ``training`` the batch statistics' own gradients are included:
    gx = scale (g - gbeta / m - xhat ggamma / m)."""
    m, c = rows.shape
    gbeta, ggamma = np.zeros(c), np.zeros(c)
    for i in range(m):
        for j in range(c):
            x = rows[i, j]
            gij = g[i, j] if not relu or x * scale[j] + shift[j] > 0 else 0.0
            gbeta[j] += gij
            ggamma[j] += gij * (x - mean[j]) * invstd[j]
    a, b = np.zeros(c), np.zeros(c)   # gx = scale * g - a * (x - mean) - b
    for j in range(c):
        if training:
            a[j] = scale[j] * invstd[j] * ggamma[j] / m
            b[j] = scale[j] * gbeta[j] / m
    for i in range(m):
        for j in range(c):
            x = rows[i, j]
            gij = g[i, j] if not relu or x * scale[j] + shift[j] > 0 else 0.0
            gx[i, j] = scale[j] * gij - a[j] * (x - mean[j]) - b[j]
    return ggamma, gbeta


@njit(cache=True, nogil=True)
def add_relu(a, b, out):
    """out = max(a + b, 0) over flat arrays."""
    for i in range(a.size):
        out[i] = max(a[i] + b[i], 0)


@njit(cache=True, nogil=True)
def relu_grad(g, y, out):
    """out = g where y > 0, else 0, over flat arrays."""
    for i in range(g.size):
        out[i] = g[i] if y[i] > 0 else 0



# tanh(x) ~ x p(x^2) / q(x^2) on [-9, 9] (+-1 beyond, where float32's tanh is +-1): the 13/6-degree
# rational interpolant Eigen uses for float tanh, within 4e-7 of tanh (numpy's float32 tanh: 6e-8).
_CLAMP = np.float32(9.0)
_ONE = np.float32(1)   # 1 - x stays in x's dtype (an integer 1 made float32 steps float64)
_P = tuple(np.float32(v) for v in (-2.76076847742355e-16, 2.00018790482477e-13, -8.60467152213735e-11,
                                    5.12229709037114e-08, 1.48572235717979e-05, 6.37261928875436e-04,
                                    4.89352455891786e-03))
_Q = tuple(np.float32(v) for v in (1.19825839466702e-06, 1.18534705686654e-04, 2.26843463243900e-03,
                                    4.89352518554385e-03))


@njit(cache=True, nogil=True, error_model="numpy", inline="always")
def tanh_f32(x):
    """tanh of a float32 in float32 arithmetic without a libm call, so that a loop over it vectorises
    (the "numpy" error model lets the division vectorise: no ZeroDivisionError check)."""
    x = x if x < _CLAMP else _CLAMP
    x = x if x > -_CLAMP else -_CLAMP
    x2 = x * x
    p = _P[0]
    for a in _P[1:]:
        p = p * x2 + a
    q = _Q[0]
    for b in _Q[1:]:
        q = q * x2 + b
    return x * p / q


@njit(cache=True, nogil=True, error_model="numpy", fastmath={"contract"})
def lstm_forward_step(a, scale, shift, c, c_new, tanh_c, z_next, approx):
    """One step of ``ops.recurrent.LSTMSequence``'s forward after its product, in one pass: a (N, 4H)
    holds the pre-activations times ``scale`` (4H,) and becomes the gates tanh(a) * scale + shift
    (i, f, g, o); then c_new = f c + i g, tanh_c = tanh(c_new), all (N, H), and h_new = o tanh_c into
    the first H columns of z_next (N, K), the next step's product input. ``approx``: tanh by
    ``tanh_f32`` (float32), else by libm. A multiplication and the addition after it may fuse into
    one rounding (fastmath "contract"): the two LSTM kernels agree with the numpy path to float32's
    tolerance, not bit for bit, and run 1.44x (forward) and 1.16x (backward) faster so."""
    n, g4 = a.shape
    hidden = g4 // 4
    for r in range(n):
        ar = a[r]
        if approx:
            for k in range(g4):
                ar[k] = tanh_f32(ar[k]) * scale[k] + shift[k]
        else:
            for k in range(g4):
                ar[k] = math.tanh(ar[k]) * scale[k] + shift[k]
        cr, cn, tr, hr = c[r], c_new[r], tanh_c[r], z_next[r]
        for k in range(hidden):
            cn[k] = ar[hidden + k] * cr[k] + ar[k] * ar[2 * hidden + k]
        if approx:
            for k in range(hidden):
                tr[k] = tanh_f32(cn[k])
        else:
            for k in range(hidden):
                tr[k] = math.tanh(cn[k])
        for k in range(hidden):
            hr[k] = ar[3 * hidden + k] * tr[k]


@njit(cache=True, nogil=True, error_model="numpy", fastmath={"contract"})
def lstm_backward_step(dh, dc, g_out, gates, c, tanh_c):
    """One step of ``ops.recurrent.LSTMSequence``'s backward, in one pass that overwrites the gates
    (N, 4H), i, f, g, o, with their pre-activations' gradient da: with h' = dh + g_out (the step's
    output gradient) and dc += h' o (1 - tanh(c')^2), da = (dc g i(1-i), dc c f(1-f), dc i (1-g^2),
    h' tanh(c') o(1-o)) and dc <- dc f (the step before's). c (N, H) is the cell state entering the
    step, tanh_c (N, H) tanh of the one leaving it. The caller makes dh_prev = da W_hh. In place,
    the pass reads and writes the same cache lines, and the (T, N, 4H) da needs no memory of its own:
    the layer's backward 1.2x faster at batch 256 than with da apart."""
    n, hidden = c.shape
    for r in range(n):
        dhr, dcr, gr, gate, cr, tr = dh[r], dc[r], g_out[r], gates[r], c[r], tanh_c[r]
        i, f, g, o = gate[:hidden], gate[hidden:2 * hidden], gate[2 * hidden:3 * hidden], gate[3 * hidden:]
        for k in range(hidden):
            h_grad, tc, ik, fk, gk, ok = dhr[k] + gr[k], tr[k], i[k], f[k], g[k], o[k]
            d = dcr[k] + h_grad * ok * (_ONE - tc * tc)
            i[k] = d * gk * ik * (_ONE - ik)
            f[k] = d * cr[k] * fk * (_ONE - fk)
            g[k] = d * ik * (_ONE - gk * gk)
            o[k] = h_grad * tc * ok * (_ONE - ok)
            dcr[k] = d * fk


@njit(cache=True, nogil=True)
def max_pool_2x2(x, relu, y, arg):
    """2x2 windows that tile x (B, H, W, K) -> their max y (B, H/2, W/2, K) and the winner's position
    arg (uint8, 2 i + j). Ties go as in the numpy path (``MaxPool2d._forward_tiled``): within a column
    to the upper row, between the columns' maxima to the left one. ``relu``: max(y, 0), a window whose
    max is not positive having no winner (arg 4: no gradient)."""
    for b in range(y.shape[0]):
        for oy in range(y.shape[1]):
            for ox in range(y.shape[2]):
                for c in range(y.shape[3]):
                    best, k = x[b, 2 * oy, 2 * ox, c], 0
                    lower = x[b, 2 * oy + 1, 2 * ox, c]
                    if lower > best:
                        best, k = lower, 2
                    right, kr = x[b, 2 * oy, 2 * ox + 1, c], 1
                    lower = x[b, 2 * oy + 1, 2 * ox + 1, c]
                    if lower > right:
                        right, kr = lower, 3
                    if right > best:
                        best, k = right, kr
                    if relu and not best > 0:
                        best, k = 0.0, 4
                    y[b, oy, ox, c] = best
                    arg[b, oy, ox, c] = k


@njit(cache=True, nogil=True)
def max_pool_2x2_backward(g, arg, gx):
    """The input gradient gx (B, H, W, K) of ``max_pool_2x2``: each window's g to its winner (if it has
    one), 0 elsewhere."""
    for b in range(g.shape[0]):
        for oy in range(g.shape[1]):
            for ox in range(g.shape[2]):
                for c in range(g.shape[3]):
                    k, v = arg[b, oy, ox, c], g[b, oy, ox, c]
                    gx[b, 2 * oy, 2 * ox, c] = v if k == 0 else 0.0
                    gx[b, 2 * oy, 2 * ox + 1, c] = v if k == 1 else 0.0
                    gx[b, 2 * oy + 1, 2 * ox, c] = v if k == 2 else 0.0
                    gx[b, 2 * oy + 1, 2 * ox + 1, c] = v if k == 3 else 0.0


@njit(cache=True, nogil=True, error_model="numpy")
def adam_update(p, g, m, v, b1, one_minus_b1, b2, one_minus_b2, eps, step_size):
    """Adam's moments and step over flat vectors in one pass (``optim.Adam._update``), each operation
    rounded as numpy's passes round it (no fused multiply-add), so both paths agree bit for bit:
    m = m b1 + g (1-b1), v = v b2 + g^2 (1-b2), p -= m / (sqrt(v) + eps) * step_size."""
    for i in range(p.size):
        gi = g[i]
        mi = m[i] * b1 + gi * one_minus_b1
        vi = v[i] * b2 + (gi * gi) * one_minus_b2
        m[i], v[i] = mi, vi
        p[i] -= mi / (math.sqrt(vi) + eps) * step_size


@njit(cache=True, nogil=True, error_model="numpy")
def col2im_add(cols, kh, kw, sh, sw, out):
    """Each window's column gradient into the pixels it saw (``ops.conv_algorithms.Im2col.input_grad``):
    cols (B, Ho, Wo, kh*kw*C) in (i, j, c) order added into out (B, Hp, Wp, C). At stride 1 the kw*C
    values of one kernel row land on kw*C consecutive values of out."""
    b_, ho, wo, _ = cols.shape
    c = out.shape[3]
    run = kw * c
    for b in range(b_):
        for y in range(ho):
            for i in range(kh):
                row = out[b, y * sh + i].reshape(-1)   # (Wp*C,)
                for x in range(wo):
                    src = cols[b, y, x, i * run:(i + 1) * run]
                    if sw == 1:
                        dst = row[x * c:x * c + run]
                        for q in range(run):
                            dst[q] += src[q]
                    else:
                        for j in range(kw):
                            dst = row[(x * sw + j) * c:(x * sw + j + 1) * c]
                            for q in range(c):
                                dst[q] += src[j * c + q]


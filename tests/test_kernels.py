"""The compiled kernels (distnn.kernels) against their numpy reference on random float32 inputs, in
every memory layout the operators meet, and the switch between the two paths."""
import os
import subprocess
import sys

import numpy as np
import pytest

from distnn import kernels, nn, ops
from distnn.autograd import Variable, eval_mode, train_mode

SHAPE = (6, 5, 7, 4)
LAYOUTS = {"nchw": (0, 1, 2, 3), "nhwc": (0, 2, 3, 1), "hwnc": (2, 3, 0, 1)}


def laid_out(x, layout):
    """x (N, C, H, W) with the same values in the given memory order."""
    order = LAYOUTS[layout]
    return np.ascontiguousarray(x.transpose(order)).transpose(np.argsort(order))


def run(path, fn, arrays, grad):
    """fn's output and every input's gradient on the given kernel path."""
    kernels.use(path)
    try:
        vs = [Variable(a.copy(order="K"), requires_grad=True) for a in arrays]   # keeps the layout
        y = fn(*vs)
        y.backward(grad)
        return [y.data] + [v.grad for v in vs]
    finally:
        kernels.use(None)


def same_on_both_paths(fn, arrays, grad, rtol=2e-5, atol=2e-5):
    ours, ref = run("numba", fn, arrays, grad), run("numpy", fn, arrays, grad)
    for a, b in zip(ours, ref):
        assert a.dtype == b.dtype == np.float32 and a.shape == b.shape
        np.testing.assert_allclose(a, b, rtol=rtol, atol=atol)
    return ours


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("training", [True, False])
def test_batch_norm_kernel_equals_numpy(layout, relu, training):
    rng = np.random.default_rng(0)
    x = laid_out(rng.normal(1.5, 2.0, SHAPE).astype(np.float32), layout)
    gamma, beta = rng.uniform(0.5, 2, 5).astype(np.float32), rng.normal(0, 1, 5).astype(np.float32)
    stats = {}

    def fn(xv, g, b):
        mean, var = np.full(5, 0.3, np.float32), np.full(5, 1.7, np.float32)
        stats.setdefault(kernels.mode(), (mean, var))
        return ops.batch_norm(xv, g, b, mean, var, training=training, relu=relu)

    grad = laid_out(rng.standard_normal(SHAPE).astype(np.float32), layout)
    y, gx, _, _ = same_on_both_paths(fn, [x, gamma, beta], grad)
    for a, b in zip(stats["numba"], stats["numpy"]):        # the running statistics move alike
        np.testing.assert_allclose(a, b, rtol=1e-6)
    assert (y >= 0).all() if relu else (y < 0).any()
    if layout != "nchw":                                     # (channels-first input is copied to nhwc)
        assert gx.strides == x.strides                       # the gradient comes back in x's layout


def test_batch_statistics_in_one_pass_keep_a_small_spread_beside_a_large_mean():
    """The kernel's one-pass statistics (sums shifted by the first row) against numpy's two-pass ones
    in float64, on data whose E[x^2] - E[x]^2 unshifted would cancel to nothing in float32."""
    from distnn.kernels import fused
    rng = np.random.default_rng(5)
    rows = (1e4 + rng.normal(0, 1e-2, (4096, 3)) * [1, 2, 3]).astype(np.float32)
    mean, var = fused.batch_stats(rows)
    exact = rows.astype(np.float64)
    np.testing.assert_allclose(mean, exact.mean(0), rtol=1e-12)
    np.testing.assert_allclose(var, exact.var(0), rtol=1e-9)
    assert (fused.batch_stats(np.full((5, 2), 7.25, np.float32))[1] == 0).all()


@pytest.mark.parametrize("layouts", [("hwnc", "hwnc"), ("nhwc", "nhwc"), ("hwnc", "nchw")])
def test_add_relu_kernel_equals_numpy(layouts):
    rng = np.random.default_rng(1)
    a, b = (laid_out(rng.standard_normal(SHAPE).astype(np.float32), lay) for lay in layouts)
    grad = rng.standard_normal(SHAPE).astype(np.float32)
    y, ga, gb = same_on_both_paths(ops.add_relu, [a, b], grad)
    np.testing.assert_array_equal(y, np.maximum(a + b, 0))
    np.testing.assert_array_equal(ga, gb)


def test_relu_backward_kernel_equals_numpy():
    rng = np.random.default_rng(2)
    x = laid_out(rng.standard_normal(SHAPE).astype(np.float32), "hwnc")
    y, gx = same_on_both_paths(ops.relu, [x], laid_out(rng.standard_normal(SHAPE).astype(np.float32), "hwnc"))
    assert ((gx == 0) == (x <= 0)).all()


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_sequential_fuses_batch_norm_and_relu_without_changing_the_maths(mode, kernel_path):
    """A BatchNorm2d then a ReLU in a Sequential run as one fused operator, with the outputs and
    gradients of the two layers run one after the other."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((4, 3, 5, 5)).astype(np.float32)
    fused = nn.Sequential(nn.BatchNorm2d(3), nn.ReLU())
    plain = nn.BatchNorm2d(3)
    fused[0].weight.data[...] = plain.weight.data[...] = rng.uniform(0.5, 2, 3)
    with train_mode() if mode == "train" else eval_mode():
        xf, xp = Variable(x.copy(), requires_grad=True), Variable(x.copy(), requires_grad=True)
        yf, yp = fused(xf), ops.relu(plain(xp))
        assert type(yf.creator).__name__ == "BatchNorm" and yf.creator.relu
        g = rng.standard_normal(yf.shape).astype(np.float32)
        yf.backward(g)
        yp.backward(g)
    np.testing.assert_allclose(yf.data, yp.data, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(xf.grad, xp.grad, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(fused[0].weight.grad, plain.weight.grad, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(fused[0].running_mean, plain.running_mean)


@pytest.mark.parametrize("kernel", [2, 3])
def test_sequential_pools_the_relu_in_one_operator_without_changing_the_maths(kernel, kernel_path):
    """A ReLU then a MaxPool2d in a Sequential run as one pooling operator that takes max(., 0) of
    its result (the max of a window commutes with the ReLU): outputs and gradients equal, bit for bit,
    those of the two layers one after the other."""
    rng = np.random.default_rng(4)
    x = rng.standard_normal((4, 3, 6, 6)).astype(np.float32)
    x[0, 0, :kernel, :kernel] = -1.0   # a window with no positive value
    fused = nn.Sequential(nn.ReLU(), nn.MaxPool2d(kernel))
    xf, xp = Variable(x.copy(), requires_grad=True), Variable(x.copy(), requires_grad=True)
    yf, yp = fused(xf), ops.max_pool2d(ops.relu(xp), kernel)
    assert type(yf.creator).__name__ == "MaxPool2d" and yf.creator.relu
    g = rng.standard_normal(yf.shape).astype(np.float32)
    yf.backward(g)
    yp.backward(g)
    np.testing.assert_array_equal(yf.data, yp.data)
    np.testing.assert_array_equal(xf.grad, xp.grad)
    assert yf.data[0, 0, 0, 0] == 0 and not xf.grad[0, 0, :kernel, :kernel].any()
    assert type(nn.Sequential(nn.ReLU(), nn.AvgPool2d(2))(xf).creator).__name__ == "AvgPool2d"   # no fold


def test_environment_selects_the_path():
    code = "from distnn import kernels; print(kernels.mode())"
    env = {k: v for k, v in os.environ.items() if k != "DISTNN_KERNELS"}
    for value, expected in (("numpy", "numpy"), ("numba", "numba"), (None, "numba")):
        run_env = env if value is None else {**env, "DISTNN_KERNELS": value}
        out = subprocess.run([sys.executable, "-c", code], env=run_env, capture_output=True, text=True)
        assert out.stdout.strip() == expected, out.stderr
    bad = subprocess.run([sys.executable, "-c", code], env={**env, "DISTNN_KERNELS": "fast"},
                         capture_output=True, text=True)
    assert bad.returncode != 0 and "DISTNN_KERNELS='fast': choose numba or numpy" in bad.stderr


def test_importing_distnn_does_not_import_numba():
    out = subprocess.run([sys.executable, "-c", "import sys, distnn, distnn.nn, distnn.models; "
                          "print('numba' in sys.modules)"], capture_output=True, text=True)
    assert out.stdout.strip() == "False", out.stderr


@pytest.mark.parametrize("used", ["all", "last"])
def test_lstm_sequence_backward_kernel_equals_numpy(used):
    """Both paths, with every output used, and with h_T alone (no gradient for hs and c_T) from a zero
    h0 (step 0's product without the state's columns)."""
    rng = np.random.default_rng(4)
    n, t, features, hidden = 5, 7, 3, 6
    x = rng.standard_normal((n, t, features)).astype(np.float32)
    h0, c0 = (rng.standard_normal((n, hidden)).astype(np.float32) for _ in range(2))
    w_ih, w_hh = ((rng.standard_normal((4 * hidden, k)) * 0.5).astype(np.float32) for k in (features, hidden))
    weights = rng.standard_normal((n, t, hidden)).astype(np.float32)
    b = rng.standard_normal(4 * hidden).astype(np.float32)
    if used == "last":
        h0[:] = 0

    def fn(x, h0, c0, w_ih, w_hh, b):
        seq, h, c = ops.lstm_sequence(x, h0, c0, w_ih, w_hh, b)
        if used == "last":
            return ops.sum(h * Variable(weights[:, 0]))
        return ops.sum(seq * Variable(weights)) + ops.sum(h * 1.5) + ops.sum(c * c)

    same_on_both_paths(fn, [x, h0, c0, w_ih, w_hh, b], np.float32(1.0))


def test_lstm_backward_twice_with_the_graph_retained_gives_the_same_gradients():
    """The compiled backward turns the saved gates into their gradient unless the graph is retained."""
    rng = np.random.default_rng(6)
    lstm = nn.LSTM(3, 4, output="last", rng=rng)
    x = Variable(rng.standard_normal((2, 5, 3)).astype(np.float32))
    kernels.use("numba")
    try:
        loss = ops.sum(lstm(x) * 2.0)
        loss.backward(retain_graph=True)
        first = lstm.flat_grads.copy()
        loss.backward()
    finally:
        kernels.use(None)
    np.testing.assert_array_equal(lstm.flat_grads, 2 * first)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_max_pool_2x2_kernel_equals_the_numpy_path_ties_included(layout):
    """The compiled 2x2 max pool (tiling windows) picks the same winner as the numpy path, ties too:
    zeros after a ReLU, and a window whose upper-right and lower-left values tie."""
    rng = np.random.default_rng(5)
    x = np.maximum(rng.standard_normal((6, 5, 8, 4)), 0).astype(np.float32)
    x[0, 0, :2, :2] = [[0.0, 1.0], [1.0, 0.0]]
    grad = rng.standard_normal((6, 5, 4, 2)).astype(np.float32)
    y, gx = same_on_both_paths(lambda v: ops.max_pool2d(v, 2), [laid_out(x, layout)], grad, rtol=0, atol=0)
    assert gx[0, 0, 1, 0] == grad[0, 0, 0, 0] and gx[0, 0, 0, 1] == 0   # the left column's maximum wins


def test_float32_tanh_stays_within_float32_tolerance_of_numpy():
    """The LSTM forward's vectorised tanh (a rational interpolant) against numpy's, over its whole
    range and past the clamp, and its oddness; float64 LSTMs keep libm's tanh (the gradient checks)."""
    from distnn.kernels import fused
    x = np.concatenate([np.linspace(-12, 12, 200_001), [0.0, 1e-30, -1e-30, 9.0, -9.0]]).astype(np.float32)
    got = np.array([fused.tanh_f32(v) for v in x[::97]], np.float32)
    want = np.tanh(x[::97].astype(np.float64))
    assert got.dtype == np.float32
    assert np.abs(got - want).max() < 5e-7
    assert np.array_equal(got, -np.array([fused.tanh_f32(-v) for v in x[::97]], np.float32))


def test_lstm_forward_kernel_in_float64_is_numpys_to_rounding():
    rng = np.random.default_rng(6)
    n, t, features, hidden = 3, 5, 2, 4
    x = rng.standard_normal((n, t, features))
    h0, c0 = rng.standard_normal((n, hidden)), rng.standard_normal((n, hidden))
    w_ih, w_hh = (rng.standard_normal((4 * hidden, k)) * 0.5 for k in (features, hidden))
    results = {}
    for path in ("numba", "numpy"):
        kernels.use(path)
        try:
            results[path] = ops.recurrent.LSTMSequence().forward(x, h0, c0, w_ih, w_hh, w_hh[:, 0])
        finally:
            kernels.use(None)
    for a, b in zip(results["numba"], results["numpy"]):
        assert a.dtype == np.float64
        np.testing.assert_allclose(a, b, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("name", ["adam", "adamw"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_adam_kernel_equals_the_numpy_path_bit_for_bit(name, dtype):
    """Adam's one-pass kernel rounds every operation as numpy's passes do, so a run's parameters do
    not depend on the kernel path (weight decay and a learning-rate change included)."""
    from distnn import optim
    rng = np.random.default_rng(7)
    start = rng.standard_normal(1001).astype(dtype)
    grads = [rng.standard_normal(1001).astype(dtype) * 10.0 ** k for k in (-3, 0, 2, -1)]
    results = {}
    for path in ("numba", "numpy"):
        kernels.use(path)
        try:
            params = start.copy()
            opt = optim.OPTIMIZERS[name](params.size, lr=0.01, weight_decay=0.1, dtype=dtype)
            for k, g in enumerate(grads):
                opt.step(params, g, lr=0.01 / (k + 1))
            results[path] = params, opt.state["m"], opt.state["v"]
        finally:
            kernels.use(None)
    for a, b in zip(results["numba"], results["numpy"]):
        assert a.dtype == dtype and np.array_equal(a, b)
    assert not np.array_equal(results["numba"][0], start)


DIRECT_SCRIPT = """
import sys
import numpy as np
from distnn.kernels import direct
module = direct.kernels(2, 3)
x = np.arange(2 * 3 * 20, dtype=np.float32).reshape(2, 3, 20)    # planes of width 5, 4 rows
w = np.ones((4, 3, 2, 3), np.float32)
out = np.empty((2, 3, 3, 4), np.float32)                        # (N, Ho, Wo, O)
module.correlate(x, w, np.zeros(4, np.float32), 5, 13, 0, 0, out)
expected = sum(x[1, c, 6 + i * 5 + j] for c in range(3) for i in range(2) for j in range(3))
assert out[1, 1, 1, 2] == expected, (out[1, 1, 1, 2], expected)
print(sum(module.correlate.stats.cache_hits.values()), module.__file__ if hasattr(module, "__file__") else "-")
"""


def test_direct_kernels_are_generated_once_per_machine_and_loaded_from_the_cache(tmp_path):
    """The generated module lands in the cache folder and a second process runs numba's compiled
    code from there; with no writable cache folder the kernels compile in memory and still run."""
    env = {**os.environ, "DISTNN_CACHE_DIR": str(tmp_path / "cache")}
    runs = [subprocess.run([sys.executable, "-c", DIRECT_SCRIPT], capture_output=True, text=True, env=env,
                           timeout=300) for _ in range(2)]
    assert all(r.returncode == 0 for r in runs), runs[-1].stderr
    (first_hits, path), (second_hits, again) = (r.stdout.split() for r in runs)
    assert path == again and path.startswith(str(tmp_path / "cache" / "kernels"))
    assert int(first_hits) == 0 and int(second_hits) == 1
    (tmp_path / "file").write_text("not a folder")
    env["DISTNN_CACHE_DIR"] = str(tmp_path / "file")
    run = subprocess.run([sys.executable, "-c", DIRECT_SCRIPT], capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0 and run.stdout.split() == ["0", "-"], run.stderr


@pytest.mark.parametrize("stride,padding", [(1, 2), (2, 1), (1, 0)])
def test_im2col_input_gradient_kernel_equals_the_numpy_path(stride, padding, monkeypatch):
    """The column gradient in one product per few images, folded by the compiled kernel, against the
    numpy path's product and strided add per kernel offset (a few images at a time: forced small)."""
    from distnn.ops import conv_algorithms
    monkeypatch.setenv("DISTNN_CONV", "im2col")
    monkeypatch.setattr(conv_algorithms, "COLUMN_VALUES", 500)
    rng = np.random.default_rng(8)
    x = laid_out(rng.standard_normal((5, 3, 9, 8)).astype(np.float32), "nhwc")
    w = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
    grad = rng.standard_normal(ops.conv2d(Variable(x), Variable(w), stride=stride, padding=padding).shape)
    same_on_both_paths(lambda a, b: ops.conv2d(a, b, stride=stride, padding=padding), [x, w], grad.astype(np.float32))


def test_winograd_factored_transforms_are_their_matrices():
    """F(4x4)'s transforms, written as additions and multiplications, map the unit vectors to the
    columns of B^T, A^T and A, and keep float32 data float32."""
    from distnn.ops import winograd_transforms
    f = winograd_transforms.F[4]
    for name, (transform, k) in winograd_transforms.FACTORED.items():
        matrix = f.at.T if name == "a" else getattr(f, name)
        np.testing.assert_array_equal(np.array(transform(*np.eye(k))), matrix)
        assert {r.dtype for r in transform(*np.ones((k, 2), np.float32))} == {np.dtype(np.float32)}


@pytest.mark.parametrize("m", [2, 4])
def test_winograd_filter_transforms_are_g_w_g_transposed_and_back(m):
    """U = G w G^T and the filter gradient G^T dU G, computed as two products each, against their
    sums written out (float64), for filters with different input and output channel counts; float32
    stays float32."""
    from distnn.ops import winograd_transforms
    f, rng = winograd_transforms.F[m], np.random.default_rng(7)
    w, du = rng.standard_normal((5, 3, 3, 3)), rng.standard_normal(((m + 2) ** 2, 3, 5))
    u = winograd_transforms.transform_filter(w, f)
    want = np.einsum("ai,bj,ocij->abco", f.g, f.g, w).reshape(-1, 3, 5)
    np.testing.assert_allclose(u, want, rtol=1e-13, atol=1e-13)
    gw = winograd_transforms.filter_grad_from_tiles(du, f)
    want = np.einsum("ai,bj,abco->ocij", f.g, f.g, du.reshape(m + 2, m + 2, 3, 5))
    np.testing.assert_allclose(gw, want, rtol=1e-13, atol=1e-13)
    assert gw.shape == w.shape and gw.flags.c_contiguous
    assert winograd_transforms.transform_filter(w.astype(np.float32), f).dtype == np.float32


@pytest.mark.parametrize("m", [2, 4])
@pytest.mark.parametrize("size, pads", [((6, 7), (1, 1, 1, 1)), ((9, 12), (1, 1, 1, 1)), ((7, 6), (2, 0, 0, 2))])
@pytest.mark.parametrize("band", [None, 200])
def test_winograd_transforms_compiled_equal_numpy_and_the_direct_sums(m, size, pads, band, monkeypatch):
    """F(m x m, 3x3) on both paths: the compiled tile transforms give bit for bit what the numpy
    passes give (float32; they do the same operations in the same order), and the numpy passes in
    float64 give the convolution, its filter gradient and its input gradient as direct sums do (odd
    sizes: the blocks reach past the bottom and right; the padding read as zeros, never made, also
    uneven; bands of whole tile rows, or with a small band of 200 values, one tile row of one image
    at a time)."""
    from distnn.ops import winograd
    monkeypatch.setattr(winograd, "BAND_VALUES", band)
    assert (len({b[2:] for b in winograd._bands(3, 3, 3, 5, winograd.F[m])}) == 3) == (band == 200)
    rng = np.random.default_rng(m)
    (h, wd), (t, b, l, r) = size, pads
    ho, wo = h + t + b - 2, wd + l + r - 2
    x = rng.standard_normal((h, wd, 3, 5))
    xp = np.pad(x, ((t, b), (l, r), (0, 0), (0, 0)))
    w, gy = rng.standard_normal((4, 5, 3, 3)), rng.standard_normal((ho, wo, 3, 4))

    def steps(dtype, path):
        kernels.use(path)
        try:
            return (winograd.conv3x3(x.astype(dtype), w.astype(dtype), pads, m=m),
                    winograd.filter_grad(x.astype(dtype), gy.astype(dtype), pads, m),
                    winograd.input_grad(gy.astype(dtype), w.astype(dtype), pads, m))
        finally:
            kernels.use(None)
    for ours, ref in zip(steps(np.float32, "numba"), steps(np.float32, "numpy")):
        np.testing.assert_array_equal(ours, ref)
    windows = lambda a: [(i, j, a[i:i + ho, j:j + wo]) for i in range(3) for j in range(3)]
    y = sum(win @ w[:, :, i, j].T for i, j, win in windows(xp))
    gw = np.stack([np.einsum("hwnc,hwno->oc", win, gy) for _, _, win in windows(xp)], -1).reshape(4, 5, 3, 3)
    gxp = np.zeros_like(xp)
    for i in range(3):
        for j in range(3):
            gxp[i:i + ho, j:j + wo] += gy @ w[:, :, i, j]
    for ours, ref in zip(steps(np.float64, "numpy"), (y, gw, gxp[t:t + h, l:l + wd])):
        assert ours.dtype == np.float64
        np.testing.assert_allclose(ours, ref, rtol=1e-10, atol=1e-10)

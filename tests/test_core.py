"""The engine, modules and their flat buffers, optimizers, save/load and bad input."""
import math

import h5py
import numpy as np
import pytest

from distnn import nn, ops, optim
from distnn.autograd import Variable, eval_mode, no_grad, train_mode
from distnn.checkpoint import CheckpointError, load_model, save_model
from distnn.models import ZOO, build_model, input_shape


def test_gradients_accumulate_for_reused_variable():
    x = Variable(np.array([1.0, 2.0, 3.0]), requires_grad=True)
    y = x * x + x * 3.0 + x
    ops.sum(y).backward()
    np.testing.assert_allclose(x.grad, 2 * x.data + 4)
    ops.sum(x * 2.0).backward()  # a second backward adds to the leaf's grad
    np.testing.assert_allclose(x.grad, 2 * x.data + 6)


def test_a_residual_inputs_gradients_summed_into_the_convolutions_own_array(monkeypatch):
    """A block's input feeds a convolution and the shortcut (whose gradient add_relu hands to both of
    its inputs as one array): the engine adds the shortcut's into the convolution's fresh input
    gradient in place, and every gradient is bit for bit what a new array for the sum gives."""
    rng = np.random.default_rng(3)
    x0 = rng.standard_normal((2, 3, 6, 6)).astype(np.float32)
    w1, w2 = (rng.standard_normal((3, 3, 3, 3)).astype(np.float32) for _ in range(2))

    def grads():
        x, a, b = (Variable(v.copy(), requires_grad=True) for v in (x0, w1, w2))
        u = x * 1.0   # (the engine sums the gradients of a leaf in its grad)
        h = ops.relu(ops.conv2d(u, a, padding=1))
        ops.sum(ops.add_relu(ops.conv2d(h, b, padding=1), u) * 0.5).backward()
        return x.grad, a.grad, b.grad

    summed_in_place = grads()
    monkeypatch.setattr(ops.conv.Conv2d, "fresh_input_grads", False)
    for ours, ref in zip(summed_in_place, grads()):
        np.testing.assert_array_equal(ours, ref)


def test_backward_through_1000_step_lstm_without_recursion():
    lstm = nn.LSTM(3, 4, output="last", rng=np.random.default_rng(0))
    x = Variable(np.random.default_rng(1).standard_normal((2, 1000, 3)).astype(np.float32), requires_grad=True)
    ops.sum(lstm(x)).backward()
    assert np.isfinite(lstm.flat_grads).all() and np.abs(lstm.flat_grads).sum() > 0
    assert np.abs(x.grad[:, -1]).sum() > 0


def test_intermediates_released_after_backward():
    x = Variable(np.ones((4, 4)), requires_grad=True)
    h = ops.relu(x * 2.0)
    op = h.creator
    out = ops.sum(h)
    out.backward()
    assert op.__dict__ == {}  # saved arrays and graph links dropped
    assert h.grad is None     # intermediate gradients are not kept


def test_no_grad_records_nothing():
    x = Variable(np.ones(3), requires_grad=True)
    with no_grad():
        y = x * 2.0
    assert y.creator is None and not y.requires_grad


def test_flat_buffers_are_views_and_models_are_independent():
    a = build_model({"model": "lenet5", "seed": 0})
    b = build_model({"model": "lenet5", "seed": 0})
    assert a.flat_params.dtype == np.float32 and a.flat_params.flags.c_contiguous
    names = [n for n, _ in a.named_parameters()]
    assert names[0] == "0.weight" and names[-1] == "11.bias"
    for name, p in a.named_parameters():
        assert np.shares_memory(p.data, a.flat_params) and np.shares_memory(p.grad, a.flat_grads)
    np.testing.assert_array_equal(a.flat_params, b.flat_params)
    a.flat_params[:] = 0
    assert np.abs(b.flat_params).sum() > 0
    x = np.random.default_rng(0).standard_normal((2, 1, 28, 28)).astype(np.float32)
    ops.sum(a(x)).backward()
    assert np.abs(a.flat_grads).sum() > 0 and np.abs(b.flat_grads).sum() == 0
    assert a.param_slices()[0] == ("0.weight", 0, 150, (6, 1, 5, 5))


def test_flat_buffers_follow_a_parameter_added_or_replaced_after_packing():
    """The packed vectors are re-made when a layer gains a parameter, deep in the tree, after packing,
    or when a parameter's array is replaced; the values already there are kept."""
    model = nn.Sequential(nn.Linear(3, 4), nn.Sequential(nn.Linear(4, 2)))
    before = model.flat_params.copy()
    model[1][0].extra = nn.Parameter(np.full(5, 7.0, np.float32))
    assert model.flat_params.size == before.size + 5
    np.testing.assert_array_equal(model.flat_params[:before.size], before)
    assert np.shares_memory(model[1][0].extra.data, model.flat_params)
    model[0].weight.data = np.ones((4, 3), np.float32)
    flat = model.flat_params
    assert np.shares_memory(model[0].weight.data, flat) and flat[0] == 1


def test_pytorch_shapes():
    lstm = nn.LSTM(28, 128)
    shapes = {n: p.shape for n, p in lstm.named_parameters()}
    assert shapes == {"weight_ih": (512, 28), "weight_hh": (512, 128), "bias_ih": (512,), "bias_hh": (512,)}
    assert np.all(lstm.bias_ih.data[128:256] == 1)  # forget-gate bias 1
    assert nn.Conv2d(3, 8, 5).weight.shape == (8, 3, 5, 5) and nn.Linear(4, 2).weight.shape == (2, 4)


@pytest.mark.parametrize("name", list(ZOO))
def test_zoo_forward_shapes(name):
    spec = {"model": name, "seed": 0}
    model = build_model(spec)
    x = np.zeros((3, *input_shape(spec)), np.float32)
    with eval_mode():
        assert model(x).shape == (3, 100 if name == "cifar_convnet" else 10)


def test_batch_norm_running_stats_update_only_in_training():
    bn = nn.BatchNorm2d(3)
    x = np.random.default_rng(0).standard_normal((8, 3, 4, 4)).astype(np.float32) * 2 + 1
    with eval_mode():
        bn(x)
    assert np.all(bn.running_mean == 0) and np.all(bn.running_var == 1)
    with train_mode():
        bn(x)
    np.testing.assert_allclose(bn.running_mean, 0.1 * x.mean(axis=(0, 2, 3)), rtol=1e-5)
    n = 8 * 16
    np.testing.assert_allclose(bn.running_var, 0.9 + 0.1 * x.var(axis=(0, 2, 3)) * n / (n - 1), rtol=1e-5)


def test_dropout_is_inverted_and_identity_in_eval():
    d = nn.Dropout(0.25, rng=np.random.default_rng(0))
    x = np.ones((1000, 100), np.float32)
    with train_mode():
        y = d(x).data
    assert set(np.unique(y)) == {0.0, np.float32(1 / 0.75)}
    assert abs((y == 0).mean() - 0.25) < 0.01
    with eval_mode():
        assert d(x).data is x or np.array_equal(d(x).data, x)


def test_max_pool_ties_send_gradient_to_one_input():
    for k, s in ((2, 2), (3, 2)):
        x = Variable(np.zeros((1, 1, 5 if k == 3 else 4, 4 if k == 2 else 5)), requires_grad=True)
        y = ops.max_pool2d(x, k, s)
        ops.sum(y).backward()
        assert x.grad.sum() == y.size       # one unit of gradient per window, not one per tied input


def test_softmax_cross_entropy_finite_for_huge_logits():
    logits = Variable(np.array([[1e4, -1e4, 0.0], [-1e4, 1e4, 1e4]], np.float32), requires_grad=True)
    loss = ops.softmax_cross_entropy(logits, np.array([1, 0]))
    loss.backward()
    assert np.isfinite(loss.data) and np.isfinite(logits.grad).all()
    assert loss.data.dtype == np.float32 and logits.grad.dtype == np.float32
    np.testing.assert_allclose(loss.data, (2e4 + 2e4 + math.log(2)) / 2, rtol=1e-6)


def test_float32_stays_float32():
    model = build_model({"model": "cifar_convnet", "num_classes": 20, "widths": [4, 8], "fc": 16})
    x = np.zeros((2, 3, 32, 32), np.float32)
    with train_mode():
        out = model(x)
        ops.softmax_cross_entropy(out, np.array([0, 1])).backward()
    assert out.dtype == np.float32 and model.flat_grads.dtype == np.float32


# -- optimizers --------------------------------------------------------------------------------------

def _reference(name, p, g_fn, steps, **kw):
    """Textbook update rules, one parameter at a time in float64."""
    p = p.astype(np.float64).copy()
    m = np.zeros_like(p)
    v = np.zeros_like(p)
    lr = kw.get("lr")
    for t in range(1, steps + 1):
        g = g_fn(p)
        if name == "sgd":
            p -= lr * g
        elif name == "momentum":
            m = 0.9 * m + g
            p -= lr * m
        elif name == "nesterov":
            m = 0.9 * m + g
            p -= lr * (g + 0.9 * m)
        elif name == "adagrad":
            v += g * g
            p -= lr * g / (np.sqrt(v) + 1e-10)
        elif name == "rmsprop":
            v = 0.9 * v + 0.1 * g * g
            p -= lr * g / (np.sqrt(v) + 1e-8)
        elif name == "adadelta":
            v = 0.9 * v + 0.1 * g * g
            d = np.sqrt(m + 1e-6) / np.sqrt(v + 1e-6) * g
            m = 0.9 * m + 0.1 * d * d
            p -= lr * d
        elif name in ("adam", "adamw"):
            if name == "adamw":
                p -= lr * 0.1 * p
            m = 0.9 * m + 0.1 * g
            v = 0.999 * v + 0.001 * g * g
            mhat, vhat = m / (1 - 0.9 ** t), v / (1 - 0.999 ** t)
            p -= lr * mhat / (np.sqrt(vhat) + 1e-8)
    return p


@pytest.mark.parametrize("name", list(optim.OPTIMIZERS))
def test_optimizer_matches_textbook_rule(name):
    rng = np.random.default_rng(0)
    p0 = rng.standard_normal(50)
    target = rng.standard_normal(50)

    def g_fn(p):
        return 2 * (p - target)

    kw = {"lr": 1.0 if name == "adadelta" else 0.01}
    opts = {"weight_decay": 0.1} if name == "adamw" else {}
    opt = optim.make_optimizer(name, 50, dtype=np.float64, **kw, **opts)
    p = p0.copy()
    for _ in range(20):
        opt.step(p, g_fn(p))
    np.testing.assert_allclose(p, _reference(name, p0, g_fn, 20, **kw), rtol=1e-10, atol=1e-12)


def test_optimizer_state_round_trip_exact():
    rng = np.random.default_rng(0)
    a = optim.Adam(10, lr=0.1)
    p = rng.standard_normal(10).astype(np.float32)
    for _ in range(3):
        a.step(p, rng.standard_normal(10).astype(np.float32))
    b = optim.Adam(10, lr=0.1)
    b.load_state_dict(a.state_dict())
    q = p.copy()
    g = rng.standard_normal(10).astype(np.float32)
    a.step(p, g)
    b.step(q, g)
    assert np.array_equal(p, q)


def test_weight_decay_mask_skips_biases():
    model = build_model({"model": "mlp", "seed": 0})
    mask = model.decay_mask()
    for name, lo, hi, shape in model.param_slices():
        assert mask[lo:hi].all() == (len(shape) >= 2) and (mask[lo:hi] == 1).all() == (len(shape) >= 2)
    opt = optim.SGD(mask.size, lr=0.1, weight_decay=0.5, decay_mask=mask)
    p = np.ones(mask.size, np.float32)
    opt.step(p, np.zeros_like(p))
    np.testing.assert_allclose(p, np.where(mask == 1, 0.95, 1.0))


def test_clip_and_schedules():
    g = np.array([3.0, 4.0], np.float32)
    assert optim.clip_grad_norm(g, 1.0) == pytest.approx(5.0)
    assert np.linalg.norm(g) == pytest.approx(1.0, rel=1e-5)
    cos = optim.make_schedule("cosine", total_steps=110, warmup_steps=10)
    assert cos(0) == pytest.approx(0.1) and cos(9) == pytest.approx(1.0) and cos(10) == pytest.approx(1.0)
    assert cos(60) == pytest.approx(0.5) and cos(110) == pytest.approx(0.0, abs=1e-12)
    assert optim.step_decay(10, 0.5)(25) == 0.25 and optim.exponential(0.9)(2) == pytest.approx(0.81)


# -- save / load ---------------------------------------------------------------------------------------

def test_save_load_round_trip_plain_h5py(tmp_path):
    spec = {"model": "cifar_convnet", "num_classes": 20, "seed": 1}
    model = build_model(spec)
    model[1].running_mean[...] = 0.5
    save_model(model, tmp_path / "m.h5", spec)
    with h5py.File(tmp_path / "m.h5") as f:
        np.testing.assert_array_equal(f["params/0.weight"][()], model[0].weight.data)
        assert f["buffers/1.running_mean"][0] == 0.5
    loaded = load_model(tmp_path / "m.h5")
    np.testing.assert_array_equal(loaded.flat_params, model.flat_params)
    np.testing.assert_array_equal(loaded[1].running_mean, model[1].running_mean)
    with pytest.raises(CheckpointError, match="expects"):
        load_model(tmp_path / "m.h5", build_model({"model": "cifar_convnet", "num_classes": 100}))
    assert not list(tmp_path.glob(".*tmp*"))


# -- bad input -----------------------------------------------------------------------------------------

def test_wrong_shape_names_the_layer():
    model = build_model({"model": "mlp"})
    with pytest.raises(ValueError, match=r"Linear '1': expected input \(N, 784\), got shape \(2, 700\)"):
        model(np.zeros((2, 1, 700), np.float32))
    with pytest.raises(ValueError, match=r"Conv2d '0': expected input \(N, 1, H, W\)"):
        build_model({"model": "lenet5"})(np.zeros((2, 3, 28, 28), np.float32))


def test_wrong_dtype_names_the_layer():
    with pytest.raises(ValueError, match="Linear '1': expected float32 input, got float64"):
        build_model({"model": "mlp"})(np.zeros((2, 1, 28, 28)))


def test_unknown_model_and_layer_list_known_names():
    with pytest.raises(ValueError, match="unknown model 'resnet'; known models: mlp, lenet5"):
        build_model({"model": "resnet"})
    with pytest.raises(ValueError, match="unknown type 'Conv3d'; known layers: Linear, Conv2d"):
        build_model({"layers": [{"type": "Conv3d"}]})
    with pytest.raises(ValueError, match=r"layer 0 \(Linear\): unknown options \['size'\]"):
        build_model({"layers": [{"type": "Linear", "size": 3}]})


def test_importing_distnn_does_not_import_ray():
    import subprocess
    import sys
    code = "import sys, distnn, distnn.train, distnn.parallel; print('ray' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# -- PyTorch, when installed ----------------------------------------------------------------------------

def test_matches_pytorch_conv_pool_lstm():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, 9, 9))
    w = rng.standard_normal((4, 3, 3, 3))
    ours = ops.max_pool2d(ops.conv2d(x, w, stride=2, padding=1), 3, 1).data
    ref = torch.nn.functional.max_pool2d(torch.nn.functional.conv2d(torch.tensor(x), torch.tensor(w), stride=2,
                                                                    padding=1), 3, 1).numpy()
    np.testing.assert_allclose(ours, ref, rtol=1e-10)
    lstm = nn.LSTM(5, 6, rng=rng).astype(np.float64)
    t_lstm = torch.nn.LSTM(5, 6, batch_first=True).double()
    with torch.no_grad():
        for name, p in lstm.named_parameters():
            getattr(t_lstm, name + "_l0").copy_(torch.tensor(p.data))
    seq = rng.standard_normal((2, 7, 5))
    ours_seq, (h, c) = lstm(seq)
    ref_seq, (rh, rc) = t_lstm(torch.tensor(seq))
    np.testing.assert_allclose(ours_seq.data, ref_seq.detach().numpy(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(c.data, rc[0].detach().numpy(), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("size", [6, 5])
def test_winograd_output_is_hwnc_memory_for_even_and_odd_sizes(size, monkeypatch):
    """A Winograd convolution returns (H, W, N, C) memory, also when an odd output size crops its
    even tiles, so the layer after it reads its layout instead of copying to channels-first."""
    from distnn.ops.layout import channels_last_order
    monkeypatch.setenv("DISTNN_CONV", "winograd")
    rng = np.random.default_rng(0)
    x = Variable(rng.standard_normal((2, 8, size, size)).astype(np.float32))
    y = ops.conv2d(x, Variable(rng.standard_normal((4, 8, 3, 3)).astype(np.float32)), padding=1).data
    assert y.shape == (2, 4, size, size) and channels_last_order(y) == (2, 3, 0, 1)
    assert y.transpose(2, 3, 0, 1).flags.c_contiguous


@pytest.mark.parametrize("pads, axes", [((1, 1, 1, 1), (0, 1)), ((2, 0, 0, 3), (1, 2)), ((0, 1, 2, 0), (2, 3))])
def test_zero_padded_equals_numpys_pad_for_any_two_axes_and_layout(pads, axes):
    from distnn.ops.layout import zero_padded
    x = np.random.default_rng(1).standard_normal((3, 4, 5, 6)).astype(np.float32).transpose(2, 3, 0, 1)
    widths = [(0, 0)] * 4
    widths[axes[0]], widths[axes[1]] = pads[:2], pads[2:]
    out = zero_padded(x, pads, axes)
    np.testing.assert_array_equal(out, np.pad(x, widths))
    assert out.dtype == np.float32 and out.flags.c_contiguous


def test_concat_and_indexing_keep_a_channels_last_layout():
    """resnet20's shortcut (every second pixel of an (H, W, N, C) input, zero channels either side)
    stays (H, W, N, C) in memory forward and backward, so the residual add and the ReLU's backward
    read arrays laid out alike instead of transposing one."""
    from distnn.ops.layout import memory_order
    hwnc = np.random.default_rng(2).standard_normal((8, 8, 2, 4)).astype(np.float32)
    x = Variable(hwnc.transpose(2, 3, 0, 1), requires_grad=True)
    sub = x[:, :, ::2, ::2]
    half = np.zeros((2, 2, 4, 4), np.float32)
    y = ops.concat([half, sub, half], axis=1)
    assert y.shape == (2, 8, 4, 4) and memory_order(y.data) == (2, 3, 0, 1)
    np.testing.assert_array_equal(y.data[:, 2:6], hwnc.transpose(2, 3, 0, 1)[:, :, ::2, ::2])
    y.backward(np.ones_like(y.data))
    assert memory_order(x.grad) == (2, 3, 0, 1) and x.grad.sum() == 2 * 4 * 4 * 4

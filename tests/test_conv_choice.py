"""Convolution algorithms chosen per layer shape (distnn.ops.conv_choice): every algorithm equals the
others, the calibration keeps the fastest in a host cache, a run fixes its choices once."""
import json

import numpy as np
import pytest

from datagen import prepared_mnist
from distnn import ops
from distnn.autograd import Variable
from distnn.config import TrainConfig
from distnn.ops import conv_choice
from distnn.gradcheck import gradcheck
from distnn.ops.conv_choice import Choice, ConvShape
from distnn.parallel import GradientWorker
from distnn.train import setup


@pytest.fixture
def fresh(tmp_path, monkeypatch):
    """No memo, nothing pinned, nothing forced, and a host cache of the test's own."""
    monkeypatch.setenv("DISTNN_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("DISTNN_CONV", raising=False)
    monkeypatch.setattr(conv_choice, "_memo", {})
    monkeypatch.setattr(conv_choice, "_pinned", None)
    return tmp_path / "cache"


SHAPES = [  # (x shape, w shape, stride, padding)
    ((3, 8, 6, 7), (5, 8, 3, 3), 1, 1),      # every algorithm applies
    ((2, 4, 9, 8), (3, 4, 3, 3), 1, (0, 2)),
    ((2, 3, 8, 8), (4, 3, 5, 5), 1, 2),      # im2col, shifted, direct
    ((2, 6, 9, 9), (4, 6, 3, 3), 2, 1),      # im2col only
]


@pytest.mark.parametrize("layout", ["nchw", "nhwc", "hwnc"])
@pytest.mark.parametrize("xs,ws,stride,padding", SHAPES)
def test_every_algorithm_computes_the_same_convolution(xs, ws, stride, padding, layout, fresh, monkeypatch):
    rng = np.random.default_rng(0)
    order = {"nchw": (0, 1, 2, 3), "nhwc": (0, 2, 3, 1), "hwnc": (2, 3, 0, 1)}[layout]
    x = np.ascontiguousarray(rng.standard_normal(xs).astype(np.float32).transpose(order)).transpose(np.argsort(order))
    w, b = rng.standard_normal(ws).astype(np.float32), rng.standard_normal(ws[0]).astype(np.float32)
    results, g = {}, None
    for algorithm in conv_choice.ALGORITHMS:
        monkeypatch.setenv("DISTNN_CONV", algorithm)
        xv, wv, bv = (Variable(a.copy(order="K"), requires_grad=True) for a in (x, w, b))
        y = ops.conv2d(xv, wv, bv, stride=stride, padding=padding)
        applies = algorithm == "im2col" or (stride == 1 and (algorithm in ("shifted", "direct") or ws[2:] == (3, 3)))
        assert y.creator.choice == Choice.of(algorithm if applies else "im2col")
        g = rng.standard_normal(y.shape).astype(np.float32) if g is None else g
        y.backward(g)
        assert xv.grad.strides == x.strides or layout == "nchw"   # the gradient in the input's layout
        results[algorithm] = (y.data, xv.grad, wv.grad, bv.grad)
    for algorithm, values in results.items():
        for ours, ref in zip(values, results["im2col"]):
            np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-4, err_msg=algorithm)


def shape(n=8, c=16, kernel=(3, 3), stride=(1, 1)):
    return ConvShape(n, c, 12, 12, 16, kernel, stride, (1, 1, 1, 1), "float32")


def test_calibration_keeps_the_fastest_of_each_step_in_the_host_cache(fresh):
    # forward: shifted fastest; input gradient: Winograd; weight gradient: im2col after a shifted forward
    seconds = {"forward": {"im2col": 3.0, "winograd": 2.0, "winograd4": 2.5, "shifted": 1.0, "direct": 4.0},
               "input_grad": {"im2col": 3.0, "winograd": 1.0, "winograd4": 1.5, "shifted": 2.0, "direct": 4.0},
               "weight_grad": {"im2col": 1.0, "winograd": 2.0, "winograd4": 2.5, "shifted": 3.0, "direct": 4.0}}
    timed = []

    def measure(step, a, first):
        timed.append((step, a, first))
        return seconds[step][a]
    choice = conv_choice.choose(shape(), measure)
    assert choice == Choice("shifted", "winograd", "im2col")
    assert len(timed) == (5 + 5 * 5 + 5) * (conv_choice.REPEATS + 1)   # weight gradients after each forward
    assert {first for step, _, first in timed if step == "input_grad"} == {"shifted"}  # laid out as that forward
    cached = json.loads(conv_choice.cache_file().read_text())
    (entry,) = cached["choices"].values()
    assert entry["choice"] == {"forward": "shifted", "input_grad": "winograd", "weight_grad": "im2col"}
    assert entry["ms"]["input_grad"] == {"im2col": 3000.0, "winograd": 1000.0, "winograd4": 1500.0, "shifted": 2000.0,
                                         "direct": 4000.0}

    def never(*a):
        raise AssertionError("calibrated again")
    conv_choice._memo.clear()                   # another process on this host reads the cache
    assert conv_choice.choose(shape(), never) == choice
    conv_choice._memo.clear()
    assert conv_choice.choose(shape(n=64), lambda step, a, first: 0.5 if a == "im2col" else 1.0) == Choice.of("im2col")


@pytest.mark.parametrize("field, value", [("cpu", "another CPU"), ("revision", conv_choice.REVISION - 1)])
def test_a_cache_made_on_another_cpu_or_with_older_kernels_is_not_read(field, value, fresh):
    conv_choice.choose(shape(), lambda step, a, first: {"im2col": 1.0}.get(a, 2.0))
    data = json.loads(conv_choice.cache_file().read_text())
    data["host"][field] = value
    conv_choice.cache_file().write_text(json.dumps(data))
    conv_choice._memo.clear()
    assert conv_choice.choose(shape(), lambda step, a, first: {"shifted": 1.0}.get(a, 2.0)) == Choice.of("shifted")


def test_pinned_choices_are_kept_and_unknown_layers_take_the_fixed_rule(fresh):
    def never(*a):
        raise AssertionError("a pinned process never calibrates")
    mixed = {"forward": "winograd", "input_grad": "shifted", "weight_grad": "im2col"}
    conv_choice.pin({shape().layer: "shifted", shape(c=8).layer: mixed})
    try:
        assert conv_choice.choose(shape(n=500), never) == Choice.of("shifted")   # any batch size: the layer's
        assert conv_choice.choose(shape(c=8), never) == Choice(**mixed)
        assert conv_choice.choose(shape(c=4), never) == Choice.of("im2col")      # not pinned: the fixed rule
        assert conv_choice.choose(shape(c=32), never) == Choice.of("winograd")
        with conv_choice.recording() as table:                                   # the driver chooses anew
            conv_choice.choose(shape(), lambda step, a, first: {"im2col": 1.0}.get(a, 2.0))
        assert table == {shape().layer: "im2col"} and conv_choice._pinned[shape().layer] == "shifted"
    finally:
        conv_choice.pin(None)


@pytest.mark.parametrize("steps", [("winograd", "shifted", "im2col"), ("shifted", "im2col", "winograd"),
                                   ("im2col", "winograd", "shifted"), ("direct", "im2col", "winograd"),
                                   ("winograd", "direct", "direct")])
def test_each_step_by_another_algorithm_is_still_the_exact_gradient(steps, fresh):
    """A forward by one algorithm, the input gradient by a second and the weight gradient by a third
    (the weight gradient then builds its own inputs), against central differences in float64."""
    rng = np.random.default_rng(2)
    x, w, b = rng.standard_normal((2, 8, 5, 6)), rng.standard_normal((3, 8, 3, 3)), rng.standard_normal(3)
    layer = ConvShape(2, 8, 5, 6, 3, (3, 3), (1, 1), (1, 1, 1, 1), "float64").layer
    conv_choice.pin({layer: dict(zip(conv_choice.STEPS, steps))})
    try:
        y = ops.conv2d(Variable(x, requires_grad=True), Variable(w, requires_grad=True), padding=1)
        assert y.creator.choice == Choice(*steps)
        assert gradcheck(lambda x, w, b: ops.conv2d(x, w, b, padding=1), [x, w, b]) <= 1e-6
    finally:
        conv_choice.pin(None)


def test_forcing_an_algorithm(fresh, monkeypatch):
    monkeypatch.setenv("DISTNN_CONV", "winograd")
    assert conv_choice.choose(shape(), None) == Choice.of("winograd")
    assert conv_choice.choose(shape(kernel=(5, 5)), None) == Choice.of("im2col")   # where it does not apply
    monkeypatch.setenv("DISTNN_CONV", "fft")
    with pytest.raises(ValueError, match="DISTNN_CONV='fft': choose one of im2col, winograd, winograd4, shifted, direct"):
        conv_choice.choose(shape(), None)


def test_a_run_fixes_its_choices_and_its_workers_use_them(fresh, tmp_path):
    data = prepared_mnist(tmp_path, n_train=64, n_test=16, seed=1, shards=1)
    c = TrainConfig(model="lenet5", data=str(data), workers=1, batch_size=8, backend="local",
                    out=str(tmp_path / "run")).validate()
    plan = setup.plan(c, cpus=1, log=lambda *a: None, progress=False)
    table = setup.kernel_choices(plan)
    recorded = json.loads((tmp_path / "run" / "kernels.json").read_text())
    assert recorded["convolutions"] == table and len(table) == 2     # lenet5's two conv layers
    assert all(set(Choice.of(c)) <= set(conv_choice.ALGORITHMS) for c in table.values()) and recorded["host"]["cpu"]
    # a resume reads the file, whatever this host would choose now
    forced = {layer: {"forward": "im2col", "input_grad": "shifted", "weight_grad": "im2col"} for layer in table}
    (tmp_path / "run" / "kernels.json").write_text(json.dumps({**recorded, "convolutions": forced}))
    assert setup.kernel_choices(plan, resuming=True) == forced
    try:
        worker = GradientWorker(plan.spec, plan.data, 0, 1, convolutions=forced)
        worker.compute(worker.model.flat_params.copy())
        assert conv_choice._pinned == forced
    finally:
        conv_choice.pin(None)


@pytest.mark.parametrize("compiled_only", ["direct", "winograd4"])
def test_compiled_only_algorithms_need_numba_and_old_host_caches_are_measured_again(compiled_only, fresh):
    from distnn import kernels
    conv_choice.choose(shape(), lambda step, a, first: 1.0 if a == "im2col" else 2.0)
    data = json.loads(conv_choice.cache_file().read_text())
    for entry in data["choices"].values():        # as written before the algorithm existed
        for step in entry["ms"].values():
            del step[compiled_only]
    conv_choice.cache_file().write_text(json.dumps(data))
    conv_choice._memo.clear()
    assert conv_choice.choose(shape(), lambda step, a, first: 1.0 if a == compiled_only else 2.0) == Choice.of(compiled_only)
    kernels.use("numpy")
    try:
        assert compiled_only not in conv_choice.applicable(shape())
        conv_choice.pin({shape().layer: compiled_only})   # pinned where numba ran, run where it does not
        assert conv_choice.choose(shape(), None) == conv_choice.default(shape())
    finally:
        kernels.use(None)
        conv_choice.pin(None)


def test_a_near_tie_goes_to_the_fixed_rule(fresh):
    """Another algorithm replaces the fixed rule's (im2col for this 5x5 layer) only when it times
    MARGIN faster."""
    five = shape(kernel=(5, 5))
    assert conv_choice.default(five) == Choice.of("im2col")
    close = 1 - conv_choice.MARGIN / 2
    times = {"forward": {"direct": close}, "input_grad": {"shifted": 0.5}, "weight_grad": {"direct": close}}
    choice = conv_choice.choose(five, lambda step, a, first: times[step].get(a, 1.0))
    assert choice == Choice("im2col", "shifted", "im2col")


def test_the_forward_and_the_weight_gradient_are_chosen_as_a_pair(fresh):
    """A forward that times fastest alone loses to one whose kept inputs make its weight gradient
    cheap: 'direct' forward 0.8 + a weight gradient building its own inputs 2.0 against Winograd's
    1.0 + 0.5 reusing its tiles."""
    def measure(step, a, first):
        if step == "forward":
            return {"direct": 0.8, "winograd": 1.0}.get(a, 3.0)
        if step == "weight_grad":
            return 0.5 if a == first == "winograd" else 2.0
        return 1.0
    assert conv_choice.choose(shape(), measure) == Choice.of("winograd")


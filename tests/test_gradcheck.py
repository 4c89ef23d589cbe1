"""Every operator and every layer against central differences in float64 (max relative error 1e-6)."""
import numpy as np
import pytest

import distnn
from distnn import nn, ops
from distnn.autograd import eval_mode, train_mode
from distnn.gradcheck import GradcheckError, gradcheck, gradcheck_module

RTOL = 1e-6


def rand(*shape, seed=0, low=None):
    x = np.random.default_rng(seed).standard_normal(shape)
    if low is not None:  # keep away from kinks (relu at 0, ties in pooling)
        x = np.sign(x) * (np.abs(x) + low)
    return x


def labels(n, k, seed=1):
    return np.random.default_rng(seed).integers(0, k, n)


def distinct(*shape, seed=0):
    """Values with no ties and gaps far larger than the finite-difference step (for max pooling)."""
    n = int(np.prod(shape))
    return (np.random.default_rng(seed).permutation(n) * 0.01).reshape(shape) - n * 0.005


MASK = (np.random.default_rng(3).random((4, 5)) >= 0.3) / 0.7

# operator class -> list of (fn, inputs); the fn builds a fresh operator per call
CASES = {
    ops.basic.Add: [(lambda a, b: a + b, [rand(3, 4), rand(4, seed=1)]),
              (lambda a, b: a + b, [rand(3, 1), rand(1, 4, seed=1)])],
    ops.basic.Sub: [(lambda a, b: a - b, [rand(3, 4), rand(3, 1, seed=1)])],
    ops.basic.Mul: [(lambda a, b: a * b, [rand(3, 4), rand(4, seed=1)])],
    ops.basic.Div: [(lambda a, b: a / b, [rand(3, 4), rand(3, 4, seed=1, low=0.5)])],
    ops.basic.Neg: [(lambda a: -a, [rand(3, 4)])],
    ops.basic.Pow: [(lambda a: a ** 3, [rand(3, 4)])],
    ops.basic.Exp: [(ops.exp, [rand(3, 4)])],
    ops.basic.Log: [(ops.log, [np.abs(rand(3, 4)) + 0.5])],
    ops.basic.MatMul: [(ops.matmul, [rand(3, 4), rand(4, 5, seed=1)]),
                 (ops.matmul, [rand(2, 3, 4), rand(4, 5, seed=1)]),
                 (ops.matmul, [rand(2, 3, 4), rand(2, 4, 5, seed=1)])],
    ops.basic.Linear: [(ops.linear, [rand(5, 4), rand(3, 4, seed=1), rand(3, seed=2)]),
                 (ops.linear, [rand(2, 5, 4), rand(3, 4, seed=1)])],
    ops.shape.Reshape: [(lambda a: ops.reshape(a, (4, 3)), [rand(3, 4)])],
    ops.shape.Transpose: [(lambda a: ops.transpose(a, (2, 0, 1)), [rand(2, 3, 4)])],
    ops.shape.Sum: [(lambda a: ops.sum(a, axis=1), [rand(3, 4)]), (lambda a: ops.sum(a), [rand(3, 4)])],
    ops.shape.Mean: [(lambda a: ops.mean(a, axis=(0, 2), keepdims=True), [rand(2, 3, 4)])],
    ops.shape.Concat: [(lambda a, b: ops.concat([a, b], axis=1), [rand(2, 3), rand(2, 4, seed=1)])],
    ops.shape.Stack: [(lambda a, b: ops.stack([a, b], axis=1), [rand(2, 3), rand(2, 3, seed=1)])],
    ops.shape.Unstack: [(lambda a: ops.unstack(a, axis=1)[0] * 2 + ops.unstack(a, axis=1)[2], [rand(2, 3, 4)])],
    ops.shape.GetItem: [(lambda a: a[1:, ::2], [rand(3, 4)]), (lambda a: a[np.array([0, 2, 0])], [rand(3, 4)])],
    ops.shape.Embedding: [(lambda w: ops.embedding(np.array([[1, 3], [1, 0]]), w), [rand(5, 3)])],
    ops.activation.ReLU: [(ops.relu, [rand(3, 4, low=0.01)])],
    ops.activation.LeakyReLU: [(lambda a: ops.leaky_relu(a, 0.1), [rand(3, 4, low=0.01)])],
    ops.activation.ELU: [(ops.elu, [rand(3, 4, low=0.01)])],
    ops.activation.SELU: [(ops.selu, [rand(3, 4, low=0.01)])],
    ops.activation.PReLU: [(ops.prelu, [rand(2, 3, 2, 2, low=0.01), rand(3, seed=1)]),
                (ops.prelu, [rand(4, 5, low=0.01), np.array([0.25])])],
    ops.activation.Sigmoid: [(ops.sigmoid, [rand(3, 4)])],
    ops.activation.Tanh: [(ops.tanh, [rand(3, 4)])],
    ops.activation.Softplus: [(ops.softplus, [rand(3, 4)])],
    ops.activation.GELU: [(ops.gelu, [rand(3, 4)])],
    ops.activation.Softmax: [(lambda a: ops.softmax(a, axis=1), [rand(3, 4)])],
    ops.activation.LogSoftmax: [(lambda a: ops.log_softmax(a, axis=0), [rand(3, 4)])],
    ops.loss.SoftmaxCrossEntropy: [(lambda a: ops.softmax_cross_entropy(a, labels(5, 4)), [rand(5, 4)]),
                              (lambda a: ops.softmax_cross_entropy(a, labels(5, 4), 0.1), [rand(5, 4)])],
    ops.loss.MSE: [(ops.mse, [rand(3, 4), rand(3, 4, seed=1)])],
    ops.loss.BCEWithLogits: [(ops.bce_with_logits, [rand(3, 4), np.random.default_rng(2).random((3, 4))])],
    ops.conv.Conv2d: [(lambda x, w, b: ops.conv2d(x, w, b, stride=2, padding=1), [rand(2, 3, 7, 7), rand(4, 3, 3, 3, seed=1), rand(4, seed=2)]),
                 (lambda x, w: ops.conv2d(x, w, padding="same"), [rand(2, 2, 5, 6), rand(3, 2, 4, 4, seed=1)]),
                 (lambda x, w: ops.conv2d(x, w, stride=(1, 2)), [rand(1, 2, 6, 7), rand(2, 2, 3, 2, seed=1)]),
                 # channels-last inputs (every conv after the first) take the other im2col path
                 (lambda xh, w, b: ops.conv2d(_nchw(xh), w, b, stride=2, padding=1),
                  [rand(2, 7, 7, 3), rand(4, 3, 3, 3, seed=1), rand(4, seed=2)]),
                 (lambda xh, w: ops.conv2d(_nchw(xh), w, padding="same"), [rand(2, 5, 6, 2), rand(3, 2, 4, 4, seed=1)]),
                 # 3x3 at stride 1 with >= 8 input channels: Winograd; odd and even outputs, padding 0-2,
                 # each input layout, and a Winograd conv feeding another (its (H, W, N, C) output)
                 (lambda x, w, b: ops.conv2d(x, w, b, padding=1), [rand(2, 8, 5, 6), rand(3, 8, 3, 3, seed=1), rand(3, seed=2)]),
                 (lambda xh, w: ops.conv2d(_nchw(xh), w, padding=(0, 2)), [rand(1, 6, 5, 8), rand(2, 8, 3, 3, seed=1)]),
                 (lambda x, w1, w2: ops.conv2d(ops.conv2d(x, w1, padding="same"), w2, padding=2),
                  [rand(2, 8, 4, 3), rand(8, 8, 3, 3, seed=1), rand(2, 8, 3, 3, seed=2)])],
    ops.pool.MaxPool2d: [(lambda x: ops.max_pool2d(x, 3, 2), [distinct(2, 3, 7, 7)]),
                    (lambda x: ops.max_pool2d(x, 2), [distinct(2, 3, 6, 4)]),
                    # (H, W, N, C) and (N, H, W, C) memory, as after a Winograd or an im2col conv
                    (lambda x: ops.max_pool2d(_hwnc(x), 2), [distinct(6, 4, 2, 3)]),
                    (lambda x: ops.max_pool2d(_hwnc(x), 3, 2), [distinct(7, 7, 2, 3)]),
                    (lambda xh: ops.max_pool2d(_nchw(xh), 2), [distinct(2, 6, 4, 3)]),
                    # with the ReLU before it folded in (Sequential: ReLU, MaxPool2d)
                    (lambda x: ops.max_pool2d(x, 2, relu=True), [distinct(2, 3, 6, 4)]),
                    (lambda x: ops.max_pool2d(_hwnc(x), 3, 2, relu=True), [distinct(7, 7, 2, 3)])],
    ops.pool.AvgPool2d: [(lambda x: ops.avg_pool2d(x, 3, 2), [rand(2, 3, 7, 7)]),
                    (lambda x: ops.avg_pool2d(x, 2), [rand(2, 3, 4, 4)]),
                    (lambda x: ops.avg_pool2d(_hwnc(x), 3, 2), [rand(7, 7, 2, 3)])],
    ops.norm.Dropout: [(lambda x: ops.dropout(x, 0.3, None, training=True, mask=MASK), [rand(4, 5)])],
    ops.recurrent.RNNCell: [(lambda x, h, wi, wh, bi, bh: ops.rnn_cell(x, h, wi, wh, bi, bh),
                   [rand(3, 4), rand(3, 5, seed=1), rand(5, 4, seed=2) * 0.5, rand(5, 5, seed=3) * 0.5,
                    rand(5, seed=4), rand(5, seed=5)])],
    ops.recurrent.LSTMCell: [(lambda x, h, c, wi, wh, bi, bh: ops.lstm_cell(x, h, c, wi, wh, bi, bh)[0] * 1.5
                    + ops.lstm_cell(x, h, c, wi, wh, bi, bh)[1],
                    [rand(3, 4), rand(3, 5, seed=1), rand(3, 5, seed=6), rand(20, 4, seed=2) * 0.5,
                     rand(20, 5, seed=3) * 0.5, rand(20, seed=4), rand(20, seed=5)])],
    ops.recurrent.LSTMSequence: [(lambda x, h, c, wi, wh: _seq_loss(ops.lstm_sequence(x, h, c, wi, wh)),
                        [rand(3, 6, 4, seed=7), rand(3, 5, seed=1), rand(3, 5, seed=6), rand(20, 4, seed=2) * 0.5,
                         rand(20, 5, seed=3) * 0.5]),
                                 (lambda x, h, c, wi, wh, b: _seq_loss(ops.lstm_sequence(x, h, c, wi, wh, b)),
                        [rand(3, 6, 4, seed=7), rand(3, 5, seed=1), rand(3, 5, seed=6), rand(20, 4, seed=2) * 0.5,
                         rand(20, 5, seed=3) * 0.5, rand(20, seed=8)]),
                                 # h_T alone: the engine passes None for the sequence and c_T; and a zero
                                 # h0, whose step-0 product the forward leaves out
                                 (lambda x, h, c, wi, wh, b: ops.sum(ops.lstm_sequence(x, h, c, wi, wh, b)[1] * 1.5),
                        [rand(3, 6, 4, seed=7), np.zeros((3, 5)), rand(3, 5, seed=6), rand(20, 4, seed=2) * 0.5,
                         rand(20, 5, seed=3) * 0.5, rand(20, seed=8)])],
}


def _seq_loss(outputs):
    """All three outputs of a sequence operator into one, each with its own weight."""
    seq, h, c = outputs
    return ops.sum(seq * seq) + ops.sum(h * 1.5) + ops.sum(c * c * 0.5)


def _nchw(xh):
    """(N, H, W, C) -> the channels-last (N, C, H, W) view that a conv inside a network receives."""
    v = ops.transpose(xh, (0, 3, 1, 2))
    assert not v.data.flags.c_contiguous
    return v


def _hwnc(x):
    """(H, W, N, C) -> the (N, C, H, W) view that a layer after a Winograd convolution receives."""
    return ops.transpose(x, (2, 3, 0, 1))


def _bn(training, relu=False):
    def fn(x, g, b):
        return ops.batch_norm(x, g, b, np.zeros(3), np.ones(3) * 1.5, training=training, relu=relu)
    return fn


CASES[ops.norm.BatchNorm] = [(_bn(True), [rand(6, 3), rand(3, seed=1), rand(3, seed=2)]),
                        (_bn(True), [rand(4, 3, 3, 2), rand(3, seed=1), rand(3, seed=2)]),
                        (_bn(False), [rand(4, 3, 3, 2), rand(3, seed=1), rand(3, seed=2)]),
                        # an (H, W, N, C)-ordered input, as a Winograd convolution returns
                        (lambda x, g, b: _bn(True)(_hwnc(x), g, b),
                         [rand(3, 2, 4, 3), rand(3, seed=1), rand(3, seed=2)]),
                        # with its ReLU fused, in every layout
                        (_bn(True, relu=True), [rand(6, 3), rand(3, seed=1), rand(3, seed=2)]),
                        (_bn(True, relu=True), [rand(4, 3, 3, 2), rand(3, seed=1), rand(3, seed=2)]),
                        (_bn(False, relu=True), [rand(4, 3, 3, 2), rand(3, seed=1), rand(3, seed=2)]),
                        (lambda x, g, b: _bn(True, relu=True)(_hwnc(x), g, b),
                         [rand(3, 2, 4, 3), rand(3, seed=1), rand(3, seed=2)]),
                        (lambda xh, g, b: _bn(True, relu=True)(_nchw(xh), g, b),
                         [rand(4, 3, 2, 3), rand(3, seed=1), rand(3, seed=2)])]
CASES[ops.activation.AddReLU] = [
    (ops.add_relu, [rand(2, 3, 4, 5), rand(2, 3, 4, 5, seed=1)]),
    (ops.add_relu, [rand(3, 4), rand(3, 4, seed=1)]),
    # both (H, W, N, C) memory (the kernel runs over memory), and two layouts (the numpy path)
    (lambda a, b: ops.add_relu(_hwnc(a), _hwnc(b)), [rand(4, 5, 2, 3), rand(4, 5, 2, 3, seed=1)]),
    (lambda a, bh: ops.add_relu(_hwnc(a), _nchw(bh)), [rand(4, 5, 2, 3), rand(2, 4, 5, 3, seed=1)])]


def test_every_operator_has_a_gradient_check():
    missing = [c.__name__ for c in ops.all_operators() if c not in CASES]
    assert not missing, f"operators without a gradient check: {missing}"


@pytest.mark.parametrize("op,fn,inputs", [(op, fn, inputs) for op, cases in CASES.items() for fn, inputs in cases],
                         ids=lambda v: v.__name__ if isinstance(v, type) else "")
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_operator_gradient(op, fn, inputs, mode, kernel_path):
    with train_mode() if mode == "train" else eval_mode():
        assert gradcheck(fn, inputs, rtol=RTOL) <= RTOL


@pytest.mark.parametrize("fn,inputs", CASES[ops.conv.Conv2d])
@pytest.mark.parametrize("algorithm", ops.conv_choice.ALGORITHMS)
def test_every_convolution_algorithm_gradient(fn, inputs, algorithm, kernel_path, monkeypatch):
    """Each algorithm forced (DISTNN_CONV) on every conv case it applies to (others fall back)."""
    monkeypatch.setenv("DISTNN_CONV", algorithm)
    assert gradcheck(fn, inputs, rtol=RTOL) <= RTOL


def test_gradcheck_catches_a_wrong_gradient():
    class Wrong(distnn.Operator):
        def forward(self, x):
            return x * x

        def backward(self, gy):
            return gy * self.needs_grad[0]  # should be 2 x gy

    with pytest.raises(GradcheckError):
        gradcheck(lambda x: Wrong()(x), [rand(3)])


# -- layers ---------------------------------------------------------------------------------------

def _seeded_dropout(module, seed=5):
    """Make every Dropout in ``module`` draw the same mask on every call (a fixed mask)."""
    for _, m in module.named_modules():
        if isinstance(m, nn.Dropout):
            original = m.forward

            def forward(x, m=m, original=original):
                m.rng = np.random.default_rng(seed)
                return original(x)
            m.forward = forward
    return module


def _xent(out):
    return ops.softmax_cross_entropy(out, np.arange(out.shape[0]) % out.shape[1])


def _random_affine(norm, r):
    """A norm layer's scale and shift away from ones and zeros, under which a wrongly broadcast scale
    or a dropped shift would still pass."""
    norm.weight.data[...] = r.uniform(0.5, 2.0, norm.weight.data.shape)
    norm.bias.data[...] = r.normal(0.0, 1.0, norm.bias.data.shape)
    return norm


LAYER_CASES = {
    nn.Linear: lambda r: (nn.Linear(4, 3, rng=r), rand(5, 4)),
    nn.Conv2d: lambda r: (nn.Conv2d(3, 4, 3, stride=2, padding=1, rng=r), rand(2, 3, 7, 7)),
    nn.MaxPool2d: lambda r: (nn.MaxPool2d(3, 2), distinct(2, 2, 7, 7)),
    nn.AvgPool2d: lambda r: (nn.AvgPool2d(3, 2), rand(2, 2, 7, 7)),
    nn.GlobalAvgPool2d: lambda r: (nn.GlobalAvgPool2d(), rand(2, 3, 4, 5)),
    nn.BatchNorm1d: lambda r: (_random_affine(nn.BatchNorm1d(3), r), rand(6, 3)),
    nn.BatchNorm2d: lambda r: (_random_affine(nn.BatchNorm2d(3), r), rand(4, 3, 3, 3)),
    nn.Dropout: lambda r: (_seeded_dropout(nn.Dropout(0.4)), rand(5, 6)),
    nn.Flatten: lambda r: (nn.Flatten(), rand(2, 3, 2, 2)),
    nn.Reshape: lambda r: (nn.Reshape(4, 3), rand(2, 12)),
    nn.Embedding: lambda r: (nn.Embedding(6, 3, rng=r), np.array([[0, 5, 2], [2, 2, 1]])),
    nn.ReLU: lambda r: (nn.ReLU(), rand(3, 4, low=0.01)),
    nn.LeakyReLU: lambda r: (nn.LeakyReLU(slope=0.2), rand(3, 4, low=0.01)),
    nn.ELU: lambda r: (nn.ELU(alpha=0.7), rand(3, 4, low=0.01)),
    nn.SELU: lambda r: (nn.SELU(), rand(3, 4, low=0.01)),
    nn.PReLU: lambda r: (nn.PReLU(3), rand(2, 3, 4, low=0.01)),
    nn.Sigmoid: lambda r: (nn.Sigmoid(), rand(3, 4)),
    nn.Tanh: lambda r: (nn.Tanh(), rand(3, 4)),
    nn.Softplus: lambda r: (nn.Softplus(), rand(3, 4)),
    nn.GELU: lambda r: (nn.GELU(), rand(3, 4)),
    nn.Softmax: lambda r: (nn.Softmax(axis=1), rand(3, 4)),
    nn.LogSoftmax: lambda r: (nn.LogSoftmax(), rand(3, 4)),
    nn.RNN: lambda r: (nn.RNN(4, 5, rng=r), rand(3, 6, 4)),
    nn.LSTM: lambda r: (nn.LSTM(4, 5, rng=r), rand(3, 6, 4)),
}


def test_every_layer_has_a_gradient_check():
    assert set(nn.LAYERS.values()) == set(LAYER_CASES)


@pytest.mark.parametrize("layer", list(LAYER_CASES), ids=lambda c: c.__name__)
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_layer_gradient(layer, mode, kernel_path):
    module, x = LAYER_CASES[layer](np.random.default_rng(0))
    with train_mode() if mode == "train" else eval_mode():
        if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)) and mode == "eval":
            module.running_mean[...] = np.linspace(-0.5, 0.5, 3)
            module.running_var[...] = np.linspace(0.5, 2.0, 3)
        err = gradcheck_module(module, x, rtol=RTOL)
    assert err <= RTOL


@pytest.mark.parametrize("layer", [nn.RNN, nn.LSTM], ids=lambda c: c.__name__)
def test_recurrent_sequence_every_gate_and_last_state(layer):
    """Over 7 steps, through both the whole sequence and the last (h, c): every gate's weights and
    biases get checked, including the cell-state path from step t+1 that the student code dropped."""
    module = layer(3, 4, rng=np.random.default_rng(1))

    def loss(out):
        seq, last = out
        h_last = last[0] if isinstance(last, tuple) else last
        total = ops.sum(seq * seq) + ops.sum(h_last * 3.0)
        if isinstance(last, tuple):
            total = total + ops.sum(last[1] * last[1])
        return total

    assert gradcheck_module(module, rand(2, 7, 3, seed=4), loss=loss, directions=6, rtol=RTOL) <= RTOL
    # every gate block of every weight and bias received a gradient
    for name, p in module.named_parameters():
        blocks = np.split(p.grad, module.gates, axis=0)
        assert all(np.abs(b).sum() > 0 for b in blocks), name


def test_lstm_cell_state_path_matters():
    """The gradient of an early input through c must include the path via step t+1's cell."""
    module = nn.LSTM(2, 3, output="last", rng=np.random.default_rng(0)).astype(np.float64)
    x = distnn.Variable(rand(1, 5, 2), requires_grad=True)
    module(x).sum().backward()
    assert gradcheck_module(module, rand(1, 5, 2), rtol=RTOL) <= RTOL
    assert np.abs(x.grad[:, 0]).sum() > 0


@pytest.mark.parametrize("name", ["mlp", "lenet5", "cifar_convnet", "lstm_classifier"])
def test_zoo_models_gradient(name):
    from distnn.models import build_model, input_shape
    spec = {"model": name, "seed": 0}
    if name == "cifar_convnet":
        spec.update(num_classes=5, widths=(2, 3), fc=6)
    if name == "mlp":
        spec.update(hidden=(8, 6))
    if name == "lstm_classifier":
        spec.update(hidden=5, steps=4, features=7)
    model = build_model(spec)
    shape = (1, 4, 7) if name == "lstm_classifier" else input_shape(spec)
    x = rand(3, *shape, seed=2)
    with train_mode():
        _seeded_dropout(model)
        assert gradcheck_module(model, x, loss=_xent, rtol=RTOL) <= RTOL

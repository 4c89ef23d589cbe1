"""Weights to and from PyTorch state dicts."""
import numpy as np
import pytest

from distnn.autograd import eval_mode
from distnn.checkpoint import load_model, save_model
from distnn.cli import main as cli
from distnn.interchange import from_torch_names, read_state, to_torch_names, torch_twin
from distnn.models import build_model, input_shape

SPECS = [{"model": "mlp"}, {"model": "lenet5"}, {"model": "cifar_convnet", "num_classes": 20},
         {"model": "lstm_classifier"}]
# a layer list as a contributor's new layer would be tried (docs/architecture.md, A layer): input (1, 8, 8)
LAYER_LIST = {"layers": [{"type": "Conv2d", "in_channels": 1, "out_channels": 8, "kernel_size": 3, "padding": 1},
                         {"type": "BatchNorm2d", "num_features": 8}, {"type": "ReLU"},
                         {"type": "Conv2d", "in_channels": 8, "out_channels": 8, "kernel_size": 3, "padding": 1},
                         {"type": "BatchNorm2d", "num_features": 8}, {"type": "MaxPool2d", "kernel_size": 2},
                         {"type": "Flatten"}, {"type": "Linear", "in_features": 128, "out_features": 10}]}


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s["model"])
def test_npz_round_trip_through_cli(spec, tmp_path):
    model = build_model({**spec, "seed": 3})
    save_model(model, tmp_path / "m.h5", {**spec, "seed": 3})
    assert cli(["export", str(tmp_path / "m.h5"), "--format", "npz"]) == 0
    state = read_state(tmp_path / "m.npz")
    if spec["model"] == "lstm_classifier":
        assert state["1.weight_ih_l0"].shape == (512, 28)
    if spec["model"] == "cifar_convnet":
        assert "1.num_batches_tracked" in state
    args = ["import", str(tmp_path / "m.npz"), "--model", spec["model"], "--out", str(tmp_path / "back.h5")]
    assert cli(args + (["--num-classes", "20"] if "num_classes" in spec else [])) == 0
    np.testing.assert_array_equal(load_model(tmp_path / "back.h5").flat_params, model.flat_params)


@pytest.mark.parametrize("spec", SPECS + [LAYER_LIST], ids=lambda s: s.get("model", "layer_list"))
def test_same_outputs_as_pytorch(spec, tmp_path):
    torch = pytest.importorskip("torch")
    model = build_model({**spec, "seed": 1})
    rng = np.random.default_rng(0)
    for _, b in model.named_buffers():  # non-trivial running statistics
        b[...] = rng.uniform(0.5, 1.5, b.shape)
    twin = torch_twin(spec).eval()
    twin.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in to_torch_names(model).items()})
    x = rng.standard_normal((4, *(input_shape(spec) or (1, 8, 8)))).astype(np.float32)
    with eval_mode():
        ours = model(x).data
    theirs = twin(torch.from_numpy(x)).detach().numpy()
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-5)
    # and back: a PyTorch state dict loads into a fresh distnn model
    fresh = build_model({**spec, "seed": 9})
    from_torch_names(fresh, {k: v.numpy() for k, v in twin.state_dict().items()})
    np.testing.assert_array_equal(fresh.flat_params, model.flat_params)
    torch.save(twin.state_dict(), tmp_path / "t.pt")
    assert set(read_state(tmp_path / "t.pt")) == set(twin.state_dict())


def test_import_wrong_model_names_the_mismatch(tmp_path, capsys):
    save_model(build_model({"model": "mlp"}), tmp_path / "m.h5", {"model": "mlp"})
    capsys.readouterr()
    assert cli(["export", str(tmp_path / "m.h5"), "--format", "npz"]) == 0
    assert cli(["import", str(tmp_path / "m.npz"), "--model", "lenet5", "--out", str(tmp_path / "x.h5")]) == 2
    assert "missing" in capsys.readouterr().err and not (tmp_path / "x.h5").exists()


def test_batch_norm_counter_follows_the_layer_type_not_a_name():
    """PyTorch's num_batches_tracked goes with each batch-norm layer, and with nothing else that
    happens to hold a buffer called running_var."""
    from distnn import nn

    class Tracker(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("running_var", np.ones(3, np.float32))

        def forward(self, x):
            return x

    model = nn.Sequential(nn.Linear(3, 3), Tracker(), nn.BatchNorm1d(3))
    state = to_torch_names(model)
    assert [k for k in state if k.endswith("num_batches_tracked")] == ["2.num_batches_tracked"]
    assert "1.running_var" in state

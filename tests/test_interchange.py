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


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s["model"])
def test_same_outputs_as_pytorch(spec, tmp_path):
    torch = pytest.importorskip("torch")
    model = build_model({**spec, "seed": 1})
    rng = np.random.default_rng(0)
    for _, b in model.named_buffers():  # non-trivial running statistics
        b[...] = rng.uniform(0.5, 1.5, b.shape)
    twin = torch_twin(spec).eval()
    twin.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in to_torch_names(model).items()})
    x = rng.standard_normal((4, *input_shape(spec))).astype(np.float32)
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

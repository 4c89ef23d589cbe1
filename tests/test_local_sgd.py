"""Local SGD (``sync_every`` > 1): each worker steps with its own optimizer, the servers average how
far the workers moved every H steps. Same maths on both backends, resumable exactly, and one worker's
local SGD is plain training."""
import numpy as np
import pytest

from datagen import prepared_mnist
from distnn.checkpoint import latest_checkpoint, load_checkpoint
from distnn.config import ConfigError, TrainConfig
from distnn.train import Trainer
from distnn.train.schedule import RunLength, SyncSchedule


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return prepared_mnist(tmp_path_factory.mktemp("local-sgd"), n_train=512, n_test=64, seed=4, shards=2)


def config(data_dir, out, **kw):
    base = dict(model="mlp", data=str(data_dir), workers=2, batch_size=32, epochs=2, backend="local", out=str(out),
                log_every=3, seed=3, sync_every=3, warmup=2, model_options={"hidden": [32]})
    base.update(kw)
    return TrainConfig(**base).validate()


def run(cfg, handle=None, on_step=None):
    trainer = Trainer(cfg, backend=handle, log=lambda *a: None, progress=False, on_step=on_step)
    try:
        return trainer.run(), trainer.model.flat_params.copy()
    finally:
        trainer.close()


def test_local_and_ray_bit_identical(data_dir, tmp_path, ray_backend):
    s_local, p_local = run(config(data_dir, tmp_path / "local", servers=2))
    s_ray, p_ray = run(config(data_dir, tmp_path / "ray", servers=2, backend="ray"), ray_backend)
    s_every, p_every = run(config(data_dir, tmp_path / "every", sync_every=1))
    assert np.array_equal(p_local, p_ray) and not np.allclose(p_local, p_every)
    assert s_local["steps"] == s_ray["steps"] == 2 * 8               # 8 steps per epoch (256 / 32)
    # Ray's worker-driven steps split their wait: the last worker's push, and the others' wait for it
    assert s_ray["per_step_ms"]["push_round_trip"] > 0 and s_ray["per_step_ms"]["barrier"] >= 0
    # rounds of 3 steps, cut at epoch ends: moves go up and parameters come back once a round
    every, flat, rounds = s_every["bytes_per_step"], p_local.nbytes, s_local["bytes_per_step"]
    assert every["gradients_to_servers"] == every["parameters_to_workers"] == 2 * flat
    assert rounds["gradients_to_servers"] == rounds["parameters_to_workers"]
    assert 2 * flat / 3 <= rounds["gradients_to_servers"] <= 2 * flat / 2
    # the same worker loop in one process: its round trip is the update itself, no transfer, no wait
    assert s_local["per_step_ms"]["push_round_trip"] < s_local["per_step_ms"]["compute"]


def test_one_worker_local_sgd_is_plain_training(data_dir, tmp_path):
    """One worker: averaging its own moves gives back its own parameters (to float32 rounding)."""
    _, local = run(config(data_dir, tmp_path / "a", workers=1, sync_every=4))
    _, plain = run(config(data_dir, tmp_path / "b", workers=1, sync_every=1))
    assert np.allclose(local, plain, rtol=0, atol=1e-5) and not np.array_equal(local, np.zeros_like(local))


def test_resume_is_bit_identical(data_dir, tmp_path):
    """The workers' own optimizer slots are in the checkpoint; a stop mid-round waits for its end."""
    _, whole = run(config(data_dir, tmp_path / "whole", checkpoint_every=6, epochs=3))
    stop = lambda trainer, step: trainer.request_stop() if step == 4 else None  # noqa: E731
    with pytest.raises(Exception, match="continue with"):
        run(config(data_dir, tmp_path / "part", checkpoint_every=6, epochs=3), on_step=stop)
    ckpt = load_checkpoint(latest_checkpoint(tmp_path / "part"))
    assert ckpt["step"] % 3 == 0 and ckpt["worker_states"].shape[0] == 2   # taken where a round ended
    trainer = Trainer(TrainConfig(**ckpt["config"]).validate(), log=lambda *a: None, progress=False, resume=ckpt)
    try:
        trainer.run()
        assert np.array_equal(trainer.model.flat_params, whole)
    finally:
        trainer.close()


def test_chunks_end_where_rounds_end():
    s = SyncSchedule(RunLength(10, 2, 2, "sync"), log_every=4, checkpoint_every=6, sync_every=3)
    assert s.chunks(0, 10) == [(0, 6), (6, 3), (9, 1)]    # cuts at 4 and 8 move to 6 and 9; the epoch ends at 10
    assert s.chunks(10, 20) == [(10, 2), (12, 6), (18, 2)]


@pytest.mark.parametrize("options, message", [
    ({"mode": "async", "sync_every": 4}, "sync_every = 4 applies only with mode = 'sync' and compress = 'none'"),
    ({"compress": "fp16", "sync_every": 4},
     "applies only with mode = 'sync' and compress = 'none'; drop it (here compress = 'fp16')"),
    ({"sync_every": 4, "checkpoint_every": 10}, "checkpoint_every = 10 must be a multiple of sync_every = 4"),
    ({"sync_every": 0}, "sync_every must be >= 1"),
])
def test_refused_where_it_cannot_apply(options, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        TrainConfig(**options).validate()

"""Gradient compression with error feedback: what is sent plus what is kept is what was owed; fewer
bytes on the wire, counted; local and Ray runs still bit-identical for every setting; training still
converges."""
import json

import numpy as np
import pytest

from datagen import prepared_mnist
from distnn.config import ConfigError, TrainConfig
from distnn.parallel import ParameterServer
from distnn.parallel.collect import StepParts, chunk_bounds, union
from distnn.parallel.compress import Compressor, Sparse, Update, dense, largest, parse
from distnn.parallel.specs import OptimizerSpec, ScheduleSpec
from distnn.train import Trainer


@pytest.mark.parametrize("method", ["fp16", "topk:0.01", "topk:0.3", "topk:1"])
@pytest.mark.parametrize("bounds", [None, [(0, 300), (300, 1000)]])
def test_sent_plus_residual_is_what_was_owed(method, bounds):
    rng = np.random.default_rng(0)
    c = Compressor(method, 1000)
    for _ in range(5):
        grad = (rng.standard_normal(1000) * rng.choice([1e-6, 1.0, 100.0], 1000)).astype(np.float32)
        owed = c.residual + grad                         # float32, as the compressor adds them
        sent = c(grad, bounds)
        got = np.concatenate([dense(p) for p in sent]) + c.residual
        assert np.array_equal(got, owed)                 # exact: top-k disjoint, fp16 by Sterbenz's lemma
        if method.startswith("topk"):
            k = sum(p.index.size for p in sent)
            assert all(isinstance(p, Sparse) for p in sent) and k >= 0.01 * 1000
            assert np.count_nonzero(np.concatenate([dense(p) for p in sent])) <= k


@pytest.mark.parametrize("case", ["scales", "sample_low", "sample_high", "zeros", "ties", "small"])
def test_the_entries_sent_are_those_of_largest_magnitude(case):
    """``largest`` (a threshold read off every 16th entry, then a partition of the entries above it)
    picks the k entries a full sort would, also where the sample misses them all, or sets a threshold
    that fewer than k reach (the fallback to a partition of everything)."""
    rng = np.random.default_rng(5)
    n, k = (100, 7) if case == "small" else (20_000, 200)
    x = (rng.standard_normal(n) * rng.choice([1e-4, 1e-2, 1.0], n)).astype(np.float32)
    if case == "sample_low":
        x[::16] = 0
        x[1::16] *= 1e4      # the k largest all lie between the sampled entries
    if case == "sample_high":
        x[::16] *= 1e4       # only the sampled entries reach the threshold read off them: under k
    if case == "zeros":
        x[:] = 0
    if case == "ties":
        x = np.round(x * 4).astype(np.float32)
    index = largest(x, k)
    assert index.dtype == np.int32 and index.size == k and np.all(np.diff(index) > 0)
    kth = np.sort(np.abs(x))[n - k]
    assert np.all(np.abs(x[index]) >= kth) and np.count_nonzero(np.abs(x) > kth) <= k


def test_the_sparse_mean_is_the_dense_mean_at_the_union_of_the_entries():
    """A shard's mean of top-k gradients: the dense mean, non-zero only where some worker sent an
    entry, and those entries (sorted, once each) are what its reply carries."""
    rng = np.random.default_rng(4)
    parts = []
    for _ in range(3):
        index = np.sort(rng.choice(500, 40, replace=False)).astype(np.int32)
        parts.append(Sparse(index, rng.standard_normal(40).astype(np.float32), 500))
    steps = StepParts(3, chunk_bounds(500, None))
    for rank, part in enumerate(parts):
        steps.add((rank,), part)
    mean = steps.mean(0)
    expected = (dense(parts[0]) + dense(parts[1]) + dense(parts[2])) * np.float32(1 / 3)
    assert np.array_equal(mean, expected)
    assert np.array_equal(steps.index, np.unique(np.concatenate([p.index for p in parts])))
    assert steps.index.dtype == np.int32 and not mean[np.setdiff1d(np.arange(500), steps.index)].any()
    assert np.array_equal(union([np.array([3, 5], np.int32)]), [3, 5])


def test_bytes_on_the_wire():
    grad = np.random.default_rng(1).standard_normal(10_000).astype(np.float32)
    assert sum(p.nbytes for p in Compressor("fp16", grad.size)(grad)) == grad.nbytes // 2
    assert sum(p.nbytes for p in Compressor("topk:0.01", grad.size)(grad)) == grad.nbytes // 50
    for bad in ("topk", "topk:0", "topk:2", "gzip", "fp16:0.5"):
        with pytest.raises(ValueError, match="choose none, fp16 or topk:FRACTION"):
            parse(bad)
    with pytest.raises(ConfigError, match="compress = 'topk:abc'"):
        TrainConfig(compress="topk:abc").validate()


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return prepared_mnist(tmp_path_factory.mktemp("compress-data"), n_train=512, n_test=64, seed=9, shards=2)


def run(data_dir, out, handle=None, **kw):
    base = dict(model="mlp", data=str(data_dir), workers=2, batch_size=32, epochs=1, backend="local", out=str(out),
                log_every=4, seed=3, servers=2, model_options={"hidden": [32]})
    base.update(kw)
    trainer = Trainer(TrainConfig(**base).validate(), backend=handle, log=lambda *a: None, progress=False)
    try:
        summary = trainer.run()
        return summary, trainer.model.flat_params.copy()
    finally:
        trainer.close()


@pytest.mark.parametrize("method", ["fp16", "topk:0.05"])
def test_local_and_ray_bit_identical_with_compression_both_ways(data_dir, tmp_path, ray_backend, method):
    s_local, p_local = run(data_dir, tmp_path / "local", compress=method)
    s_ray, p_ray = run(data_dir, tmp_path / "ray", ray_backend, backend="ray", compress=method)
    s_none, p_none = run(data_dir, tmp_path / "none")
    assert np.array_equal(p_local, p_ray) and not np.array_equal(p_local, p_none)
    sent, dense_bytes = s_local["bytes_per_step"]["gradients_to_servers"], s_none["bytes_per_step"]["gradients_to_servers"]
    assert dense_bytes == 2 * p_none.nbytes                     # two workers' float32 gradients per step
    assert sent == (dense_bytes // 2 if method == "fp16" else pytest.approx(dense_bytes / 10, rel=0.01))
    back = s_local["bytes_per_step"]["parameters_to_workers"]   # the replies are compressed too
    assert s_none["bytes_per_step"]["parameters_to_workers"] == 2 * p_none.nbytes
    if method == "fp16":   # the mean comes back in float32: fp16 halves only what goes up
        assert back == 2 * p_none.nbytes
    else:                  # top-k: the mean where either worker's 5% were, 8 bytes an entry
        assert 2 * p_none.nbytes / 10 <= back <= 2 * p_none.nbytes / 5
    assert s_ray["bytes_per_step"] == s_local["bytes_per_step"]


def test_async_with_topk_converges(tmp_path):
    from distnn.data import prepare_from
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2000, 12)).astype(np.float32)
    np.savez(tmp_path / "rule.npz", x=x, y=(x @ rng.normal(size=(12, 3))).argmax(axis=1))
    prepare_from("npz", tmp_path / "rule.npz", out=tmp_path / "ds", shards=2, progress=False, log=lambda *a: None)
    common = dict(dataset="rule", epochs=3, lr=0.01, warmup=0, model_options={"hidden": [64]}, mode="async",
                  staleness=2)
    plain, _ = run(tmp_path / "ds", tmp_path / "plain", **common)
    sparse, _ = run(tmp_path / "ds", tmp_path / "topk", compress="topk:0.01", **common)
    assert plain["final"]["test_accuracy"] > 0.85
    assert sparse["final"]["test_accuracy"] > plain["final"]["test_accuracy"] - 0.1
    assert sparse["bytes_per_step"]["gradients_to_servers"] * 30 <= plain["bytes_per_step"]["gradients_to_servers"]
    assert json.loads((tmp_path / "topk" / "summary.json").read_text())["compress"] == "topk:0.01"


def test_resume_with_compression_is_bit_identical(data_dir, tmp_path):
    """Each worker's residual is part of the checkpoint: an interrupted run with top-k resumes exactly."""
    from distnn.checkpoint import latest_checkpoint, load_checkpoint
    whole, p_whole = run(data_dir, tmp_path / "a", compress="topk:0.05", epochs=2, checkpoint_every=3)
    stop = lambda trainer, step: trainer.request_stop() if step == 5 else None  # noqa: E731
    base = dict(model="mlp", data=str(data_dir), workers=2, batch_size=32, epochs=2, backend="local",
                out=str(tmp_path / "b"), log_every=4, seed=3, servers=2, model_options={"hidden": [32]},
                compress="topk:0.05", checkpoint_every=3)
    trainer = Trainer(TrainConfig(**base).validate(), log=lambda *a: None, progress=False, on_step=stop)
    with pytest.raises(Exception, match="continue with"):
        trainer.run()
    trainer.close()
    ckpt = load_checkpoint(latest_checkpoint(tmp_path / "b"))
    assert ckpt["worker_states"].shape == (2, p_whole.size) and np.abs(ckpt["worker_states"]).sum() > 0
    resumed = Trainer(TrainConfig(**ckpt["config"]).validate(), log=lambda *a: None, progress=False, resume=ckpt)
    resumed.run()
    resumed.close()
    assert np.array_equal(resumed.model.flat_params, p_whole)


@pytest.mark.parametrize("method", ["fp16", "topk:0.05"])
def test_a_worker_following_the_shards_updates_holds_its_parameters_bit_for_bit(method):
    """Compressed replies: the shard sends the step's mean (sparse where the workers' top-k entries
    were), and a worker applying it with a copy of the shard's optimizer holds the shard's parameters."""
    rng = np.random.default_rng(2)
    p0 = rng.standard_normal(1000).astype(np.float32)
    opt, sched = OptimizerSpec("adam", 0.01, weight_decay=0.1), ScheduleSpec("cosine", 10, 2)
    shard = ParameterServer(p0, opt, sched, world=2, reply_updates=True)
    follower = ParameterServer(p0, opt, sched, world=1)
    workers = [Compressor(method, 1000) for _ in range(2)]
    for step in range(6):
        for rank, w in enumerate(workers):
            [payload] = w(rng.standard_normal(1000).astype(np.float32))
            shard.give(rank, payload, step)
        update = shard.take(step)
        assert isinstance(update, Update) and update.step == step
        follower.contribute(0, update.mean, update.step)
        assert np.array_equal(follower.params, shard.params)
    sent = shard.stats()["reply_bytes"] / 6
    assert sent <= (2 * 50 * 8 if method.startswith("topk") else 4000)

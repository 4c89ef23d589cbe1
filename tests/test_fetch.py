"""Shards that travel (``data.fetch``, ``train.fetching``) in one process: what a worker finds, what it
fetches and where, a corrupt cached copy, two workers of one machine, the locks' deadline, and the
run's own path through the local backend. Between emulated machines: tests/test_testbed.py."""
from __future__ import annotations

import threading
from contextlib import contextmanager

import numpy as np
import pytest

from datagen import prepared_mnist

from distnn.data import DataError, open_dataset
from distnn.data.fetch import LocalShards, ShardSource, Stream, _locked, cache_folder
from distnn.parallel import GradientWorker
from distnn.parallel.specs import DataSpec

SPEC = {"model": "mlp", "num_classes": 10, "hidden": [16]}


@pytest.fixture(scope="module")
def mnist(tmp_path_factory):
    return prepared_mnist(tmp_path_factory.mktemp("fetch"), n_train=256, n_test=64, seed=5, shards=4) / "mnist"


@pytest.fixture(scope="module")
def one_shard(tmp_path_factory):
    """Fewer shards than workers: two workers read parts of the same files."""
    return prepared_mnist(tmp_path_factory.mktemp("fetch1"), n_train=128, n_test=32, seed=6, shards=1) / "mnist"


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DISTNN_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


@contextmanager
def serving(path, cls=ShardSource):
    """A source of the dataset at ``path`` listening on this host: (source, offer)."""
    source = cls(path, open_dataset(path).entries())
    offer = source.open("127.0.0.1", timeout=10)
    try:
        yield source, offer
    finally:
        source.close()


def worker_elsewhere(mnist, tmp_path, rank=0, world=2) -> GradientWorker:
    """A worker on a 'machine' whose run path holds nothing: only the driver's manifest text."""
    manifest = (mnist / "manifest.json").read_text()
    return GradientWorker(SPEC, DataSpec(str(tmp_path / "absent" / "mnist"), 8, manifest=manifest), rank, world)


def test_a_worker_whose_machine_lacks_the_folder_fetches_exactly_its_shards(mnist, tmp_path, cache):
    worker = worker_elsewhere(mnist, tmp_path, rank=1, world=2)
    wanted = worker.missing()
    assert wanted == ["test-00001-of-00004.h5", "test-00003-of-00004.h5", "train-00001-of-00004.h5",
                      "train-00003-of-00004.h5"]
    with serving(mnist) as (source, offer):
        received = worker.fetch(offer, timeout=10)
    assert received == source.served == sum((mnist / f).stat().st_size for f in wanted)
    folder = cache_folder("mnist", (mnist / "manifest.json").read_text())
    assert sorted(p.name for p in folder.glob("*.h5")) == wanted   # not the whole dataset
    for f in wanted:
        assert (folder / f).read_bytes() == (mnist / f).read_bytes()
    assert worker.missing() == []
    assert worker.ready() == len(worker.loader)
    here = GradientWorker(SPEC, DataSpec(str(mnist), 8), 1, 2)   # a worker where the data is
    assert here.ready() == worker.ready()
    np.testing.assert_array_equal(worker.loader.data[0], here.loader.data[0])
    np.testing.assert_array_equal(worker.loader.data[1], here.loader.data[1])


def test_where_the_data_is_nothing_is_copied(mnist, tmp_path, cache):
    worker = GradientWorker(SPEC, DataSpec(str(mnist), 8, manifest=(mnist / "manifest.json").read_text()), 0, 2)
    assert worker.missing() == []
    with serving(mnist) as (source, offer):
        assert worker.fetch(offer, timeout=10) == 0 == source.served
    assert not cache.exists()


def test_a_later_run_reuses_the_cache_and_a_corrupt_copy_is_fetched_again(mnist, tmp_path, cache):
    first = worker_elsewhere(mnist, tmp_path)
    with serving(mnist) as (_, offer):
        first.fetch(offer, timeout=10)
    again = worker_elsewhere(mnist, tmp_path)
    assert again.missing() == []   # found in the cache, checked against the manifest
    folder = cache_folder("mnist", (mnist / "manifest.json").read_text())
    shard = folder / "train-00002-of-00004.h5"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    third = worker_elsewhere(mnist, tmp_path)
    assert third.missing() == ["train-00002-of-00004.h5"]
    with serving(mnist) as (source, offer):
        assert third.fetch(offer, timeout=10) == shard.stat().st_size == source.served
    assert shard.read_bytes() == (mnist / shard.name).read_bytes()


def test_the_workers_of_one_machine_fetch_each_shard_once(one_shard, tmp_path, cache):
    """Two workers whose parts share their files fetch at once: the source serves each file once."""
    mnist = one_shard
    workers = [worker_elsewhere(mnist, tmp_path, rank=r, world=2) for r in range(2)]
    assert workers[0].missing() == workers[1].missing() == ["test-00000-of-00001.h5", "train-00000-of-00001.h5"]
    errors = []

    def fetch(w, offer):
        try:
            w.fetch(offer, timeout=10)
        except Exception as e:   # pragma: no cover - shown by the assertion below
            errors.append(e)
    with serving(mnist) as (source, offer):
        threads = [threading.Thread(target=fetch, args=(w, offer)) for w in workers]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
    assert not errors
    assert source.served == sum(f.stat().st_size for f in mnist.glob("*.h5"))
    assert all(w.ready() for w in workers)


def test_a_source_serves_only_copies_that_match_the_manifest(mnist, tmp_path):
    entries = open_dataset(mnist).entries()
    entries = {f: {**e, "sha256": "0" * 64} if f.startswith("test") else e for f, e in entries.items()}
    source = ShardSource(mnist, entries)
    offer = source.open("127.0.0.1", timeout=10)
    try:
        with pytest.raises(DataError, match="test-00000-of-00004.h5: checksum differs from the manifest on the "
                                            "machine that serves it too"):
            Stream(offer, 10).file("test-00000-of-00004.h5")   # the source's reason, at the worker
        with pytest.raises(DataError, match="'../x.h5' is not a shard"):
            Stream(offer, 10).file("../x.h5")
        wrong = Stream(offer[:2] + (b"x" * 16,), 10)
        with pytest.raises(ConnectionError):   # a wrong secret: closed without a byte
            wrong.file("train-00000-of-00004.h5")
        size, blocks = Stream(offer, 10).file("train-00000-of-00004.h5")
        assert b"".join(bytes(b) for b in blocks) == (mnist / "train-00000-of-00004.h5").read_bytes()
        assert size == source.served
    finally:
        source.close()


def test_a_fetch_that_arrives_wrong_leaves_nothing_in_the_cache(mnist, tmp_path, cache):
    class Garbled(ShardSource):   # a file changed on the serving machine after its check
        def _send_file(self, conn, path, size):
            conn.sendall(b"\0" * size)
    worker = worker_elsewhere(mnist, tmp_path)
    with serving(mnist, Garbled) as (_, offer):
        with pytest.raises(DataError, match="does not match the manifest's checksum"):
            worker.fetch(offer, timeout=10)
    folder = cache_folder("mnist", (mnist / "manifest.json").read_text())
    assert not list(folder.glob("*.h5")) and not list(folder.glob(".*.tmp-*"))
    with pytest.raises(DataError, match="missing on worker 0's machine"):
        worker.ready()


def test_a_lock_held_too_long_ends_the_wait_with_its_path(tmp_path):
    with _locked(tmp_path / ".f.lock", 1.0):
        with pytest.raises(DataError, match=r"\.f\.lock: held by another process for over 0.2 s"):
            with _locked(tmp_path / ".f.lock", 0.2):
                pass


def test_local_shards_name_their_cache_by_the_manifest(mnist, tmp_path, cache):
    dataset = open_dataset(mnist)
    shards = LocalShards(dataset, ["train-00000-of-00004.h5"])
    assert shards.cache.parent == cache / "datasets" and shards.cache.name.startswith("mnist-")
    other = open_dataset(mnist, manifest=dataset.manifest_text.replace('"mnist"', '"mnist2"', 1))
    assert LocalShards(other, []).cache != shards.cache


@pytest.mark.parametrize("fetch", [True, False])
def test_a_shard_missing_everywhere_stops_the_run_with_one_line(one_shard, tmp_path, cache, fetch):
    """The local backend's driver and worker share one machine: a shard missing there cannot be fetched,
    and the run says which file on which machine, and (with --no-fetch-data) what to do."""
    import shutil
    from distnn.config import TrainConfig
    from distnn.train import TrainingError, train
    data = tmp_path / "mnist"
    shutil.copytree(one_shard, data)
    (data / "train-00000-of-00001.h5").unlink()
    config = TrainConfig(model="mlp", dataset=str(data), backend="local", workers=1, epochs=1, batch_size=16,
                         fetch_data=fetch, out=str(tmp_path / "run")).validate()
    with pytest.raises(TrainingError) as e:
        train(config, progress=False)
    if fetch:
        assert "fetching shards failed" in str(e.value) and "missing on the machine that serves it too" in str(e.value)
    else:
        assert f"{data}: this process lacks train-00000-of-00001.h5" in str(e.value)
        assert "--no-fetch-data is set" in str(e.value)


def test_a_source_that_goes_silent_ends_the_wait_at_the_deadline():
    import socket
    import time
    with socket.create_server(("127.0.0.1", 0)) as silent:   # accepts (the kernel's backlog), never answers
        offer = ("127.0.0.1", silent.getsockname()[1], b"s" * 16)
        start = time.monotonic()
        with pytest.raises(TimeoutError):
            Stream(offer, 0.3).file("train-00000-of-00004.h5")
        assert time.monotonic() - start < 5

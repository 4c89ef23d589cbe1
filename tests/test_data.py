"""Preparation and reading of HDF5 shards, on generated files in the real formats."""
import gzip
import json
import os
import pickle
import signal
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from datagen import idx_bytes, make_cifar100, make_mnist, write_cifar_tar
from runs import QUIET
from distnn.cli import main as cli
from distnn.data import DataError, Loader, augment, open_dataset, prepare
from distnn.data.writer import channel_stats

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def mnist_src(tmp_path):
    arrays, source = make_mnist(tmp_path / "raw")
    return tmp_path / "raw", arrays, {"mnist": source}


@pytest.fixture
def cifar_src(tmp_path):
    arrays, source, members = make_cifar100(tmp_path / "raw")
    return tmp_path / "raw", arrays, {"cifar100": source}


def prep(name, src, sources, out, **kw):
    return prepare(name, out=out, source=src, sources=sources, **QUIET, **kw)


def test_mnist_round_trip(tmp_path, mnist_src):
    src, arrays, sources = mnist_src
    path = prep("mnist", src, sources, tmp_path / "ds", shards=3)
    ds = open_dataset(path)
    assert ds.count("train") == 300 and ds.count("test") == 60
    for split, prefix in (("train", "train"), ("test", "t10k")):
        x, y = ds.read(split, ds.part(split, 0, 1))
        assert x.shape == (len(y), 1, 28, 28) and x.dtype == np.uint8
        np.testing.assert_array_equal(x[:, 0], arrays[f"{prefix}-images-idx3-ubyte"])
        np.testing.assert_array_equal(y, arrays[f"{prefix}-labels-idx1-ubyte"])
    mean, std = channel_stats(arrays["train-images-idx3-ubyte"][:, None])
    np.testing.assert_allclose(ds.manifest["mean"], mean)
    np.testing.assert_allclose(ds.manifest["std"], std)
    assert len(list(path.glob("train-*-of-00003.h5"))) == 3
    with h5py.File(path / "train-00000-of-00003.h5") as f:  # plain h5py reads it
        assert f["images"].chunks[1:] == (1, 28, 28)


def test_mnist_uncompressed_idx_accepted(tmp_path):
    arrays, source = make_mnist(tmp_path / "raw", gz=False)
    path = prep("mnist", tmp_path / "raw", {"mnist": source}, tmp_path / "ds", shards=2)
    x, y = open_dataset(path).read("test", open_dataset(path).part("test", 0, 1))
    np.testing.assert_array_equal(x[:, 0], arrays["t10k-images-idx3-ubyte"])


def test_cifar_round_trip_channel_order(tmp_path, cifar_src):
    src, arrays, sources = cifar_src
    path = prep("cifar100", src, sources, tmp_path / "ds", shards=2)
    ds = open_dataset(path)
    for split in ("train", "test"):
        images, fine, coarse = arrays[split]
        x, y_fine = ds.read(split, ds.part(split, 0, 1), "fine")
        _, y_coarse = ds.read(split, ds.part(split, 0, 1), "coarse")
        np.testing.assert_array_equal(x, images)
        np.testing.assert_array_equal(y_fine, fine)
        np.testing.assert_array_equal(y_coarse, coarse)
    # pixel (0, 0) of image 0: red is the first byte of the row, green the 1025th, blue the 2049th
    row = arrays["train"][0][0].reshape(3072)
    x, _ = ds.read("train", ds.part("train", 0, 1))
    assert (x[0, 0, 0, 0], x[0, 1, 0, 0], x[0, 2, 0, 0]) == (row[0], row[1024], row[2048])
    assert ds.manifest["label_fields"]["fine_labels"]["names"][:2] == ["fine_0", "fine_1"]
    assert ds.manifest["label_fields"]["coarse_labels"]["num_classes"] == 20
    assert ds.num_classes("coarse") == 20 and ds.num_classes("fine") == 100


def test_cifar_extracted_folder(tmp_path, cifar_src):
    src, arrays, sources = cifar_src
    import tarfile
    with tarfile.open(src / "cifar-100-python.tar.gz") as tar:
        tar.extractall(tmp_path / "extracted", filter="data")
    path = prep("cifar100", tmp_path / "extracted", sources, tmp_path / "ds", shards=1)
    x, _ = open_dataset(path).read("test", open_dataset(path).part("test", 0, 1))
    np.testing.assert_array_equal(x, arrays["test"][0])


@pytest.mark.parametrize("world", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("shards", [1, 2, 3, 5, 8])
def test_every_example_once_per_epoch(tmp_path_factory, world, shards):
    tmp = tmp_path_factory.mktemp(f"w{world}s{shards}")
    arrays, source = make_mnist(tmp / "raw", n_train=97, n_test=10)
    path = prep("mnist", tmp / "raw", {"mnist": source}, tmp / "ds", shards=shards)
    ds = open_dataset(path)
    # label each image by its content so that every row can be told apart
    seen = []
    for rank in range(world):
        loader = Loader(ds, "train", rank, world, batch_size=8, seed=3, prefetch=rank % 2 == 0)
        x_raw, _ = loader.data
        for epoch in range(2):
            rows = [ds.read("train", ds.part("train", rank, world))[0][i] for i in loader.order(epoch)]
            batches = list(loader.epoch(epoch))
            assert sum(len(b[1]) for b in batches) == loader.size
            if epoch == 0:
                seen.extend(r.tobytes() for r in rows)
    all_rows = [r.tobytes() for r in arrays["train-images-idx3-ubyte"]]
    assert sorted(seen) == sorted(all_rows)


def test_shuffle_deterministic_and_new_each_epoch(tmp_path, mnist_src):
    src, arrays, sources = mnist_src
    ds = open_dataset(prep("mnist", src, sources, tmp_path / "ds", shards=2))
    a = Loader(ds, "train", 0, 2, batch_size=16, seed=7)
    b = Loader(ds, "train", 0, 2, batch_size=16, seed=7)
    for (xa, ya), (xb, yb) in zip(a.epoch(0), b.epoch(0)):
        np.testing.assert_array_equal(xa, xb)
        np.testing.assert_array_equal(ya, yb)
    assert not np.array_equal(a.order(0), a.order(1))
    assert not np.array_equal(a.order(0), Loader(ds, "train", 0, 2, batch_size=16, seed=8).order(0))
    # resuming mid-epoch gives the same batches as the uninterrupted epoch
    full = list(a.epoch(1))
    resumed = list(a.epoch(1, start=3))
    for (x1, y1), (x2, y2) in zip(full[3:], resumed):
        np.testing.assert_array_equal(x1, x2)


def test_normalisation_and_last_batch(tmp_path, mnist_src):
    src, arrays, sources = mnist_src
    ds = open_dataset(prep("mnist", src, sources, tmp_path / "ds", shards=1))
    loader = Loader(ds, "test", batch_size=25, shuffle=False)
    batches = list(loader)
    assert [len(y) for _, y in batches] == [25, 25, 10]
    assert len(Loader(ds, "test", batch_size=25, drop_last=True)) == 2
    x = np.concatenate([b[0] for b in batches])
    assert x.dtype == np.float32
    expected = (arrays["t10k-images-idx3-ubyte"][:, None].astype(np.float64) - ds.manifest["mean"][0]) / ds.manifest["std"][0]
    np.testing.assert_allclose(x, expected, rtol=1e-5, atol=1e-5)


def test_augmentation_is_crop_and_flip(tmp_path, cifar_src):
    src, arrays, sources = cifar_src
    ds = open_dataset(prep("cifar100", src, sources, tmp_path / "ds", shards=2))
    train = Loader(ds, "train", batch_size=40, seed=1, prefetch=False)
    test = Loader(ds, "test", batch_size=40, prefetch=False)
    assert train.augment and not test.augment
    x = arrays["train"][0][:50]
    out = augment(x, np.random.default_rng(0), pad=4)
    assert out.shape == x.shape and out.dtype == np.uint8
    # each output image is a shifted (and maybe mirrored) window of its zero-padded source
    padded = np.pad(x, ((0, 0), (0, 0), (4, 4), (4, 4)))
    for i in range(len(x)):
        found = any(np.array_equal(cand, out[i]) for dy in range(9) for dx in range(9)
                    for cand in (padded[i, :, dy:dy + 32, dx:dx + 32], padded[i, :, dy:dy + 32, dx:dx + 32][..., ::-1]))
        assert found
    assert not np.array_equal(out, x)


def test_loader_pickles_without_data(tmp_path, mnist_src):
    src, arrays, sources = mnist_src
    ds = open_dataset(prep("mnist", src, sources, tmp_path / "ds", shards=2))
    loader = Loader(ds, "train", 1, 2, batch_size=32)
    _ = loader.data
    clone = pickle.loads(pickle.dumps(loader))
    assert clone._data is None
    np.testing.assert_array_equal(next(iter(clone.epoch(0)))[0], next(iter(loader.epoch(0)))[0])


# -- idempotence and atomicity --------------------------------------------------------------------

def test_rerun_does_nothing_and_force_rebuilds(tmp_path, mnist_src):
    src, arrays, sources = mnist_src
    path = prep("mnist", src, sources, tmp_path / "ds", shards=2)
    stamp = (path / "manifest.json").stat().st_mtime_ns
    said = []
    prepare("mnist", out=tmp_path / "ds", source=src, sources=sources, shards=2, progress=False, log=said.append)
    assert "already prepared" in said[0]
    assert (path / "manifest.json").stat().st_mtime_ns == stamp
    prep("mnist", src, sources, tmp_path / "ds", shards=2, force=True)
    assert (path / "manifest.json").stat().st_mtime_ns != stamp
    prep("mnist", src, sources, tmp_path / "ds", shards=4)  # a different shard count rebuilds
    assert len(open_dataset(path).split("train")["shards"]) == 4
    assert sorted(p.name for p in (tmp_path / "ds").iterdir()) == ["mnist"]  # no temporary leftovers


def test_failed_run_keeps_previous_dataset(tmp_path, mnist_src):
    src, arrays, sources = mnist_src
    path = prep("mnist", src, sources, tmp_path / "ds", shards=2)
    before = (path / "manifest.json").read_text()
    (src / "t10k-labels-idx1-ubyte.gz").write_bytes(b"garbage")
    with pytest.raises(DataError):
        prep("mnist", src, sources, tmp_path / "ds", shards=2, force=True)
    assert (path / "manifest.json").read_text() == before
    assert sorted(p.name for p in (tmp_path / "ds").iterdir()) == ["mnist"]


def test_killed_run_leaves_no_half_dataset(tmp_path):
    """SIGKILL a preparation mid-write: no dataset folder appears; the next run cleans up and works."""
    arrays, source = make_mnist(tmp_path / "raw", n_train=20000, n_test=100)
    code = f"""
import sys, time, pickle
sys.path.insert(0, {str(ROOT)!r})
import distnn.data
p = sys.modules["distnn.data.prepare"]
w = sys.modules["distnn.data.writer"]
real = w._write_shard
def slow(*a, **k):
    real(*a, **k)
    print("shard", flush=True)
    time.sleep(0.3)
w._write_shard = slow
src = pickle.loads({pickle.dumps({'mnist': source})!r})
p.prepare("mnist", out={str(tmp_path / 'ds')!r}, source={str(tmp_path / 'raw')!r}, sources=src, shards=8, progress=False)
"""
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    for _ in range(3):
        assert proc.stdout.readline().startswith("shard")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "ds" / "mnist").exists()
    prep("mnist", tmp_path / "raw", {"mnist": source}, tmp_path / "ds", shards=2)
    assert sorted(p.name for p in (tmp_path / "ds").iterdir()) == ["mnist"]


# -- downloads ------------------------------------------------------------------------------------

def test_download_from_second_mirror_with_resume(tmp_path, http_server):
    www, url = http_server
    arrays, source = make_mnist(www / "good")
    source.mirrors = [url + "missing/", url + "good/"]
    # a partial download of one file is resumed, not restarted
    cache = tmp_path / "ds" / ".downloads" / "mnist"
    cache.mkdir(parents=True)
    whole = (www / "good" / "train-images-idx3-ubyte.gz").read_bytes()
    (cache / "train-images-idx3-ubyte.gz.part").write_bytes(whole[:1000])
    path = prepare("mnist", out=tmp_path / "ds", sources={"mnist": source}, shards=2, **QUIET)
    x, _ = open_dataset(path).read("train", open_dataset(path).part("train", 0, 1))
    np.testing.assert_array_equal(x[:, 0], arrays["train-images-idx3-ubyte"])
    assert (cache / "train-images-idx3-ubyte.gz").read_bytes() == whole


def test_download_checksum_mismatch(tmp_path, http_server):
    www, url = http_server
    arrays, source = make_mnist(www)
    source.mirrors = [url]
    source.files[0].sha256, source.files[0].md5 = "0" * 64, "0" * 32
    with pytest.raises(DataError, match="checksum mismatch"):
        prepare("mnist", out=tmp_path / "ds", sources={"mnist": source}, shards=2, **QUIET)
    assert not (tmp_path / "ds" / "mnist").exists()


def test_download_no_mirror_reachable(tmp_path, http_server):
    www, url = http_server
    arrays, source = make_mnist(tmp_path / "elsewhere")
    source.mirrors = [url]
    with pytest.raises(DataError, match="could not download train-images-idx3-ubyte.gz from any mirror"):
        prepare("mnist", out=tmp_path / "ds", sources={"mnist": source}, shards=2, **QUIET)


# -- bad input ------------------------------------------------------------------------------------

def _mnist_error(tmp_path, mnist_src, damage, match):
    src, arrays, sources = mnist_src
    damage(src, sources["mnist"])
    with pytest.raises(DataError, match=match) as info:
        prep("mnist", src, sources, tmp_path / "ds", shards=2)
    assert "\n" not in str(info.value)
    assert not (tmp_path / "ds" / "mnist").exists()
    assert not list((tmp_path / "ds").glob(".mnist.tmp-*")) if (tmp_path / "ds").exists() else True
    return str(info.value)


def test_missing_file(tmp_path, mnist_src):
    msg = _mnist_error(tmp_path, mnist_src, lambda s, src: (s / "t10k-images-idx3-ubyte.gz").unlink(), "not found")
    assert "t10k-images-idx3-ubyte.gz" in msg


def test_truncated_gz(tmp_path, mnist_src):
    def damage(s, src):
        p = s / "train-images-idx3-ubyte.gz"
        p.write_bytes(p.read_bytes()[:500])
    msg = _mnist_error(tmp_path, mnist_src, damage, "truncated or corrupt gzip")
    assert "train-images-idx3-ubyte.gz" in msg


def _rewrite(path, content, src, name):
    raw = gzip.compress(content)
    path.write_bytes(raw)
    import hashlib
    for f in src.files:
        if f.name == name:
            f.sha256, f.md5 = hashlib.sha256(content).hexdigest(), hashlib.md5(raw).hexdigest()


def test_wrong_idx_magic(tmp_path, mnist_src):
    def damage(s, src):
        p = s / "train-labels-idx1-ubyte.gz"
        content = bytearray(gzip.decompress(p.read_bytes()))
        content[2] = 0x42
        _rewrite(p, bytes(content), src, p.name)
    _mnist_error(tmp_path, mnist_src, damage, "unknown IDX data type")

    def swap(s, src):
        p = s / "train-labels-idx1-ubyte.gz"
        _rewrite(p, idx_bytes(np.zeros((300, 28, 28), np.uint8)), src, p.name)
    _mnist_error(tmp_path, mnist_src, swap, "expected an IDX file of 1 dimensions")


def test_counts_disagree(tmp_path, mnist_src):
    def damage(s, src):
        p = s / "train-labels-idx1-ubyte.gz"
        _rewrite(p, idx_bytes(np.zeros(299, np.uint8)), src, p.name)
    _mnist_error(tmp_path, mnist_src, damage, "299 labels for 300 images")


def test_label_out_of_range(tmp_path, mnist_src):
    def damage(s, src):
        p = s / "t10k-labels-idx1-ubyte.gz"
        y = np.zeros(60, np.uint8)
        y[7] = 12
        _rewrite(p, idx_bytes(y), src, p.name)
    _mnist_error(tmp_path, mnist_src, damage, "label 12 out of range")


def test_source_checksum_mismatch(tmp_path, mnist_src):
    def damage(s, src):
        p = s / "t10k-images-idx3-ubyte.gz"
        content = bytearray(gzip.decompress(p.read_bytes()))
        content[-1] ^= 0xFF
        p.write_bytes(gzip.compress(bytes(content)))
    _mnist_error(tmp_path, mnist_src, damage, "checksum mismatch")


def test_recompressed_file_accepted_by_content(tmp_path, mnist_src):
    src, arrays, sources = mnist_src
    p = src / "train-labels-idx1-ubyte.gz"
    p.write_bytes(gzip.compress(gzip.decompress(p.read_bytes()), compresslevel=1, mtime=12345))
    prep("mnist", src, sources, tmp_path / "ds", shards=1)


def test_malicious_pickle_refused(tmp_path, cifar_src):
    src, arrays, sources = cifar_src
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    import hashlib
    import tarfile
    members = {}
    with tarfile.open(src / "cifar-100-python.tar.gz") as tar:
        for m in ("train", "test", "meta"):
            members[m] = tar.extractfile(f"cifar-100-python/{m}").read()
    members["meta"] = pickle.dumps({b"fine_label_names": Evil()})
    raw = write_cifar_tar(src / "cifar-100-python.tar.gz", members)
    source = sources["cifar100"]
    source.files[0].md5 = hashlib.md5(raw).hexdigest()
    source.members["meta"] = hashlib.md5(members["meta"]).hexdigest()
    with pytest.raises(DataError, match="refused to unpickle"):
        prep("cifar100", src, sources, tmp_path / "ds")
    assert not marker.exists()
    assert not (tmp_path / "ds" / "cifar100").exists()


def test_truncated_cifar_archive(tmp_path, cifar_src):
    src, arrays, sources = cifar_src
    p = src / "cifar-100-python.tar.gz"
    p.write_bytes(p.read_bytes()[:5000])
    with pytest.raises(DataError, match="checksum mismatch|truncated or corrupt"):
        prep("cifar100", src, sources, tmp_path / "ds")


def test_corrupted_and_truncated_shard(tmp_path, mnist_src):
    src, arrays, sources = mnist_src
    path = prep("mnist", src, sources, tmp_path / "ds", shards=2)
    shard = path / "train-00001-of-00002.h5"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    ds = open_dataset(path)
    with pytest.raises(DataError, match="train-00001-of-00002.h5: checksum differs"):
        Loader(ds, "train", 1, 2).data
    Loader(ds, "train", 0, 2).data  # the other worker's shard is fine
    with pytest.raises(DataError, match="unreadable HDF5 shard"):
        open_dataset(path, verify=False).read("train", ds.part("train", 1, 2))


def test_manifest_disagrees_with_shards(tmp_path, mnist_src):
    src, arrays, sources = mnist_src
    path = prep("mnist", src, sources, tmp_path / "ds", shards=2)
    m = json.loads((path / "manifest.json").read_text())
    m["splits"]["test"]["shards"][0]["count"] += 1
    (path / "manifest.json").write_text(json.dumps(m))
    ds = open_dataset(path, verify=False)
    with pytest.raises(DataError, match="the manifest says 31"):
        ds.read("test", ds.part("test", 0, 1))


def test_not_prepared_names_the_command(tmp_path):
    with pytest.raises(DataError, match="scripts/prepare_data.py mnist"):
        open_dataset(tmp_path / "mnist")


def test_cli_prepare_one_line_error(tmp_path, capsys):
    code = cli(["prepare", "mnist", "--source", str(tmp_path / "nowhere"), "--out", str(tmp_path / "ds"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1 and "nowhere" in err


def test_prepare_script_runs(tmp_path):
    """The script the README names, end to end on generated files (the real checksums reject them)."""
    make_mnist(tmp_path / "raw")
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "prepare_data.py"), "mnist", "--source",
                           str(tmp_path / "raw"), "--out", str(tmp_path / "ds"), "--quiet"],
                          capture_output=True, text=True)
    assert proc.returncode == 1
    assert "checksum mismatch" in proc.stderr and "Traceback" not in proc.stderr


def test_crop_only_augmentation_never_mirrors(tmp_path, mnist_src):
    src, arrays, sources = mnist_src
    ds = open_dataset(prep("mnist", src, sources, tmp_path / "ds", shards=1))
    plain = Loader(ds, "train", batch_size=300, shuffle=False, prefetch=False)
    assert plain.augment is None  # MNIST: off by default
    loader = Loader(ds, "train", batch_size=300, shuffle=False, prefetch=False, augment="crop", pad=2)
    x = arrays["train-images-idx3-ubyte"][:, None]
    out = augment(x, np.random.default_rng(0), pad=2, flip=False)
    padded = np.pad(x, ((0, 0), (0, 0), (2, 2), (2, 2)))
    for i in range(50):
        assert any(np.array_equal(padded[i, :, dy:dy + 28, dx:dx + 28], out[i]) for dy in range(5) for dx in range(5))
    assert next(iter(loader.epoch(0)))[0].shape == (300, 1, 28, 28)
    with pytest.raises(ValueError, match="augment must be"):
        Loader(ds, "train", augment="rotate")

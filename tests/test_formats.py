"""A user's data: IDX sets, .npz arrays, folders of images and HDF5 files become datasets that round-trip
value for value; named IDX sources verify their checksums; bad input gets one line and writes nothing."""
import gzip
import hashlib

import h5py
import numpy as np
import pytest
from PIL import Image

from datagen import idx_bytes
from runs import QUIET
from distnn.cli import main as cli
from distnn.data import DataError, Loader, RawFile, Source, open_dataset, prepare, prepare_from


def read_all(folder, split):
    ds = open_dataset(folder)
    return ds.read(split, ds.part(split, 0, 1))


@pytest.fixture
def rng():
    return np.random.default_rng(7)


def test_idx_set_any_shape_round_trips(tmp_path, rng):
    src = tmp_path / "raw"
    src.mkdir()
    x, y = rng.integers(0, 256, (50, 20, 24), dtype=np.uint8), rng.integers(0, 4, 50).astype(np.uint8)
    xt, yt = rng.integers(0, 256, (10, 20, 24), dtype=np.uint8), rng.integers(0, 4, 10).astype(np.uint8)
    for name, a in (("train-images-idx3-ubyte.gz", x), ("train-labels-idx1-ubyte.gz", y),
                    ("test-images-idx3-ubyte.gz", xt), ("test-labels-idx1-ubyte.gz", yt)):
        (src / name).write_bytes(gzip.compress(idx_bytes(a)))
    out = prepare_from("idx", src, "letters", out=tmp_path / "ds", shards=3, **QUIET)
    gx, gy = read_all(out, "train")
    assert np.array_equal(gx, x[:, None]) and np.array_equal(gy, y)
    tx, ty = read_all(out, "test")
    assert np.array_equal(tx, xt[:, None]) and np.array_equal(ty, yt)
    ds = open_dataset(out)
    assert ds.input_shape == (1, 20, 24) and ds.num_classes() == 4


@pytest.mark.parametrize("layout", ["nhw", "nhwc", "nchw"])
def test_npz_images_round_trip_in_every_layout(tmp_path, rng, layout):
    images = rng.integers(0, 256, (40, 3, 8, 6), dtype=np.uint8)            # (N, C, H, W)
    given = {"nhw": images[:, 0], "nhwc": images.transpose(0, 2, 3, 1), "nchw": images}[layout]
    labels = rng.integers(0, 5, 40)
    np.savez(tmp_path / "d.npz", x=given[:30], y=labels[:30], x_test=given[30:], y_test=labels[30:])
    out = prepare_from("npz", tmp_path / "d.npz", out=tmp_path / "ds", shards=2, **QUIET)
    expect = images[:, :1] if layout == "nhw" else images
    gx, gy = read_all(out, "train")
    tx, ty = read_all(out, "test")
    assert np.array_equal(gx, expect[:30]) and np.array_equal(tx, expect[30:])
    assert np.array_equal(gy, labels[:30]) and np.array_equal(ty, labels[30:])


def test_npz_features_normalised_per_feature_and_test_file(tmp_path, rng):
    x = (rng.normal(size=(60, 5)) * [1, 10, 100, 0.1, 0] + [0, 5, -50, 2, 3]).astype(np.float32)
    y = np.array(["cat", "dog", "eel"])[rng.integers(0, 3, 60)]
    np.savez(tmp_path / "train.npz", x=x[:50], y=y[:50])
    np.savez(tmp_path / "test.npz", x=x[50:], y=y[50:])
    out = prepare_from("npz", tmp_path / "train.npz", "tab", test=tmp_path / "test.npz", out=tmp_path / "ds",
                       shards=2, **QUIET)
    ds = open_dataset(out)
    assert ds.kind == "features" and ds.input_shape == (5,) and ds.class_names() == ["cat", "dog", "eel"]
    gx, gy = read_all(out, "train")
    assert np.array_equal(gx, x[:50]) and [ds.class_names()[i] for i in gy] == y[:50].tolist()
    batch, _ = next(iter(Loader(ds, "train", batch_size=50, shuffle=False)))
    assert np.allclose(batch[:, :4].mean(axis=0), 0, atol=1e-5) and np.allclose(batch[:, :4].std(axis=0), 1, atol=1e-4)
    assert np.allclose(batch[:, 4], 0)        # a constant feature is centred, not divided by zero
    with pytest.raises(ValueError, match="augment 'crop' applies to images"):
        Loader(ds, "train", augment="crop")


def test_held_out_test_fraction_is_seeded_and_disjoint(tmp_path, rng):
    x = np.arange(100, dtype=np.float32)[:, None] * np.ones((1, 3), np.float32)
    np.savez(tmp_path / "a.npz", x=x, y=np.arange(100) % 2)
    out = prepare_from("npz", tmp_path / "a.npz", out=tmp_path / "ds", test_fraction=0.2, seed=3, shards=1, **QUIET)
    train, test = read_all(out, "train")[0][:, 0], read_all(out, "test")[0][:, 0]
    assert len(test) == 20 and len(train) == 80 and sorted(np.concatenate([train, test])) == list(range(100))
    again = prepare_from("npz", tmp_path / "a.npz", "b", out=tmp_path / "ds", test_fraction=0.2, seed=3, shards=1,
                         **QUIET)
    assert np.array_equal(read_all(again, "test")[0][:, 0], test)


def make_folder(root, classes, size=(6, 5), mode="RGB", rng=None, per_class=4, fmt="png"):
    rng = rng or np.random.default_rng(0)
    arrays = {}
    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            shape = (size[0], size[1], 3) if mode == "RGB" else size
            a = rng.integers(0, 256, shape, dtype=np.uint8)
            Image.fromarray(a, mode).save(root / c / f"{i}.{fmt}")
            arrays[c, i] = a
    return arrays


def test_image_folder_png_pixel_exact_and_jpeg_as_decoded(tmp_path):
    arrays = make_folder(tmp_path / "pics" / "train", ["bird", "cat"])
    make_folder(tmp_path / "pics" / "test", ["bird", "cat"], per_class=2, rng=np.random.default_rng(1))
    out = prepare_from("folder", tmp_path / "pics", out=tmp_path / "ds", shards=1, **QUIET)
    ds = open_dataset(out)
    assert ds.class_names() == ["bird", "cat"] and ds.input_shape == (3, 6, 5)
    gx, gy = read_all(out, "train")
    expect = np.stack([arrays[c, i] for c in ("bird", "cat") for i in range(4)]).transpose(0, 3, 1, 2)
    assert np.array_equal(gx, expect) and gy.tolist() == [0] * 4 + [1] * 4
    assert read_all(out, "test")[0].shape == (4, 3, 6, 5)
    make_folder(tmp_path / "jpg", ["a", "b"], mode="L", fmt="jpg", per_class=5)
    out = prepare_from("folder", tmp_path / "jpg", out=tmp_path / "ds", test_fraction=0.2, shards=1, **QUIET)
    decoded = {np.asarray(Image.open(p)).tobytes() for p in sorted((tmp_path / "jpg").rglob("*.jpg"))}
    got = np.concatenate([read_all(out, "train")[0], read_all(out, "test")[0]])
    assert got.shape == (10, 1, 6, 5) and {g[0].tobytes() for g in got} == decoded


def test_image_folder_resized_with_size(tmp_path):
    make_folder(tmp_path / "p", ["a"], size=(6, 5), per_class=3)
    make_folder(tmp_path / "p", ["b"], size=(9, 7), per_class=3)
    out = prepare_from("folder", tmp_path / "p", out=tmp_path / "ds", size=(8, 8), test_fraction=0.3, shards=1,
                       **QUIET)
    assert open_dataset(out).input_shape == (3, 8, 8)


def test_hdf5_datasets_by_path(tmp_path, rng):
    x = rng.integers(0, 256, (30, 1, 4, 4), dtype=np.uint8)
    y = rng.integers(0, 3, 30)
    with h5py.File(tmp_path / "d.h5", "w") as f:
        f["data/train/x"], f["data/train/y"] = x[:24], y[:24]
        f["data/test/x"], f["data/test/y"] = x[24:], y[24:]
    assert cli(["prepare", "hdf5", "--source", str(tmp_path / "d.h5"), "--name", "h", "--out", str(tmp_path / "ds"),
                "--x", "data/train/x", "--y", "data/train/y", "--x-test", "data/test/x", "--y-test", "data/test/y",
                "--quiet", "--shards", "2"]) == 0
    gx, gy = read_all(tmp_path / "ds" / "h", "train")
    assert np.array_equal(gx, x[:24]) and np.array_equal(gy, y[:24])
    assert np.array_equal(read_all(tmp_path / "ds" / "h", "test")[0], x[24:])


@pytest.mark.parametrize("name", ["fashion_mnist", "kmnist"])
def test_named_idx_sources_verify_their_checksums(tmp_path, rng, name):
    src = tmp_path / "raw"
    src.mkdir()
    files = []
    for stem, a in (("train-images-idx3-ubyte", rng.integers(0, 256, (20, 28, 28), dtype=np.uint8)),
                    ("train-labels-idx1-ubyte", rng.integers(0, 10, 20).astype(np.uint8)),
                    ("t10k-images-idx3-ubyte", rng.integers(0, 256, (5, 28, 28), dtype=np.uint8)),
                    ("t10k-labels-idx1-ubyte", rng.integers(0, 10, 5).astype(np.uint8))):
        raw = gzip.compress(idx_bytes(a))
        (src / f"{stem}.gz").write_bytes(raw)
        files.append(RawFile(f"{stem}.gz", None, hashlib.md5(raw).hexdigest()))
    with pytest.raises(DataError, match="checksum mismatch"):   # not the published files
        prepare(name, out=tmp_path / "ds", source=src, **QUIET)
    from distnn.data.sources import SOURCES
    real = SOURCES[name]
    ok = Source(name, files, [], classes=real.classes)
    out = prepare(name, out=tmp_path / "ds", source=src, sources={name: ok}, shards=1, **QUIET)
    assert open_dataset(out).class_names() == real.classes
    assert len(real.files) == 4 and all(f.md5 and len(f.md5) == 32 for f in real.files) and real.mirrors


# -- bad input: one line, nothing written ------------------------------------------------------------

def bad_npz(tmp_path, **arrays):
    np.savez(tmp_path / "bad.npz", **arrays)
    return tmp_path / "bad.npz"


@pytest.mark.parametrize("case, message", [
    ("lengths", "30 examples but 29 labels"),
    ("float_labels", "labels must be integers 0..K-1 or strings"),
    ("negative", "labels must be integers 0..K-1, got -1"),
    ("nan", "2 NaN or infinite values (the first in row 3)"),
    ("float_images", "images must be uint8"),
    ("ambiguous", "cannot tell the channel axis"),
    ("missing", "no array 'y'"),
])
def test_bad_arrays_named_and_nothing_written(tmp_path, rng, case, message, capsys):
    x = rng.normal(size=(30, 4)).astype(np.float32)
    y = rng.integers(0, 3, 30)
    arrays = {"lengths": dict(x=x, y=y[:29]), "float_labels": dict(x=x, y=y + 0.5),
              "negative": dict(x=x, y=y - 1), "float_images": dict(x=rng.normal(size=(30, 8, 8)), y=y),
              "ambiguous": dict(x=rng.integers(0, 256, (30, 3, 8, 3), dtype=np.uint8), y=y),
              "missing": dict(x=x)}
    if case == "nan":
        x[3, 1] = np.nan
        x[7, 0] = np.inf
        arrays["nan"] = dict(x=x, y=y)
    path = bad_npz(tmp_path, **arrays[case])
    assert cli(["prepare", "npz", "--source", str(path), "--out", str(tmp_path / "ds"), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and str(path) in err
    assert not (tmp_path / "ds").exists() or not any((tmp_path / "ds").iterdir())


def test_bad_image_folders(tmp_path, capsys):
    make_folder(tmp_path / "mixed", ["a"], size=(6, 5), per_class=2)
    make_folder(tmp_path / "mixed", ["b"], size=(7, 5), per_class=2)
    make_folder(tmp_path / "empty", ["a"], per_class=2)
    (tmp_path / "empty" / "b").mkdir()
    make_folder(tmp_path / "broken", ["a", "b"], per_class=2)
    (tmp_path / "broken" / "b" / "9.png").write_bytes(b"not an image at all")
    for folder, message in (("mixed", "pass --size HxW"), ("empty", "no images"), ("broken", "not a readable image")):
        assert cli(["prepare", "folder", "--source", str(tmp_path / folder), "--out", str(tmp_path / "ds"),
                    "--quiet"]) == 1
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
    assert not (tmp_path / "ds").exists() or not any((tmp_path / "ds").iterdir())
    assert "9.png" in err

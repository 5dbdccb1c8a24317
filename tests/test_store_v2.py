"""Store schema version 2 (any image size and class count), version 1 still read, the streaming
writer, and models fitted to a store's shape (new_run.fit_options); the end-to-end path of a
3-class 48 x 48 image folder through prepare, fit, evaluate, predict, plot and bench."""
from __future__ import annotations

import json
import subprocess
import sys

import h5py
import numpy as np
import pytest

from image_folders import make_folder
from partrain.datasets import store
from partrain.errors import PartrainError
from partrain.new_run import fit_options
from synthetic import CLASS_NAMES, random_split


def arrays(n_train=30, n_test=10, shape=(3, 32, 32), k=10, seed=0):
    rng = np.random.default_rng(seed)
    return dict(train_images=rng.integers(0, 256, (n_train,) + shape, dtype=np.uint8),
                train_labels=rng.integers(0, k, n_train),
                test_images=rng.integers(0, 256, (n_test,) + shape, dtype=np.uint8),
                test_labels=rng.integers(0, k, n_test))


def test_version_1_store_still_loads(tmp_path):
    path = tmp_path / store.FILENAME
    rng = np.random.default_rng(0)
    (tr, trl), (te, tel) = random_split(20, rng), random_split(10, rng)
    store.write_store(path, tr, trl, te, tel, CLASS_NAMES, "x", "ab" * 32)
    with h5py.File(path, "r+") as f:  # what partrain wrote before schema 2
        f.attrs["format"], f.attrs["schema_version"] = "partrain-cifar10", 1
        del f.attrs["image_shape"], f.attrs["num_classes"]
    d = store.load_store(path)
    assert d.schema_version == 1 and d.image_shape == (3, 32, 32) and d.num_classes == 10
    assert np.array_equal(d.train_images, tr)
    with h5py.File(path, "r+") as f:
        f.attrs["format"] = "partrain-images"  # version 1 with version 2's format: refused
    with pytest.raises(PartrainError, match="schema version 1"):
        store.load_store(path)


def test_any_size_and_class_count_round_trip(tmp_path):
    path = tmp_path / store.FILENAME
    a = arrays(shape=(3, 48, 40), k=300)
    names = [f"c{i}" for i in range(300)]
    store.write_store(path, **a, class_names=names, source_name="x", source_sha256="0" * 64)
    d = store.load_store(path)
    assert d.image_shape == (3, 48, 40) and d.num_classes == 300
    assert d.train_labels.dtype == np.uint16  # more than 256 classes
    for key, value in a.items():
        assert np.array_equal(getattr(d, key), value), key


@pytest.mark.parametrize("damage, message", [
    (lambda f: f.attrs.__setitem__("num_classes", 5), r"expected 5 class names"),
    (lambda f: f.attrs.__setitem__("image_shape", np.array([3, 16, 16])),
     r"train/images must be \(N, 3, 16, 16\) uint8"),
    (lambda f: f.attrs.__setitem__("image_shape", np.array([1, 24, 24])), r"images must be 3 x H x W"),
    (lambda f: f.attrs.__setitem__("image_shape", np.array([3.5, 24, 24])), "not 3 whole numbers"),
    (lambda f: f.attrs.__delitem__("num_classes"), "lacks a valid attribute"),
])
def test_inconsistent_version_2_header_is_refused(tmp_path, damage, message):
    path = tmp_path / store.FILENAME
    store.write_store(path, **arrays(shape=(3, 24, 24), k=3), class_names=["a", "b", "c"],
                      source_name="x", source_sha256="0" * 64)
    with h5py.File(path, "r+") as f:
        damage(f)
    with pytest.raises(PartrainError, match=message):
        store.load_store(path)


def test_streamed_chunks_equal_the_whole_arrays(tmp_path):
    a = arrays(n_train=50, n_test=21, shape=(3, 20, 20), k=4)
    names = ["a", "b", "c", "d"]
    whole = store.write_store(tmp_path / "whole.h5", **a, class_names=names, source_name="x",
                              source_sha256="0" * 64)
    with store.StoreWriter(tmp_path / "streamed.h5", (3, 20, 20), names, "x", "0" * 64) as w:
        for lo in range(0, 50, 7):  # train and test alternate, in odd-sized chunks
            w.add("train", a["train_images"][lo:lo + 7], a["train_labels"][lo:lo + 7])
            w.add("test", a["test_images"][lo // 7 * 3:lo // 7 * 3 + 3],
                  a["test_labels"][lo // 7 * 3:lo // 7 * 3 + 3])
        streamed = w.finish()
    assert streamed.digests == whole.digests
    assert np.array_equal(streamed.mean, whole.mean) and np.array_equal(streamed.std, whole.std)
    d = store.load_store(tmp_path / "streamed.h5")
    assert np.array_equal(d.test_images, a["test_images"])


def test_an_unfinished_writer_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError):
        with store.StoreWriter(tmp_path / store.FILENAME, (3, 8, 8), ["a", "b"], "x", "") as w:
            w.add("train", np.zeros((2, 3, 8, 8), np.uint8), np.array([0, 1]))
            raise RuntimeError("a bad image, a bug, Ctrl-C")
    assert list(tmp_path.iterdir()) == []


def header(shape=(3, 48, 48), k=3):
    return store.CifarData(None, None, None, None, [f"c{i}" for i in range(k)], None, None, "",
                           "", 2, "data/cifar10.h5", image_shape=shape)


def test_models_are_fitted_to_the_store():
    assert fit_options("three-layer", {}, header()) == {"input_size": 48, "num_classes": 3}
    assert fit_options("airbench", {"widths": [8, 8, 8]}, header((3, 32, 32), 10)) == {
        "widths": [8, 8, 8]}  # CIFAR's shape: nothing added (a CIFAR-10 run's config unchanged)
    with pytest.raises(PartrainError, match=r"input_size=32, but .* holds 48x48 images of 3 "
                                            r"classes"):
        fit_options("vgg", {"input_size": 32}, header())
    with pytest.raises(PartrainError, match=r"model airbench cannot take 8x8 images of 3 classes"
                                            r".*too small for airbench"):
        fit_options("airbench", {}, header((3, 8, 8)))
    with pytest.raises(PartrainError, match="square images"):
        fit_options("linear", {}, header((3, 48, 40)))


def cli(*args, cwd, check=0):
    p = subprocess.run([sys.executable, "-m", "partrain.cli", *map(str, args)], cwd=cwd,
                       capture_output=True, text=True, timeout=900)
    assert p.returncode == check, (p.stdout[-3000:], p.stderr[-3000:])
    return p


@pytest.mark.slow
def test_own_48px_images_end_to_end(tmp_path):
    """A 3-class 48 x 48 folder -> prepare -> fit 2 epochs on 2 workers -> evaluate -> predict
    -> plot --filters -> bench: the model built from the store's shape throughout."""
    make_folder(tmp_path / "imgs", per_class=40)
    cli("prepare", "--images", "imgs", "--size", "48", "--data-dir", "data", cwd=tmp_path)
    cli("fit", "--model", "three-layer", "--model-option", "num_filters=8",
        "--model-option", "hidden_dim=32", "--epochs", "2", "--workers", "2", "--batch-size",
        "16", "--val-size", "12", "--data-dir", "data", "--name", "own", "--quiet", cwd=tmp_path)
    config = json.loads((tmp_path / "runs/own/config.json").read_text())["config"]
    assert config["model_options"] == {"num_filters": 8, "hidden_dim": 32, "input_size": 48,
                                       "num_classes": 3}
    cli("evaluate", "runs/own", cwd=tmp_path)
    result = json.loads((tmp_path / "runs/own/evaluation.json").read_text())
    assert result["n_test"] == 24 and result["test_accuracy"] > 0.6  # chance: 1/3
    p = cli("predict", "runs/own", "imgs/red/000.png", "imgs/blue/001.jpg", cwd=tmp_path)
    lines = p.stdout.splitlines()
    assert lines[0].split()[1] == "red" and lines[1].split()[1] == "blue", p.stdout
    cli("plot", "runs/own", "--filters", "--features", "imgs/green/002.bmp", cwd=tmp_path)
    assert (tmp_path / "runs/own/filters.png").stat().st_size > 0
    p = cli("bench", "--model", "three-layer", "--model-option", "num_filters=8",
            "--model-option", "hidden_dim=32", "--workers", "1", "--batch-size", "16",
            "--steps", "2", "--warmup", "0", "--reduction", "sharded", "--data-dir", "data",
            "--out-dir", "bench", cwd=tmp_path)
    assert "img/s" in p.stdout
    # a CIFAR-shaped model on the 48 x 48 store: one line naming both
    p = cli("fit", "--model", "linear", "--model-option", "input_size=32", "--data-dir", "data",
            "--epochs", "1", "--val-size", "12", cwd=tmp_path, check=1)
    assert "input_size=32, but data/cifar10.h5 holds 48x48 images of 3 classes" in p.stderr

"""The HDF5 store: round trip, validation of files from elsewhere, and atomic writes."""
import errno
import hashlib
import os
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from partrain.datasets import store
from partrain.errors import PartrainError
from readonly import run_read_only
from synthetic import CLASS_NAMES, make_tiny_store, random_split


def write(path, n_train=30, n_test=20, seed=0, **overrides):
    rng = np.random.default_rng(seed)
    tr, trl = random_split(n_train, rng)
    te, tel = random_split(n_test, rng)
    args = dict(train_images=tr, train_labels=trl, test_images=te, test_labels=tel,
                class_names=CLASS_NAMES, source_name="x.tar.gz", source_sha256="ab" * 32)
    args.update(overrides)
    return store.write_store(path, **args), args


def digest(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def leftovers(folder):
    return sorted(p.name for p in Path(folder).iterdir() if p.name != store.FILENAME)


def test_round_trip(tmp_path):
    path = tmp_path / "cifar10.h5"
    _, args = write(path)
    d = store.load_store(path)
    for key in ("train_images", "train_labels", "test_images", "test_labels"):
        got = getattr(d, key)
        assert got.dtype == np.uint8 and np.array_equal(got, args[key]), key
    assert d.class_names == CLASS_NAMES
    assert (d.source_name, d.source_sha256) == ("x.tar.gz", "ab" * 32)
    assert d.schema_version == store.SCHEMA_VERSION and d.path == path
    assert d.mean.dtype == np.float32 and d.std.dtype == np.float32
    x = args["train_images"].astype(np.float64)
    np.testing.assert_allclose(d.mean, x.mean(axis=(0, 2, 3)), rtol=1e-6)
    np.testing.assert_allclose(d.std, x.std(axis=(0, 2, 3)), rtol=1e-6)
    assert leftovers(tmp_path) == []
    assert path.stat().st_mode & 0o777 == 0o666 & ~store._umask()  # not mkstemp's private 0600


def test_load_only_test_split(tmp_path):
    path = tmp_path / "cifar10.h5"
    _, args = write(path)
    d = store.load_store(path, splits=("test",))
    assert d.train_images is None and d.train_labels is None
    assert np.array_equal(d.test_images, args["test_images"])
    with pytest.raises(ValueError):
        store.load_store(path, splits=("validation",))


def test_inspect_reads_labels_not_images(tmp_path):
    path = tmp_path / "cifar10.h5"
    write(path)
    d = store.inspect_store(path)
    assert d.train_images is None and d.train_labels.shape == (30,)


def test_channel_stats_exact_and_chunk_independent():
    images = np.random.default_rng(1).integers(0, 256, (37, 3, 32, 32), dtype=np.uint8)
    m1, s1 = store.channel_stats(images, chunk=5)
    m2, s2 = store.channel_stats(images, chunk=1000)
    x = images.astype(np.float64)
    assert np.array_equal(m1, m2) and np.array_equal(s1, s2)
    assert np.array_equal(m1, x.mean(axis=(0, 2, 3)).astype(np.float32))
    np.testing.assert_allclose(s1, x.std(axis=(0, 2, 3)), rtol=1e-7)


def test_tiny_store_fixture_is_valid_and_balanced(tiny_store):
    d = store.load_store(tiny_store)
    assert d.train_images.shape == (500, 3, 32, 32) and d.test_images.shape == (100, 3, 32, 32)
    assert np.bincount(d.train_labels, minlength=10).tolist() == [50] * 10
    assert np.all(d.std > 10)


def test_make_tiny_store_is_deterministic(tmp_path):
    a = store.load_store(make_tiny_store(tmp_path / "a.h5", n_train=40, n_test=20, seed=3))
    b = store.load_store(make_tiny_store(tmp_path / "b.h5", n_train=40, n_test=20, seed=3))
    assert np.array_equal(a.train_images, b.train_images)
    assert np.array_equal(a.test_labels, b.test_labels)


# ------------------------------------------------------------------------------- bad files

def test_missing_file(tmp_path):
    with pytest.raises(PartrainError, match="partrain prepare"):
        store.load_store(tmp_path / "nope.h5")


def test_not_hdf5(tmp_path):
    path = tmp_path / "cifar10.h5"
    path.write_text("hello")
    with pytest.raises(PartrainError, match="not a readable HDF5"):
        store.load_store(path)


def test_hdf5_from_elsewhere(tmp_path):
    path = tmp_path / "cifar10.h5"
    with h5py.File(path, "w") as f:
        f["train/images"] = np.zeros((2, 3, 32, 32), np.uint8)
        f["train/labels"] = np.zeros(2, np.uint8)
    with pytest.raises(PartrainError, match="not a partrain CIFAR-10 store"):
        store.load_store(path)


def tamper(path, fn):
    with h5py.File(path, "r+") as f:
        fn(f)


def replace_dataset(group, name, value):
    del group[name]
    group[name] = value


@pytest.mark.parametrize("fn, message", [
    (lambda f: f.attrs.__setitem__("schema_version", 99), "schema version 99"),
    (lambda f: f.attrs.__delitem__("schema_version"), "schema version None"),
    (lambda f: f.attrs.__setitem__("class_names", np.array(["a", "b"], dtype=h5py.string_dtype())),
     "10 class names"),
    (lambda f: f.attrs.__setitem__("std", np.zeros(3, np.float32)), "std must be positive"),
    (lambda f: f.attrs.__setitem__("mean", np.zeros(4, np.float32)), "mean must be 3"),
    (lambda f: f.attrs.__delitem__("source_sha256"), "lacks a valid attribute"),
    (lambda f: replace_dataset(f["train"], "images", np.zeros((30, 3, 32, 31), np.uint8)),
     "train/images must be"),
    (lambda f: replace_dataset(f["test"], "images", np.zeros((20, 3, 32, 32), np.float32)),
     "test/images must be"),
    (lambda f: replace_dataset(f["train"], "labels", np.zeros(29, np.uint8)), "train/labels must be"),
    (lambda f: replace_dataset(f["test"], "labels", np.full(20, 10, np.uint8)), "outside|0..9"),
    (lambda f: f.__delitem__("test"), "no test/images"),
])
def test_invalid_store_is_refused(tmp_path, fn, message):
    path = tmp_path / "cifar10.h5"
    write(path)
    tamper(path, fn)
    with pytest.raises(PartrainError, match=message):
        store.load_store(path)


def test_write_refuses_invalid_arrays(tmp_path):
    path = tmp_path / "cifar10.h5"
    with pytest.raises(PartrainError, match="0..9"):
        write(path, train_labels=np.full(30, 10, np.uint8))
    with pytest.raises(PartrainError, match="class names"):
        write(path, class_names=CLASS_NAMES[:9])
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- atomic writes

@pytest.fixture
def good_file(tmp_path):
    path = tmp_path / "cifar10.h5"
    write(path, seed=1)
    return path, digest(path)


def half_written_then(exc):
    """A stand-in for the h5 writer that writes some bytes, then fails with `exc`."""
    def fake(tmp, data):
        Path(tmp).write_bytes(b"\x89HDF partial" * 1000)
        raise exc
    return fake


def test_disk_full_leaves_old_file_and_no_temp(good_file, monkeypatch):
    path, before = good_file
    monkeypatch.setattr(store, "_write_h5",
                        half_written_then(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))))
    with pytest.raises(PartrainError, match="no space left"):
        write(path, seed=2)
    assert digest(path) == before and leftovers(path.parent) == []
    store.load_store(path)


def test_ctrl_c_while_writing_leaves_old_file_and_no_temp(good_file, monkeypatch):
    path, before = good_file
    monkeypatch.setattr(store, "_write_h5", half_written_then(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        write(path, seed=2)
    assert digest(path) == before and leftovers(path.parent) == []


def test_unwritable_folder(good_file, monkeypatch):
    path, before = good_file

    def no_temp(*a, **k):
        raise PermissionError(errno.EACCES, "Permission denied")
    monkeypatch.setattr(store.tempfile, "mkstemp", no_temp)
    with pytest.raises(PartrainError, match="cannot write to .*permission denied"):
        write(path, seed=2)
    assert digest(path) == before and leftovers(path.parent) == []


WRITE_AGAIN = """
import sys
sys.path.insert(0, sys.argv[2])
from partrain.errors import PartrainError
from test_store import write
try:
    write(sys.argv[1], seed=2)
except PartrainError as e:
    print(e)
"""


def test_read_only_folder_for_real(good_file):
    """A real read-only folder (as root too: see tests/readonly.py), in a real process."""
    path, before = good_file
    result = run_read_only(path.parent, [sys.executable, "-c", WRITE_AGAIN, str(path),
                                         str(Path(__file__).parent)])
    assert result.returncode == 0 and "cannot write" in result.stdout, (result.stdout,
                                                                        result.stderr)
    assert digest(path) == before and leftovers(path.parent) == []


def test_replace_succeeds_over_old_file(good_file):
    path, before = good_file
    write(path, seed=2)
    assert digest(path) != before and leftovers(path.parent) == []

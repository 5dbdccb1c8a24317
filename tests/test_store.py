"""The HDF5 store: round trip, validation of files from elsewhere, and atomic writes."""
import errno
import hashlib
import os
import re
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from partrain.datasets import store, store_writer
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
    assert path.stat().st_mode & 0o777 == 0o666 & ~store_writer._umask()  # not mkstemp's private 0600


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
    with pytest.raises(PartrainError, match="not a partrain store"):
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
    (lambda f: f.attrs.__setitem__("class_names", np.array(CLASS_NAMES[:9] + ["x" * 65],
                                                           dtype=h5py.string_dtype())),
     "10 class names"),
    (lambda f: f.attrs.__setitem__("mean", np.ones(3, np.complex64)), "mean is .*not numbers"),
    (lambda f: f.attrs.__setitem__("class_names", "abcdefghij"), "not a list of names"),
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
    with pytest.raises(PartrainError, match="0..8"):
        write(path, class_names=CLASS_NAMES[:9])  # labels 0..9 for 9 classes
    with pytest.raises(PartrainError, match="class names"):
        write(path, class_names=CLASS_NAMES[:1], train_labels=np.zeros(30, np.uint8),
              test_labels=np.zeros(20, np.uint8))
    with pytest.raises(PartrainError, match="must differ"):
        write(path, class_names=CLASS_NAMES[:9] + ["cat"])
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- atomic writes

@pytest.fixture
def good_file(tmp_path):
    path = tmp_path / "cifar10.h5"
    write(path, seed=1)
    return path, digest(path)


def half_written_then(exc):
    """A stand-in for the h5 writer that writes some bytes, then fails with `exc`."""
    def fake(f, data):
        Path(f.filename).write_bytes(b"\x89HDF partial" * 1000)
        raise exc
    return fake


def test_disk_full_leaves_old_file_and_no_temp(good_file, monkeypatch):
    path, before = good_file
    monkeypatch.setattr(store_writer, "_write_attrs",
                        half_written_then(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))))
    with pytest.raises(PartrainError, match="no space left"):
        write(path, seed=2)
    assert digest(path) == before and leftovers(path.parent) == []
    store.load_store(path)


def test_ctrl_c_while_writing_leaves_old_file_and_no_temp(good_file, monkeypatch):
    path, before = good_file
    monkeypatch.setattr(store_writer, "_write_attrs", half_written_then(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        write(path, seed=2)
    assert digest(path) == before and leftovers(path.parent) == []


def test_unwritable_folder(good_file, monkeypatch):
    path, before = good_file

    def no_temp(*a, **k):
        raise PermissionError(errno.EACCES, "Permission denied")
    monkeypatch.setattr(store_writer.tempfile, "mkstemp", no_temp)
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


# ------------------------------------------------------------------ digests (D9) and sizes (D2)

def digest_names():
    return [f"{s}_{k}" for s in store.SPLITS for k in ("images", "labels")]


def overwrite_middle(path, dataset, n=4096):
    """Zero n bytes (at most half the data) in the middle of a dataset's raw data, behind
    HDF5's back (a bad disk)."""
    with h5py.File(path, "r") as f:
        ds = f[dataset]
        if ds.chunks is None:
            start, size = ds.id.get_offset(), ds.nbytes
        else:  # the first chunk: full of real rows (a last chunk may be mostly padding)
            info = ds.id.get_chunk_info(0)
            start, size = info.byte_offset, min(info.size, ds.nbytes)
        n = min(n, size // 2)
        offset = start + size // 2 - n // 2
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(bytes(n))


def test_digests_are_recorded_at_write(tmp_path):
    path = tmp_path / "cifar10.h5"
    _, args = write(path)
    with h5py.File(path, "r") as f:
        for name in digest_names():
            assert f.attrs[f"{name}_sha256"] == hashlib.sha256(args[name].tobytes()).hexdigest()
    assert store.load_store(path).digests == {
        n: hashlib.sha256(args[n].tobytes()).hexdigest() for n in digest_names()}


@pytest.mark.parametrize("dataset", ["train/images", "test/images", "train/labels"])
def test_silent_corruption_is_detected(tmp_path, dataset):
    path = tmp_path / "cifar10.h5"
    write(path, n_train=300, n_test=200, seed=5)
    overwrite_middle(path, dataset)
    split, kind = dataset.split("/")
    with pytest.raises(PartrainError, match=f"{dataset} do not match the sha256 .*re-run "
                                            "`partrain prepare"):
        store.load_store(path, splits=(split,))
    other = "test" if split == "train" else "train"
    store.load_store(path, splits=(other,))  # the other split is fine
    if kind == "images":
        store.inspect_store(path)  # reads only the labels, which are intact


def test_store_without_digests_still_loads(tmp_path):
    """Stores written before the digests existed: loaded as before, unverified, silently."""
    path = tmp_path / "cifar10.h5"
    _, args = write(path)
    with h5py.File(path, "r+") as f:
        for name in digest_names():
            del f.attrs[f"{name}_sha256"]
    d = store.load_store(path)
    assert d.digests is None and np.array_equal(d.train_images, args["train_images"])
    with h5py.File(path, "r+") as f:
        f.attrs["test_labels_sha256"] = "0" * 64  # one digest without the others: tampered
    with pytest.raises(PartrainError, match="lacks a valid attribute.*train_images_sha256"):
        store.load_store(path)


def declare_huge(path, n=10**8, **kw):
    """Replace train/ by datasets that declare n images and labels but store none of them."""
    with h5py.File(path, "r+") as f:
        del f["train"]
        f.create_dataset("train/images", shape=(n, 3, 32, 32), dtype=np.uint8, **kw)
        f.create_dataset("train/labels", shape=(n,), dtype=np.uint8, **kw)


def test_declared_size_beyond_what_the_file_holds(tmp_path):
    """D2: a 1 MB HDF5 that declares 10^8 images (286 GiB): refused before any allocation."""
    path = tmp_path / "cifar10.h5"
    write(path)
    declare_huge(path)
    assert path.stat().st_size < 1 << 20
    for load in (store.load_store, store.inspect_store):
        with pytest.raises(PartrainError, match=r"train/\S+ declares 100,000,000 entries "
                                                r"\(.*\) but the file holds 0.0 MiB"):
            load(path)
    store.load_store(path, splits=("test",))


def test_compressed_declared_size_beyond_free_memory(tmp_path):
    """A compressed dataset may store less than it declares, but not more than memory holds."""
    path = tmp_path / "cifar10.h5"
    write(path)
    declare_huge(path, chunks=True, compression="gzip")
    with pytest.raises(PartrainError, match=r"needs 286.2 GiB of memory to read, and only "):
        store.load_store(path)


def test_external_or_virtual_data_is_refused(tmp_path):
    path = tmp_path / "cifar10.h5"
    _, args = write(path)
    raw = tmp_path / "elsewhere.bin"
    raw.write_bytes(args["test_images"].tobytes())
    with h5py.File(path, "r+") as f:
        del f["test/images"]
        f.create_dataset("test/images", shape=args["test_images"].shape, dtype=np.uint8,
                         external=[(str(raw), 0, raw.stat().st_size)])
    with pytest.raises(PartrainError, match="test/images declares 20 entries"):
        store.load_store(path)
    with h5py.File(path, "r+") as f:
        del f["test/images"]
        f["test/images"] = h5py.ExternalLink(str(raw), "/x")
    with pytest.raises(PartrainError, match="no test/images"):
        store.load_store(path)


def test_huge_list_of_class_names_is_a_short_message(tmp_path):
    """D13: 200 000 class names made a 3.2 MB error line."""
    path = tmp_path / "cifar10.h5"
    write(path)
    names = np.array([f"class{i}" for i in range(200_000)], dtype=h5py.string_dtype())
    latest = tmp_path / "latest.h5"  # an attribute over 64 KiB needs the newer file format
    with h5py.File(path, "r") as old, h5py.File(latest, "w", libver="latest") as new:
        for key in old:
            old.copy(key, new)
        new.attrs.update({**old.attrs, "class_names": names})
    os.replace(latest, path)
    with pytest.raises(PartrainError, match=r"expected 10 class names \(.*\), got 200000: ") as e:
        store.load_store(path)
    assert len(str(e.value)) < 250 and "\n" not in str(e.value)


FIT = ["fit", "--model", "three-layer", "--model-option", "num_filters=4", "--model-option",
       "hidden_dim=16", "--batch-size", "50", "--epochs", "1", "--val-size", "100",
       "--workers", "1", "--quiet"]


@pytest.mark.parametrize("damage, message", [
    (lambda p: overwrite_middle(p, "train/images"), r"train/images do not match the sha256 "
                                                    r".*re-run `partrain prepare --force`"),
    (declare_huge, r"train/images declares 100,000,000 entries"),
])
def test_damaged_store_is_one_line_for_real_fit(tmp_path, damage, message):
    """D9 and D2 as a user meets them: `partrain fit` trained on zeroed pixels (exit 0), or
    died in a 286 GiB _ArrayMemoryError traceback; now one line, exit 1, no run folder."""
    data = make_tiny_store(tmp_path / "data" / "cifar10.h5", n_train=500, n_test=100)
    damage(data)
    r = subprocess.run([sys.executable, "-m", "partrain.cli", *FIT, "--data-dir", str(data.parent),
                        "--runs-dir", str(tmp_path / "runs"), "--name", "r"],
                       capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert r.returncode == 1, (r.stdout, r.stderr[-3000:])
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), r.stderr[-3000:]
    assert re.search(message, lines[0]), lines[0]
    assert not (tmp_path / "runs" / "r").exists()  # nothing of the run is left

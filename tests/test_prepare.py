"""`partrain prepare`: both archive layouts and folders, every bad input, reruns, the download.

Most runs use click's CliRunner; a few start real `python -m partrain.cli` processes to show
that a user sees one line and no traceback.
"""
import errno
import gzip
import hashlib
import http.server
import io
import os
import pickle
import re
import resource
import socket
import subprocess
import sys
import tarfile
import threading
from pathlib import Path

import h5py
import numpy as np
import pytest
from click.testing import CliRunner

from partrain.cli import main
from partrain.datasets import cifar10, safepickle, store, store_writer
from partrain.errors import PartrainError
from readonly import run_read_only
from synthetic import (BIN_TOP, CLASS_NAMES, PY_TOP, binary_members, expected_arrays,
                       make_binary_archive, make_splits, memo_bomb_batch, nested_labels_batch,
                       object_state_batch, py2_pickle, py2_str_pickle, python_members,
                       stride_bomb_batch, write_folder, write_tar)

REPO = Path(__file__).resolve().parents[1]
# The real archive sits in shared/ beside the checkout; .ci/run, which tests a copy elsewhere,
# passes its path on in PARTRAIN_CIFAR_ARCHIVE.
REAL_ARCHIVE = Path(os.environ.get("PARTRAIN_CIFAR_ARCHIVE")
                    or REPO.parent / "shared" / "data" / "cifar-10-binary.tar.gz")


def run(*args):
    return CliRunner().invoke(main, ["prepare", *map(str, args)])


def sha256(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def assert_store_matches(h5, batches, source_name, layout_sha=None):
    d = store.load_store(h5)
    tr, trl, te, tel = expected_arrays(batches)
    assert np.array_equal(d.train_images, tr) and np.array_equal(d.train_labels, trl)
    assert np.array_equal(d.test_images, te) and np.array_equal(d.test_labels, tel)
    assert d.class_names == CLASS_NAMES and d.source_name == source_name
    assert re.fullmatch(r"[0-9a-f]{64}", d.source_sha256)
    if layout_sha:
        assert d.source_sha256 == layout_sha
    x = tr.astype(np.float64)
    np.testing.assert_allclose(d.mean, x.mean(axis=(0, 2, 3)), rtol=1e-6)
    np.testing.assert_allclose(d.std, x.std(axis=(0, 2, 3)), rtol=1e-6)
    return d


def assert_clean_failure(result, pattern, progress=False):
    """Exit 1, one line `Error: ...` on stderr matching `pattern`, no traceback.

    With `progress`, a download's progress bar may precede the error line.
    """
    assert result.exit_code == 1, (result.stdout, result.stderr, result.exception)
    assert not isinstance(result.exception, Exception) or isinstance(result.exception, SystemExit)
    lines = [line.strip() for line in result.stderr.strip().splitlines() if line.strip()]
    assert [line for line in lines if line.startswith("Error: ")] == lines[-1:], result.stderr
    if not progress:
        assert len(lines) == 1, result.stderr
    assert re.search(pattern, lines[-1]), lines[-1]
    assert "Traceback" not in result.output


# ------------------------------------------------------------------------------ good sources

def test_binary_archive(tmp_path):
    src, batches = make_binary_archive(tmp_path / "cifar-10-binary.tar.gz")
    r = run("--data-dir", tmp_path / "data", "--source", src)
    assert r.exit_code == 0, r.output
    assert_store_matches(tmp_path / "data" / "cifar10.h5", batches, src.name, sha256(src))
    assert "binary layout" in r.stdout and "wrote" in r.stdout and " s" in r.stdout
    assert re.search(r"airplane\s+\d+\s+\d+", r.stdout)
    assert re.search(r"total\s+200\s+50", r.stdout)
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["cifar10.h5"]


@pytest.mark.parametrize("numpy_module", ["numpy.core.multiarray", "numpy._core.multiarray"])
def test_python_archive(tmp_path, numpy_module):
    batches = make_splits(seed=4)
    members = python_members(batches, dumps=lambda o: py2_pickle(o, numpy_module))
    src = write_tar(tmp_path / "cifar-10-python.tar.gz", members)
    r = run("--data-dir", tmp_path / "data", "--source", src)
    assert r.exit_code == 0, r.output
    assert "python layout" in r.stdout
    assert_store_matches(tmp_path / "data" / "cifar10.h5", batches, src.name, sha256(src))


def test_python_archive_with_every_string_as_bytes(tmp_path):
    """Python 2 wrote numpy's dtype name and byte order as byte strings too."""
    batches = make_splits(seed=3)
    members = python_members(batches, dumps=py2_str_pickle)
    src = write_tar(tmp_path / "cifar-10-python.tar.gz", members)
    r = run("--data-dir", tmp_path / "data", "--source", src)
    assert r.exit_code == 0, r.output
    assert_store_matches(tmp_path / "data" / "cifar10.h5", batches, src.name, sha256(src))


def test_python_archive_written_by_python3(tmp_path):
    batches = make_splits(seed=5)
    members = python_members(batches, dumps=lambda o: pickle.dumps(o, protocol=4))
    src = write_tar(tmp_path / "cifar-10-python.tar.gz", members)
    assert run("--data-dir", tmp_path / "data", "--source", src).exit_code == 0
    assert_store_matches(tmp_path / "data" / "cifar10.h5", batches, src.name)


def test_uncompressed_tar(tmp_path):
    batches = make_splits(seed=6)
    src = write_tar(tmp_path / "cifar-10-binary.tar", binary_members(batches), gz=False)
    assert run("--data-dir", tmp_path / "data", "--source", src).exit_code == 0
    assert_store_matches(tmp_path / "data" / "cifar10.h5", batches, src.name, sha256(src))


@pytest.mark.parametrize("layout", ["binary", "python"])
@pytest.mark.parametrize("point_at", ["parent", "batches"])
def test_extracted_folder(tmp_path, layout, point_at):
    batches = make_splits(seed=7)
    members = binary_members(batches) if layout == "binary" else python_members(batches)
    root = write_folder(tmp_path / "extracted", members)
    src = root if point_at == "parent" else root / (BIN_TOP if layout == "binary" else PY_TOP)
    r = run("--data-dir", tmp_path / "data", "--source", src)
    assert r.exit_code == 0, r.output
    d = assert_store_matches(tmp_path / "data" / "cifar10.h5", batches, src.name)
    assert d.source_sha256 == cifar10.read_source(src).source_sha256  # stable digest


# ------------------------------------------------------------------------------------ reruns

def test_rerun_keeps_valid_file_unless_forced(tmp_path):
    data = tmp_path / "data"
    src1, _ = make_binary_archive(tmp_path / "a.tar.gz", seed=1)
    src2, batches2 = make_binary_archive(tmp_path / "b.tar.gz", seed=2)
    assert run("--data-dir", data, "--source", src1).exit_code == 0
    h5 = data / "cifar10.h5"
    before, mtime = sha256(h5), h5.stat().st_mtime_ns
    r = run("--data-dir", data, "--source", src2)
    assert r.exit_code == 0 and "already exists and is valid" in r.stdout
    assert sha256(h5) == before and h5.stat().st_mtime_ns == mtime
    r = run("--data-dir", data, "--source", src2, "--force")
    assert r.exit_code == 0, r.output
    assert_store_matches(h5, batches2, "b.tar.gz")


def test_foreign_hdf5_in_the_way(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    h5 = data / "cifar10.h5"
    with h5py.File(h5, "w") as f:
        f["something"] = np.arange(5)
    before = sha256(h5)
    src, batches = make_binary_archive(tmp_path / "cifar-10-binary.tar.gz")
    assert_clean_failure(run("--data-dir", data, "--source", src), "not a valid dataset.*--force")
    assert sha256(h5) == before
    assert run("--data-dir", data, "--source", src, "--force").exit_code == 0
    assert_store_matches(h5, batches, src.name)


# ---------------------------------------------------------------------------------- bad input

class Evil:
    """Unpickling this would run a shell command that creates a marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def evil_members(tmp_path):
    members = python_members(make_splits())
    members[f"{PY_TOP}/data_batch_2"] = py2_pickle({b"data": Evil(tmp_path / "PWNED"),
                                                    b"labels": [0]})
    return members


def gz_bytes(tmp_path):
    return make_binary_archive(tmp_path / "good.tar.gz")[0].read_bytes()


def flip_middle(b: bytes) -> bytes:
    mid = len(b) // 2
    return b[:mid] + bytes(x ^ 0x5A for x in b[mid:mid + 64]) + b[mid + 64:]


def with_member(members, name, data):
    members = dict(members)
    members[name] = data
    return members


def without(members, name):
    return {k: v for k, v in members.items() if k != name}


def file_with(name, data):
    def build(tmp_path):
        p = tmp_path / name
        p.write_bytes(data(tmp_path) if callable(data) else data)
        return p
    return build


def tar_of(members_fn, name="src.tar.gz"):
    return lambda tmp_path: write_tar(tmp_path / name, members_fn(tmp_path))


def folder_of(members_fn):
    return lambda tmp_path: write_folder(tmp_path / "folder", members_fn(tmp_path))


BIN = lambda tmp_path: binary_members(make_splits())  # noqa: E731
PY = lambda tmp_path: python_members(make_splits())  # noqa: E731
wrong_labels = make_splits()
wrong_labels["data_batch_3"][1][5] = 10

BAD_SOURCES = {
    "missing file": (lambda tmp_path: tmp_path / "nope.tar.gz", "does not exist"),
    "truncated gzip": (file_with("t.tar.gz", lambda t: gz_bytes(t)[: len(gz_bytes(t)) // 2]),
                       "truncated or corrupt"),
    "gzip trailer cut": (file_with("t.tar.gz", lambda t: gz_bytes(t)[:-3]), "truncated or corrupt"),
    "corrupt gzip": (file_with("c.tar.gz", lambda t: flip_middle(gz_bytes(t))),
                     "truncated or corrupt|not a readable tar"),
    "not a tar": (file_with("x.tar.gz", gzip.compress(os.urandom(5000))), "not a readable tar"),
    "text file": (file_with("x.tar.gz", b"hello world\n" * 100), "not a readable tar"),
    "empty file": (file_with("x.tar.gz", b""), "no CIFAR-10 batches|not a readable tar"),
    "tar with other content": (tar_of(lambda t: {"photos/cat.jpg": b"\xff\xd8" * 100,
                                                 "notes.txt": b"hi"}), "holds no CIFAR-10"),
    "missing member": (tar_of(lambda t: without(BIN(t), f"{BIN_TOP}/test_batch.bin")),
                       "missing cifar-10-batches-bin/test_batch.bin"),
    "wrong record length": (tar_of(lambda t: with_member(BIN(t), f"{BIN_TOP}/data_batch_2.bin",
                                                         b"\x01" * 3072 * 10)),
                            "3073-byte records"),
    "labels outside 0..9": (tar_of(lambda t: binary_members(wrong_labels)),
                            "data_batch_3.bin: label 10 is outside 0..9"),
    "python labels outside 0..9": (tar_of(lambda t: python_members(wrong_labels)),
                                   "data_batch_3: label 10 is outside 0..9"),
    "nine class names": (tar_of(lambda t: with_member(BIN(t), f"{BIN_TOP}/batches.meta.txt",
                                                      "\n".join(CLASS_NAMES[:9]).encode())),
                         "expected 10 class names"),
    "class name with a terminal escape": (tar_of(lambda t: with_member(
        BIN(t), f"{BIN_TOP}/batches.meta.txt",
        "\n".join(["\x1b[2Jcat"] + CLASS_NAMES[1:]).encode())),
        r"expected 10 class names \(2 to 65535, printable, at most 64 characters\)"),
    "python data wrong shape": (tar_of(lambda t: with_member(
        PY(t), f"{PY_TOP}/test_batch",
        py2_pickle({b"data": np.zeros((4, 100), np.uint8), b"labels": [0] * 4}))),
        r"\(N, 3072\) uint8"),
    "python not a pickle": (tar_of(lambda t: with_member(PY(t), f"{PY_TOP}/data_batch_1",
                                                         b"garbage")), "not a CIFAR-10 pickle"),
    "malicious pickle": (tar_of(evil_members), "unsafe.*refused to load (posix|os|nt).system"),
    "python stride-0 bomb": (tar_of(lambda t: with_member(PY(t), f"{PY_TOP}/data_batch_4",
                                                          stride_bomb_batch(5000))),
                             "data_batch_4: unsafe pickle, refused to call numpy.ndarray"),
    "python nested labels": (tar_of(lambda t: with_member(PY(t), f"{PY_TOP}/test_batch",
                                                          nested_labels_batch(10))),
                             "test_batch: b'labels' must be a flat list of 20 integers in 0..9"),
    "mixed layouts": (tar_of(lambda t: {**BIN(t), **PY(t)}), "mixes the binary and python"),
    "empty folder": (lambda tmp_path: (tmp_path / "empty").mkdir() or tmp_path / "empty",
                     "holds no CIFAR-10"),
    "incomplete folder": (folder_of(lambda t: without(BIN(t), f"{BIN_TOP}/batches.meta.txt")),
                          "has no batches.meta.txt"),
    "folder with bad records": (folder_of(lambda t: with_member(
        BIN(t), f"{BIN_TOP}/test_batch.bin", b"\x00" * 3074)), "3073-byte records"),
}


@pytest.mark.parametrize("case", list(BAD_SOURCES))
def test_bad_source(tmp_path, case):
    build, pattern = BAD_SOURCES[case]
    src = build(tmp_path)
    data = tmp_path / "data"
    assert_clean_failure(run("--data-dir", data, "--source", src), pattern)
    assert not data.exists() or list(data.iterdir()) == []  # no partial output
    assert not (tmp_path / "PWNED").exists()

    # an existing good file survives a failed --force rebuild
    good, _ = make_binary_archive(tmp_path / "good-source.tar.gz", seed=9)
    assert run("--data-dir", data, "--source", good).exit_code == 0
    before = sha256(data / "cifar10.h5")
    assert_clean_failure(run("--data-dir", data, "--source", src, "--force"), pattern)
    assert sha256(data / "cifar10.h5") == before
    assert sorted(p.name for p in data.iterdir()) == ["cifar10.h5"]
    assert not (tmp_path / "PWNED").exists()


class Zeros(io.RawIOBase):
    """n zero bytes, read without ever holding them all."""

    def __init__(self, n):
        self.left = n

    def readable(self):
        return True

    def readinto(self, b):
        n = min(len(b), self.left)
        b[:n] = bytes(n)
        self.left -= n
        return n


def test_gzip_bomb_member_is_refused_unread(tmp_path):
    """A 70 KB archive whose data_batch_1.bin is 64 MiB of zeros (it was read whole, up to 1 GiB a
    member: 6 GiB of memory for one small file)."""
    members = binary_members(make_splits(n_per_batch=2, n_test=2))
    src = tmp_path / "bomb.tar.gz"
    with tarfile.open(src, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = 3073 * 22_000 if name.endswith("data_batch_1.bin") else len(data)
            tar.addfile(info, Zeros(info.size) if info.size != len(data) else io.BytesIO(data))
    assert src.stat().st_size < 200_000
    assert_clean_failure(run("--data-dir", tmp_path / "data", "--source", src),
                         r"data_batch_1.bin is 67606000 bytes, far too large")


def test_folder_with_a_link_to_a_huge_file(tmp_path, monkeypatch):
    """An archive's members are refused over MAX_MEMBER_BYTES; a folder's files (or the files
    its links point to: a sparse file, /proc/kcore) are too, before they are read."""
    monkeypatch.setattr(cifar10, "MAX_MEMBER_BYTES", 10_000)
    members = binary_members(make_splits(n_per_batch=2, n_test=2))
    root = write_folder(tmp_path / "src", members)
    big = root / BIN_TOP / "data_batch_3.bin"
    (tmp_path / "big.bin").write_bytes(bytes(3073 * 4))
    big.unlink()
    big.symlink_to(tmp_path / "big.bin")
    assert_clean_failure(run("--data-dir", tmp_path / "data", "--source", root),
                         r"data_batch_3.bin is 12292 bytes, far too large")


def test_safe_unpickler_refuses_code_and_runs_nothing(tmp_path):
    marker = tmp_path / "PWNED"
    payload = pickle.dumps(Evil(marker))
    with pytest.raises(PartrainError, match="refused to load"):
        cifar10.decode_python_batch(payload, "evil")
    for name in ("builtins\neval", "subprocess\nPopen", "numpy\nload", "numpy.core.multiarray\nscalar"):
        mod, attr = name.split("\n")
        with pytest.raises(pickle.UnpicklingError):
            safepickle.SafeUnpickler(io.BytesIO(b"")).find_class(mod, attr)
    assert not marker.exists()


@pytest.mark.parametrize("array", [
    np.arange(6, dtype=">i4").reshape(2, 3), np.asfortranarray(np.ones((3, 2), "<f8")),
    np.zeros((0, 3072), np.uint8), np.array([True, False]), np.arange(5, dtype=np.uint64)])
@pytest.mark.parametrize("dumps", [lambda a: pickle.dumps(a, protocol=4), py2_pickle,
                                   py2_str_pickle])
def test_unpickler_rebuilds_plain_number_arrays(array, dumps):
    got = safepickle.unpickle(dumps({b"a": array}), "x")[b"a"]
    assert isinstance(got, np.ndarray) and got.dtype == array.dtype.newbyteorder("=")  # as numpy
    assert got.shape == array.shape and np.array_equal(got, array)


@pytest.mark.parametrize("array", [
    np.array([1, None], dtype=object), np.zeros(2, [("a", "u1"), ("b", "f4")]),
    np.array(["abc"]), np.zeros(2, "M8[s]"), np.zeros(3, "c16")])
def test_unpickler_refuses_other_arrays(array):
    with pytest.raises(PartrainError, match="unsafe pickle, refused"):
        safepickle.unpickle(pickle.dumps({b"a": array}, protocol=4), "x")


def test_malicious_pickle_in_real_process(tmp_path):
    src = write_tar(tmp_path / "evil.tar.gz", evil_members(tmp_path))
    r = subprocess.run([sys.executable, "-m", "partrain.cli", "prepare", "--source", str(src),
                        "--data-dir", str(tmp_path / "data")], capture_output=True, text=True,
                       cwd=tmp_path, timeout=120)
    assert r.returncode == 1
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert r.stderr.startswith("Error: ") and "refused to load" in r.stderr
    assert not (tmp_path / "PWNED").exists() and not (tmp_path / "data" / "cifar10.h5").exists()


def address_space_limit(limit_bytes):
    """A preexec_fn that caps the child's address space, so a memory bomb fails fast (and
    shows as a MemoryError) instead of filling this machine."""
    def cap():
        resource.setrlimit(resource.RLIMIT_AS, (limit_bytes, limit_bytes))
    return cap


HOSTILE_BATCHES = {  # -> (pickled data_batch_2, what the one error line must say)
    # (1e6, 3072) uint8 from 3 KB: 3 GB once contiguous (a MemoryError under the 1 GiB cap)
    "stride-0 bomb": (lambda: stride_bomb_batch(1_000_000), "refused to call numpy.ndarray"),
    # np.asarray of 20 references to one [x, x] list nested 26 deep: 20 * 2**26 ints
    "nested labels": (lambda: nested_labels_batch(26), "flat list of 20 integers"),
    # numpy's own __setstate__ crashes (SIGSEGV) on this object array
    "object array state": (object_state_batch, "refused an array state"),
    # 12 bytes that made the C unpickler zero an 11 GB memo (a MemoryError under the cap)
    "memo index bomb": (memo_bomb_batch, "expected a dict with b'data' and b'labels'"),
}


@pytest.mark.parametrize("case", list(HOSTILE_BATCHES))
def test_hostile_pickle_in_real_process_is_one_line(tmp_path, case):
    """D8: memory bombs (and a crash) that passed the allow-list: refused at once, in a process
    whose address space is capped at 1 GiB, with one line and no output file."""
    batch, message = HOSTILE_BATCHES[case]
    src = write_tar(tmp_path / "cifar-10-python.tar.gz",
                    with_member(PY(tmp_path), f"{PY_TOP}/data_batch_2", batch()))
    r = subprocess.run([sys.executable, "-m", "partrain.cli", "prepare", "--source", str(src),
                        "--data-dir", str(tmp_path / "data")], capture_output=True, text=True,
                       cwd=tmp_path, timeout=120, preexec_fn=address_space_limit(1 << 30))
    assert r.returncode == 1, (r.returncode, r.stderr[-2000:])
    assert re.fullmatch(r"Error: [^\n]*data_batch_2: [^\n]*\n", r.stderr), r.stderr[-2000:]
    assert message in r.stderr
    assert not (tmp_path / "data").exists() or list((tmp_path / "data").iterdir()) == []


def test_truncated_archive_in_real_process(tmp_path):
    src = tmp_path / "cut.tar.gz"
    src.write_bytes(gz_bytes(tmp_path)[:20000])
    r = subprocess.run([sys.executable, "-m", "partrain.cli", "prepare", "--source", str(src),
                        "--data-dir", str(tmp_path / "data")], capture_output=True, text=True,
                       cwd=tmp_path, timeout=120)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert re.fullmatch(r"Error: .*truncated or corrupt.*\n", r.stderr), r.stderr


def test_source_name_that_is_not_utf8_in_real_process(tmp_path):
    """A folder whose name has a byte that is not UTF-8 (a lone surrogate to Python) crashed the
    HDF5 write (UnicodeEncodeError traceback); its name is now stored with a backslash escape."""
    root = Path(os.fsdecode(os.fsencode(tmp_path) + b"/src\xff"))
    batches = make_splits(seed=8)
    write_folder(root, binary_members(batches))
    r = subprocess.run([sys.executable, "-m", "partrain.cli", "prepare", "--source",
                        os.fsencode(root)], capture_output=True, cwd=tmp_path, timeout=120)
    assert r.returncode == 0, r.stderr.decode(errors="replace")
    assert_store_matches(tmp_path / "data" / "cifar10.h5", batches, "src\\udcff")


def test_good_archive_in_real_process(tmp_path):
    src, batches = make_binary_archive(tmp_path / "cifar-10-binary.tar.gz")
    r = subprocess.run([sys.executable, "-m", "partrain.cli", "prepare", "--source", str(src)],
                       capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr and "wrote data" in r.stdout
    assert_store_matches(tmp_path / "data" / "cifar10.h5", batches, src.name)


# --------------------------------------------------------------------- output folder problems

@pytest.fixture
def prepared(tmp_path):
    data = tmp_path / "data"
    src, _ = make_binary_archive(tmp_path / "cifar-10-binary.tar.gz")
    assert run("--data-dir", data, "--source", src).exit_code == 0
    return data, src, sha256(data / "cifar10.h5")


def test_disk_full_while_writing(prepared, monkeypatch):
    data, src, before = prepared

    def full(f, d):
        Path(f.filename).write_bytes(b"partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(store_writer, "_write_attrs", full)
    assert_clean_failure(run("--data-dir", data, "--source", src, "--force"), "no space left")
    assert sha256(data / "cifar10.h5") == before
    assert sorted(p.name for p in data.iterdir()) == ["cifar10.h5"]


def test_ctrl_c_while_writing(prepared, monkeypatch):
    data, src, before = prepared

    def interrupted(f, d):
        Path(f.filename).write_bytes(b"partial")
        raise KeyboardInterrupt
    monkeypatch.setattr(store_writer, "_write_attrs", interrupted)
    r = run("--data-dir", data, "--source", src, "--force")
    assert r.exit_code == 130 and r.stderr.strip() == "interrupted", r.output  # cli.user_errors
    assert sha256(data / "cifar10.h5") == before
    assert sorted(p.name for p in data.iterdir()) == ["cifar10.h5"]


def test_unwritable_output_folder(prepared, monkeypatch):
    data, src, before = prepared

    def denied(*a, **k):
        raise PermissionError(errno.EACCES, "Permission denied")
    monkeypatch.setattr(store_writer.tempfile, "mkstemp", denied)
    assert_clean_failure(run("--data-dir", data, "--source", src, "--force"), "permission denied")
    assert sha256(data / "cifar10.h5") == before


def test_read_only_output_folder_for_real(prepared):
    """A real read-only folder (as root too: see tests/readonly.py), through the real command."""
    data, src, before = prepared
    result = run_read_only(data, [sys.executable, "-m", "partrain.cli", "prepare", "--data-dir",
                                  str(data), "--source", str(src), "--force"])
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 1 and len(lines) == 1, result.stderr
    assert re.match(r"Error: cannot write", lines[0]), lines
    assert sha256(data / "cifar10.h5") == before


def test_data_dir_is_a_file(tmp_path):
    src, _ = make_binary_archive(tmp_path / "cifar-10-binary.tar.gz")
    (tmp_path / "data").write_text("not a folder")
    assert_clean_failure(run("--data-dir", tmp_path / "data", "--source", src), "cannot create")


# ---------------------------------------------------------------------------------- download

class Server:
    """A local HTTP server for one file, with Range support and scripted failures."""

    def __init__(self, payload: bytes):
        self.payload = payload
        self.cut_after = None      # send only this many body bytes, then drop the connection
        self.ignore_range = False  # answer Range requests with the whole file (200)
        self.status = 200
        self.ranges = []           # the Range header of each request, None if absent
        state = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                rng = self.headers.get("Range")
                state.ranges.append(rng)
                if state.status != 200:
                    self.send_error(state.status)
                    return
                data, start = state.payload, 0
                if rng and not state.ignore_range:
                    start = int(rng.removeprefix("bytes=").split("-")[0])
                    if start >= len(data):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(data)}")
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                body = data[start:]
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body if state.cut_after is None else body[:state.cut_after])

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/cifar-10-binary.tar.gz"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def served(tmp_path):
    src, batches = make_binary_archive(tmp_path / "served.tar.gz", n_per_batch=30)
    payload = src.read_bytes()
    src.unlink()
    server = Server(payload)
    yield server, hashlib.md5(payload).hexdigest(), batches
    server.close()


def download_run(data, server, md5, *extra):
    return run("--data-dir", data, "--url", server.url, "--md5", md5, *extra)


def test_download_then_prepare(tmp_path, served):
    server, md5, batches = served
    data = tmp_path / "data"
    r = download_run(data, server, md5)
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in data.iterdir()) == ["cifar-10-binary.tar.gz", "cifar10.h5"]
    assert cifar10.file_md5(data / "cifar-10-binary.tar.gz") == md5
    assert_store_matches(data / "cifar10.h5", batches, "cifar-10-binary.tar.gz")
    assert server.ranges == [None]
    # with the archive already here, --force rebuilds without touching the network
    server.status = 500
    assert download_run(data, server, md5, "--force").exit_code == 0
    assert len(server.ranges) == 1


def test_interrupted_download_resumes_with_range(tmp_path, served):
    server, md5, batches = served
    data = tmp_path / "data"
    server.cut_after = 100_000
    assert_clean_failure(download_run(data, server, md5), "interrupted|stopped.*rerun", progress=True)
    assert sorted(p.name for p in data.iterdir()) == ["cifar-10-binary.tar.gz.part"]
    assert (data / "cifar-10-binary.tar.gz.part").stat().st_size == 100_000
    server.cut_after = None
    r = download_run(data, server, md5)
    assert r.exit_code == 0, r.output
    assert server.ranges == [None, "bytes=100000-"]
    assert cifar10.file_md5(data / "cifar-10-binary.tar.gz") == md5
    assert not (data / "cifar-10-binary.tar.gz.part").exists()
    assert_store_matches(data / "cifar10.h5", batches, "cifar-10-binary.tar.gz")


def test_server_ignoring_range_starts_over(tmp_path, served):
    server, md5, _ = served
    part = tmp_path / "a.tar.gz.part"
    part.write_bytes(server.payload[:5000])
    server.ignore_range = True
    cifar10.download(server.url, tmp_path / "a.tar.gz", md5, progress=False)
    assert server.ranges == ["bytes=5000-"]
    assert (tmp_path / "a.tar.gz").read_bytes() == server.payload and not part.exists()


def test_bad_partial_bytes_are_dropped_and_refetched(tmp_path, served):
    server, md5, _ = served
    part = tmp_path / "a.tar.gz.part"
    part.write_bytes(b"\x00" * 5000)  # not a prefix of the real file
    cifar10.download(server.url, tmp_path / "a.tar.gz", md5, progress=False)
    assert server.ranges == ["bytes=5000-", None]
    assert (tmp_path / "a.tar.gz").read_bytes() == server.payload and not part.exists()


def test_complete_part_file_is_finished_without_refetch(tmp_path, served):
    server, md5, _ = served
    (tmp_path / "a.tar.gz.part").write_bytes(server.payload)
    cifar10.download(server.url, tmp_path / "a.tar.gz", md5, progress=False)
    assert server.ranges == [f"bytes={len(server.payload)}-"]  # answered 416: nothing left
    assert (tmp_path / "a.tar.gz").read_bytes() == server.payload


def test_md5_mismatch_leaves_nothing(tmp_path, served):
    server, _, _ = served
    data = tmp_path / "data"
    assert_clean_failure(download_run(data, server, "0" * 32), "md5 .* expected 0{32}", progress=True)
    assert list(data.iterdir()) == []


def test_http_error(tmp_path, served):
    server, md5, _ = served
    server.status = 404
    assert_clean_failure(download_run(tmp_path / "data", server, md5), "HTTP 404", progress=True)
    assert list((tmp_path / "data").iterdir()) == []


def test_no_network_says_how_to_use_source(tmp_path):
    with socket.socket() as s:  # a port that nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    r = run("--data-dir", tmp_path / "data", "--url", f"http://127.0.0.1:{port}/x.tar.gz")
    assert_clean_failure(r, r"cannot download .*--source", progress=True)
    assert list((tmp_path / "data").iterdir()) == []


def test_existing_archive_with_wrong_md5_is_not_used(tmp_path, served):
    server, md5, _ = served
    data = tmp_path / "data"
    data.mkdir()
    (data / "cifar-10-binary.tar.gz").write_bytes(b"something else")
    assert_clean_failure(download_run(data, server, md5), "has md5 .*--source", progress=True)
    assert server.ranges == [] and not (data / "cifar10.h5").exists()


def test_defaults_point_at_the_official_archive():
    assert cifar10.URL == "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz"
    assert cifar10.MD5 == "c32a1d4ab5d03f1284b67883e8d87530"


# ----------------------------------------------------------------------- docs, CI, real data

def test_readme_quick_start_and_ci_script():
    readme = (REPO / "README.md").read_text()
    assert ("python3 -m venv .venv && .venv/bin/pip install -e . && .venv/bin/partrain prepare "
            "&& .venv/bin/partrain fit") in readme
    assert "python3 -m venv .venv && .venv/bin/pip install -e '.[test]' && .venv/bin/python -m pytest" in readme
    for heading in ("## Training", "## Results", "## Design"):
        assert heading in readme
    ci = REPO / ".ci" / "run"
    assert os.access(ci, os.X_OK) and "set -euo pipefail" in ci.read_text()


@pytest.mark.slow
@pytest.mark.skipif(not REAL_ARCHIVE.exists(), reason="real CIFAR-10 archive not present")
def test_real_archive(tmp_path):
    r = run("--data-dir", tmp_path / "data", "--source", REAL_ARCHIVE)
    assert r.exit_code == 0, r.output
    d = store.load_store(tmp_path / "data" / "cifar10.h5")
    assert d.train_images.shape == (50000, 3, 32, 32) and d.test_images.shape == (10000, 3, 32, 32)
    assert np.bincount(d.train_labels).tolist() == [5000] * 10
    assert np.bincount(d.test_labels).tolist() == [1000] * 10
    assert d.class_names == CLASS_NAMES and d.source_sha256 == sha256(REAL_ARCHIVE)

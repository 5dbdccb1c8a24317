"""Fuzzing the data readers: every input ends in success or one PartrainError, and never leaves a
partial output file.

Hostile or damaged inputs are generated from small valid ones (tests/synthetic.py): archives of
both layouts whose tar structure is then broken (member names, types, sizes, truncation, bytes,
gzip), python-layout pickles of random objects and mutated pickle bytes, and cifar10.h5 files
with wrong shapes, dtypes, attributes, links and sizes, or damaged bytes. The library functions
run in-process (the CLI turns a PartrainError into one line; tests/test_prepare.py shows that for
real processes). The examples are derandomized with a fixed budget (tests/conftest.py).
"""
from __future__ import annotations

import contextlib
import io
import os
import pickle
import re
import tarfile
import tempfile
from pathlib import Path

import h5py
import numpy as np
import pytest
from hypothesis import event, given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from partrain.datasets import cifar10, store
from partrain.errors import PartrainError
from partrain.prepare import prepare
from synthetic import (BIN_TOP, CLASS_NAMES, PY_TOP, binary_members, make_splits, py2_pickle,
                       py2_str_pickle, python_members)


# a warning would be printed to the user's terminal (with a source line): fails like an exception
pytestmark = pytest.mark.filterwarnings("error")


def quiet(_):
    pass


def success_or_partrain_error(fn, *args, **kwargs):
    """fn's result, or None when it raised PartrainError; any other exception fails the test.

    Each outcome is an `event` (`--hypothesis-show-statistics` shows how often each came up)."""
    try:
        result = fn(*args, **kwargs)
    except PartrainError as e:
        message = str(e)
        assert message and "\n" not in message and len(message) < 1000, message
        message.encode("utf-8")  # printable: no lone surrogates from undecodable bytes
        event(f"{getattr(fn, '__name__', 'fn')}: " + kind_of(message))
        return None
    event(f"{getattr(fn, '__name__', 'fn')}: success")
    return result


def kind_of(message: str) -> str:
    """The gist of an error message: paths, numbers and quoted text taken out."""
    text = re.sub(r"(/[^\s:]+)+", "P", message)
    text = re.sub(r"'[^']*'|\([^)]*\)|\d[\d,.]*", "_", text)
    return text[:70]


def output_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


# ------------------------------------------------------------------------------------- archives

DUMPS = {"py2": py2_pickle, "py2-str": py2_str_pickle,
         **{f"protocol{p}": (lambda o, p=p: pickle.dumps(o, protocol=p)) for p in range(6)}}
# mostly the encodings that real files use (Python 3's protocols 0..2 write bytes through
# _codecs.encode, which is refused; protocol 5 writes arrays through _frombuffer, refused too)
DUMPS_DRAWN = st.sampled_from(["py2", "py2-str", "protocol3", "protocol4"] * 3 + sorted(DUMPS))
WANTED = ([f"{BIN_TOP}/{n}" for n in cifar10.LAYOUTS["binary"][1].values()]
          + [f"{PY_TOP}/{n}" for n in cifar10.LAYOUTS["python"][1].values()])
NAMES = st.one_of(st.sampled_from(WANTED), st.sampled_from(WANTED).map(lambda n: "./" + n),
                  st.sampled_from(WANTED).map(lambda n: "/" + n),
                  st.sampled_from(WANTED).map(lambda n: "../" + n),
                  st.sampled_from(WANTED).map(lambda n: n + "/"),
                  st.text(st.characters(codec="utf-8", exclude_characters="\x00"), max_size=30))
TYPES = st.sampled_from([tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.DIRTYPE, tarfile.SYMTYPE,
                         tarfile.LNKTYPE, tarfile.FIFOTYPE, tarfile.CHRTYPE, tarfile.BLKTYPE,
                         tarfile.CONTTYPE, b"x", b"Z"])


@st.composite
def entries(draw):
    """A small valid archive's members as [name, type, linkname, bytes], then 0..4 mutations."""
    batches = make_splits(n_per_batch=2, n_test=2, seed=draw(st.integers(0, 2)))
    if draw(st.booleans()):
        members = binary_members(batches)
    else:
        members = python_members(batches, dumps=DUMPS[draw(DUMPS_DRAWN)])
    items = [[name, tarfile.REGTYPE, "", data] for name, data in members.items()]
    for _ in range(draw(st.integers(0, 4))):
        i = draw(st.integers(0, len(items) - 1)) if items else None
        what = draw(st.sampled_from(["drop", "duplicate", "rename", "retype", "truncate",
                                     "extend", "replace", "flip", "add"]))
        if i is None or what == "add":
            items.append([draw(NAMES), draw(TYPES), draw(NAMES), draw(st.binary(max_size=64))])
        elif what == "drop":
            items.pop(i)
        elif what == "duplicate":
            items.insert(draw(st.integers(0, len(items))), list(items[i]))
        elif what == "rename":
            items[i][0] = draw(NAMES)
        elif what == "retype":
            items[i][1], items[i][2] = draw(TYPES), draw(NAMES)
        elif what == "truncate":
            items[i][3] = items[i][3][:draw(st.integers(0, max(0, len(items[i][3]) - 1)))]
        elif what == "extend":
            items[i][3] += draw(st.binary(min_size=1, max_size=3073))
        elif what == "replace":
            items[i][3] = draw(st.binary(max_size=200))
        else:
            data = bytearray(items[i][3])
            for _ in range(draw(st.integers(1, 8)) if data else 0):
                data[draw(st.integers(0, len(data) - 1))] ^= draw(st.integers(1, 255))
            items[i][3] = bytes(data)
    return items


def pack(items, fmt, gz: bool) -> bytes | None:
    """The entries as a tar (gzipped or not); None if tarfile itself cannot write them."""
    buf = io.BytesIO()
    try:
        with tarfile.open(fileobj=buf, mode="w:gz" if gz else "w", format=fmt) as tar:
            for name, kind, linkname, data in items:
                info = tarfile.TarInfo(name)
                info.type, info.linkname, info.mode = kind, linkname, 0o644
                info.size = len(data) if kind in (tarfile.REGTYPE, tarfile.AREGTYPE,
                                                  tarfile.CONTTYPE) else 0
                tar.addfile(info, io.BytesIO(data) if info.size else None)
    except (ValueError, UnicodeError):  # e.g. a name that this tar format cannot hold
        return None
    return buf.getvalue()


@st.composite
def archive_bytes(draw):
    raw = None
    while raw is None:
        raw = pack(draw(entries()), draw(st.sampled_from([tarfile.GNU_FORMAT, tarfile.PAX_FORMAT,
                                                          tarfile.USTAR_FORMAT])),
                   draw(st.booleans()))
    cut = draw(st.one_of(st.none(), st.integers(0, len(raw))))
    raw = bytearray(raw if cut is None else raw[:cut])
    for _ in range(draw(st.integers(0, 2)) if raw else 0):  # damage on the (compressed) stream
        raw[draw(st.integers(0, len(raw) - 1))] ^= draw(st.integers(1, 255))
    return bytes(raw)


def check_prepare(src: Path, data: Path, force: bool, before: bytes | None):
    """prepare from src into data: success, or PartrainError with nothing new left behind."""
    out = success_or_partrain_error(prepare, data, source=src, force=force, progress=False,
                                    echo=quiet)
    if out is None:
        if before is None:
            assert output_files(data) == [], output_files(data)
        else:  # a failed --force rebuild leaves the old store as it was, and no temp file
            assert output_files(data) == [store.FILENAME]
            assert (data / store.FILENAME).read_bytes() == before
    else:
        assert output_files(data) == [store.FILENAME]
        d = store.load_store(out)
        assert d.class_names and len(d.train_labels) == len(d.train_images)


@given(raw=archive_bytes(), over_old=st.booleans())
def test_fuzz_archive(raw, over_old):
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        src = tmp / "cifar-10.tar.gz"
        src.write_bytes(raw)
        data, before = tmp / "data", None
        if over_old:
            good = tmp / "good.tar"
            good.write_bytes(pack([[n, tarfile.REGTYPE, "", b] for n, b in binary_members(
                make_splits(n_per_batch=1, n_test=1)).items()], tarfile.GNU_FORMAT, False))
            prepare(data, source=good, progress=False, echo=quiet)
            before = (data / store.FILENAME).read_bytes()
        check_prepare(src, data, over_old, before)


@given(items=entries(), link=st.booleans())
def test_fuzz_extracted_folder(items, link):
    """The same members as files of a folder (names kept inside it; types as files, folders,
    symlinks or fifos)."""
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        root = tmp / "src"
        root.mkdir()
        for name, kind, linkname, data in items:
            parts = [p for p in name.split("/") if p not in ("", ".", "..")]
            if not parts:
                continue
            f = root.joinpath(*parts)
            with contextlib.suppress(OSError):
                f.parent.mkdir(parents=True, exist_ok=True)
                if kind == tarfile.DIRTYPE:
                    f.mkdir()
                elif kind == tarfile.SYMTYPE and link:
                    f.symlink_to(root / linkname if linkname else tmp / "nowhere")
                elif kind == tarfile.FIFOTYPE and link:
                    os.mkfifo(f)  # never opened: only regular files are read
                elif not f.is_fifo():  # (writing into a fifo would wait for a reader)
                    f.write_bytes(data)
        check_prepare(root, tmp / "data", False, None)


# -------------------------------------------------------------------------------------- pickles

LEAVES = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(),
                   st.binary(max_size=8), st.text(max_size=8))


def np_arrays():
    """Arrays of many dtypes (numbers, strings, records, dates, objects), shapes and orders."""
    def make(dtype, shape, order, fill):
        if dtype in ("V3", "M8[s]", "U2", "O"):
            return np.zeros(shape, dtype, order=order)
        return np.full(shape, fill, dtype=dtype, order=order)

    dtypes = st.sampled_from(["u1", "i1", "i8", "f4", "?", "u2", "f8", ">i4", "c8", "U2", "V3",
                              "M8[s]", "O"])
    shapes = st.one_of(st.sampled_from([(2, 3072), (2,), (0, 3072), (2, 3073), (3072,)]),
                       hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=4))
    return st.builds(make, dtypes, shapes, st.sampled_from("CF"), st.integers(0, 11))


VALUES = st.recursive(st.one_of(LEAVES, np_arrays()),
                      lambda inner: st.one_of(st.lists(inner, max_size=4),
                                              st.dictionaries(st.sampled_from([b"data", b"labels",
                                                                               b"x", "data"]),
                                                              inner, max_size=3),
                                              st.tuples(inner, inner)), max_leaves=8)
BATCHES = st.fixed_dictionaries({b"data": st.one_of(np_arrays(), VALUES),
                                 b"labels": st.one_of(st.lists(st.integers(-3, 12), min_size=0,
                                                               max_size=3), VALUES)})


@given(obj=st.one_of(BATCHES, VALUES), dumps=DUMPS_DRAWN)
def test_fuzz_python_batch_objects(obj, dumps):
    try:
        buf = DUMPS[dumps](obj)
    except (pickle.PicklingError, TypeError, ValueError, AttributeError, UnicodeError):
        return  # py2_pickle cannot write every object
    got = success_or_partrain_error(cifar10.decode_python_batch, buf, "batch")
    if got is not None:
        images, labels = got
        assert images.dtype == np.uint8 and images.shape[1:] == (3, 32, 32)
        assert labels.dtype == np.uint8 and labels.shape == (len(images),) and labels.max() <= 9
    success_or_partrain_error(cifar10.decode_python_meta, buf, "meta")


GOOD_BATCH = python_members(make_splits(n_per_batch=2, n_test=2))[f"{PY_TOP}/data_batch_1"]
GOOD_META = python_members(make_splits(n_per_batch=2, n_test=2))[f"{PY_TOP}/batches.meta"]


@given(which=st.booleans(), edits=st.lists(st.tuples(st.sampled_from(["flip", "insert", "cut"]),
                                                     st.integers(0, 10**6), st.binary(
                                                         min_size=1, max_size=9)),
                                           min_size=1, max_size=4))
def test_fuzz_pickle_bytes(which, edits):
    """Mutated bytes of real-looking pickles: opcodes, lengths and memo indices go wrong."""
    buf = bytearray(GOOD_BATCH if which else GOOD_META)
    for what, at, data in edits:
        at %= len(buf) + 1
        if what == "flip" and at < len(buf):
            buf[at] ^= data[0]
        elif what == "insert":
            buf[at:at] = data
        else:
            del buf[at:at + data[0]]
    success_or_partrain_error(cifar10.decode_python_batch, bytes(buf), "batch")
    success_or_partrain_error(cifar10.decode_python_meta, bytes(buf), "meta")


# --------------------------------------------------------------------------------------- stores

ATTR_VALUES = st.one_of(
    st.text(max_size=20), st.binary(max_size=20), st.integers(-2**63, 2**63 - 1), st.floats(),
    st.just(h5py.Empty("f4")),
    st.lists(st.text(max_size=6), min_size=0, max_size=12).map(
        lambda v: np.array(v, dtype=h5py.string_dtype())),
    hnp.arrays(st.sampled_from(["u1", "i8", "f4", "f8", "?", "c8", ">f8"]),
               hnp.array_shapes(min_dims=0, max_dims=2, min_side=0, max_side=11)))
ATTR_NAMES = st.sampled_from(["format", "schema_version", "class_names", "mean", "std",
                              "source_name", "source_sha256", "train_images_sha256",
                              "train_labels_sha256", "test_images_sha256",
                              "test_labels_sha256", "other"])
DATASETS = st.sampled_from(["train/images", "train/labels", "test/images", "test/labels",
                            "train", "test"])


@st.composite
def new_dataset(draw):
    """(shape, dtype, creation options) of a replacement dataset: often wrong, sometimes huge."""
    n = draw(st.sampled_from([0, 1, 30, 20, 10**6, 10**9]))
    shape = draw(st.one_of(st.sampled_from([(n, 3, 32, 32), (n,), (), (n, 3, 32, 31)]),
                           hnp.array_shapes(min_dims=1, max_dims=4, min_side=0, max_side=5)))
    dtype = draw(st.sampled_from(["u1", "u1", "i1", "f4", "i8", "?", ">u2"]))
    opts = draw(st.sampled_from([{}, {"chunks": True}, {"chunks": True, "compression": "gzip"},
                                 {"fillvalue": 11}, {"chunks": True, "fillvalue": 3}]))
    if draw(st.booleans()) and np.prod(shape) <= 10**5:
        opts["data"] = np.full(shape, draw(st.integers(0, 12)), dtype)
    return shape, dtype, opts


@st.composite
def store_edits(draw):
    return draw(st.lists(st.one_of(
        st.tuples(st.just("set attr"), ATTR_NAMES, ATTR_VALUES),
        st.tuples(st.just("del attr"), ATTR_NAMES),
        st.tuples(st.just("dataset"), DATASETS, new_dataset()),
        st.tuples(st.just("delete"), DATASETS),
        st.tuples(st.just("link"), DATASETS, st.sampled_from(["soft", "external", "hard"])),
        st.tuples(st.just("bytes"), st.integers(0, 10**6), st.integers(1, 255)),
        st.tuples(st.just("truncate"), st.integers(0, 10**6))), min_size=1, max_size=3))


def apply_edit(path: Path, edit):
    kind = edit[0]
    if kind in ("bytes", "truncate"):
        raw = bytearray(path.read_bytes())
        if not raw:
            return
        at = edit[1] % len(raw)
        if kind == "bytes":
            raw[at] ^= edit[2]
        else:
            del raw[at:]
        path.write_bytes(bytes(raw))
        return
    try:
        f = h5py.File(path, "r+")
    except OSError:
        return  # already damaged beyond what h5py can open for writing
    with contextlib.suppress(KeyError, ValueError, TypeError, OSError, RuntimeError):
        with f:  # h5py may refuse the edit half-way, or even the close
            edit_h5(f, edit)


def edit_h5(f, edit):
    kind = edit[0]
    if kind == "set attr":
        with contextlib.suppress(KeyError):
            del f.attrs[edit[1]]
        f.attrs[edit[1]] = edit[2]
    elif kind == "del attr":
        del f.attrs[edit[1]]
    elif kind == "delete":
        del f[edit[1]]
    elif kind == "dataset":
        shape, dtype, opts = edit[2]
        with contextlib.suppress(KeyError):
            del f[edit[1]]
        f.create_dataset(edit[1], shape=shape, dtype=dtype, **opts)
    else:
        other = "test/labels" if edit[1] != "test/labels" else "train/labels"
        with contextlib.suppress(KeyError):
            del f[edit[1]]
        f[edit[1]] = {"soft": h5py.SoftLink("/" + other),
                      "external": h5py.ExternalLink("elsewhere.h5", "/x"),
                      "hard": f[other]}[edit[2]]


BASE_STORE: dict[str, bytes] = {}


def base_store(tmp: Path) -> Path:
    """A valid small store (written once per session, copied per example)."""
    path = tmp / store.FILENAME
    if not BASE_STORE:
        rng = np.random.default_rng(0)
        store.write_store(path, rng.integers(0, 256, (30, 3, 32, 32), np.uint8),
                          rng.integers(0, 10, 30).astype(np.uint8),
                          rng.integers(0, 256, (20, 3, 32, 32), np.uint8),
                          rng.integers(0, 10, 20).astype(np.uint8), CLASS_NAMES, "x", "ab" * 32)
        BASE_STORE["bytes"] = path.read_bytes()
    path.write_bytes(BASE_STORE["bytes"])
    return path


@given(edits=store_edits())
def test_fuzz_store(edits):
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "edited").mkdir()
        edited = base_store(tmp / "edited")
        for edit in edits:
            apply_edit(edited, edit)
        # the store under test is a copy: HDF5 keeps a file whose close failed open (an edit on
        # damaged metadata), shares that handle with whoever opens the same file again, and
        # writes to it when they close it
        (tmp / "data").mkdir()
        path = tmp / "data" / store.FILENAME
        path.write_bytes(before := edited.read_bytes())
        for load in (store.load_store, store.inspect_store,
                     lambda p: store.load_store(p, splits=("test",))):
            d = success_or_partrain_error(load, path)
            if d is not None:
                assert len(d.class_names) == 10 and d.mean.shape == d.std.shape == (3,)
                labels = d.test_labels
                assert labels.dtype == np.uint8 and labels.ndim == 1 and labels.max() <= 9
        # prepare over it without --force: keeps a valid store, refuses an invalid one; the
        # file is never touched and nothing is downloaded
        success_or_partrain_error(prepare, path.parent, source=tmp / "missing.tar.gz", echo=quiet)
        assert path.read_bytes() == before and output_files(path.parent) == [store.FILENAME]

"""The HDF5 file made by `partrain prepare`: its schema, an atomic writer and a validating reader.

Layout of `cifar10.h5` (schema version 1)::

    /train/images  (N, 3, 32, 32) uint8   NCHW, channels R, G, B
    /train/labels  (N,)           uint8   0..9
    /test/images   (M, 3, 32, 32) uint8
    /test/labels   (M,)           uint8
    attrs: format="partrain-cifar10", schema_version=1, class_names (10 str),
           mean, std (3,) float32   per-channel statistics of the train images, pixel units 0..255
           source_name, source_sha256   what the file was built from
           {split}_{images,labels}_sha256   sha256 of each array's C-order bytes (a store
                                            written before these existed loads unverified)

Every later command opens the file through `load_store`, which checks all of the above and raises
`PartrainError` (one line) on any problem. HDF5 keeps no checksum of contiguous data, so without
the digests a flipped block of pixels would train silently; with them `load_store` notices.
The declared sizes are checked against what the file really stores (and against free memory)
before anything is read: a 1 MB file can declare 10^8 images.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import reprlib
import tempfile
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from ..errors import PartrainError

SCHEMA_VERSION = 1
FORMAT = "partrain-cifar10"
FILENAME = "cifar10.h5"
SPLITS = ("train", "test")
IMAGE_SHAPE = (3, 32, 32)
NUM_CLASSES = 10


@dataclass
class CifarData:
    """The contents of a store. Arrays of splits that were not loaded are None."""

    train_images: np.ndarray | None
    train_labels: np.ndarray | None
    test_images: np.ndarray | None
    test_labels: np.ndarray | None
    class_names: list[str]
    mean: np.ndarray
    std: np.ndarray
    source_name: str
    source_sha256: str
    schema_version: int
    path: Path | None = None
    digests: dict[str, str] | None = None  # "train_images" -> sha256 hex; None: an older store


def array_sha256(array: np.ndarray) -> str:
    """sha256 of an array's C-order bytes (about 0.1 s for CIFAR-10's 150 MB of images)."""
    return hashlib.sha256(np.ascontiguousarray(array).data).hexdigest()


_REPR = reprlib.Repr()
_REPR.maxlist = _REPR.maxtuple = 5
_REPR.maxstring = _REPR.maxother = 60


def printable(text: str) -> str:
    """`text` with any lone surrogate (how Python keeps bytes that were not UTF-8, in a file name
    or an attribute) as a backslash escape: it can then be printed, and stored in HDF5."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def excerpt(value, limit: int = 80) -> str:
    """A short one-line rendering of something read from a user's file, for an error message:
    a file can hold 200 000 class names or a megabyte of text, and the message stays one line."""
    text = _REPR.repr(value) if isinstance(value, (list, tuple, dict, set)) else str(value)
    text = " ".join(printable(text).split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


def channel_stats(images: np.ndarray, chunk: int = 1000) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and (population) std of uint8 NCHW images, in pixel units, as float32.

    Sums of pixels and of squared pixels are exact integers, so the result is the float64 value
    rounded once to float32, whatever the chunking. Memory stays at a few chunks' worth.
    """
    n_pix = images.shape[0] * images.shape[2] * images.shape[3]
    if n_pix == 0:
        raise PartrainError("cannot compute channel statistics of an empty image set")
    s = [0] * images.shape[1]
    ss = [0] * images.shape[1]
    for lo in range(0, images.shape[0], chunk):
        block = images[lo:lo + chunk]
        sums = np.sum(block, axis=(0, 2, 3), dtype=np.int64)
        sq = np.square(block, dtype=np.uint32)
        sqsums = np.sum(sq, axis=(0, 2, 3), dtype=np.int64)
        for c in range(len(s)):
            s[c] += int(sums[c])
            ss[c] += int(sqsums[c])
    mean = np.array([sc / n_pix for sc in s], np.float64)
    var = np.array([(n_pix * q - sc * sc) / (n_pix * n_pix) for sc, q in zip(s, ss)], np.float64)
    return mean.astype(np.float32), np.sqrt(var).astype(np.float32)


# --------------------------------------------------------------------------------------- writing

def _write_h5(path: Path, data: CifarData) -> None:
    """Write every dataset and attribute of `data` into a new HDF5 file at `path`."""

    with h5py.File(path, "w") as f:
        for split in SPLITS:
            g = f.create_group(split)
            g.create_dataset("images", data=getattr(data, f"{split}_images"))
            g.create_dataset("labels", data=getattr(data, f"{split}_labels"))
        f.attrs["format"] = FORMAT
        f.attrs["schema_version"] = np.int64(data.schema_version)
        f.attrs["class_names"] = np.array(data.class_names, dtype=h5py.string_dtype())
        f.attrs["mean"] = np.asarray(data.mean, np.float32)
        f.attrs["std"] = np.asarray(data.std, np.float32)
        f.attrs["source_name"] = data.source_name
        f.attrs["source_sha256"] = data.source_sha256
        for name, digest in data.digests.items():
            f.attrs[f"{name}_sha256"] = digest


def write_store(path, train_images: np.ndarray, train_labels: np.ndarray,
                test_images: np.ndarray, test_labels: np.ndarray, class_names: list[str],
                source_name: str, source_sha256: str) -> CifarData:
    """Write a store atomically: a temp file in the same folder, then `os.replace`.

    Computes mean/std from the train images. On any failure (disk full, read-only folder,
    Ctrl-C) the temp file is removed and an existing file at `path` is left as it was.
    """
    path = Path(path)
    arrays = dict(train_images=np.asarray(train_images), train_labels=np.asarray(train_labels),
                  test_images=np.asarray(test_images), test_labels=np.asarray(test_labels))
    for split in SPLITS:  # never write a file that load_store would refuse
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        _check_split(images.shape, images.dtype, labels.shape, labels.dtype, split, "data to write")
        _check_labels(labels, split, "data to write")
    mean, std = channel_stats(arrays["train_images"])
    arrays = {name: np.ascontiguousarray(a) for name, a in arrays.items()}
    data = CifarData(**arrays, class_names=[str(n) for n in class_names], mean=mean, std=std,
                     source_name=printable(str(source_name)), source_sha256=str(source_sha256),
                     schema_version=SCHEMA_VERSION, path=path,
                     digests={name: array_sha256(a) for name, a in arrays.items()})
    _check_header(data, "data to write")
    folder = path.parent
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
    except OSError as e:
        raise PartrainError(f"cannot write to {folder}: {_reason(e)}") from None
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        _write_h5(tmp, data)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp made it private; give it a normal file's mode
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())  # the bytes are on disk before the name points at them
        os.replace(tmp, path)
        _fsync_dir(folder)
    except OSError as e:
        _remove_quietly(tmp)
        raise PartrainError(f"cannot write {path}: {_reason(e)}") from None
    except BaseException:  # KeyboardInterrupt, bugs: still leave nothing half-written behind
        _remove_quietly(tmp)
        raise
    return data


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):  # not every platform or filesystem allows this
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _remove_quietly(p: Path) -> None:
    with contextlib.suppress(OSError):
        p.unlink()


def _reason(e: OSError) -> str:
    if e.errno == errno.ENOSPC:
        return "no space left on device"
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return "permission denied (read-only folder?)"
    return e.strerror or str(e) or type(e).__name__


# --------------------------------------------------------------------------------------- reading

def load_store(path, splits=("train", "test")) -> CifarData:
    """Open and validate a store; read the arrays of `splits` into memory (others stay None)."""
    return _open(path, splits, read_images=True)


def inspect_store(path) -> CifarData:
    """Validate a store (attributes, shapes, dtypes, labels) without reading the images."""
    return _open(path, SPLITS, read_images=False)


def _open(path, splits, read_images: bool) -> CifarData:
    path = Path(path)
    splits = tuple(splits)
    bad = [s for s in splits if s not in SPLITS]
    if bad or not splits:
        raise ValueError(f"splits must be a non-empty subset of {SPLITS}, got {splits}")
    if not path.exists():
        raise PartrainError(f"no dataset at {path}; run `partrain prepare` first")
    if path.is_dir():
        raise PartrainError(f"{path} is a folder, expected the {FILENAME} made by `partrain prepare`")
    try:
        f = h5py.File(path, "r")
    except OSError:
        raise PartrainError(f"{path} is not a readable HDF5 file; rebuild it with "
                            "`partrain prepare --force`") from None
    try:
        with f:
            data = _read_attrs(f, path)
            found = {split: _datasets(f, split, path) for split in splits}
            _check_sizes(found, path, read_images)
            arrays = {}
            for split, (images, labels) in found.items():
                labels = labels[()]
                _check_labels(labels, split, str(path))
                arrays[f"{split}_labels"] = _verified(labels, f"{split}_labels", data, path)
                arrays[f"{split}_images"] = (_verified(images[()], f"{split}_images", data, path)
                                             if read_images else None)
    except (OSError, KeyError, RuntimeError) as e:  # corrupt or truncated blocks or metadata
        reason = _reason(e) if isinstance(e, OSError) else excerpt(str(e).strip("'\""), 120)
        raise PartrainError(f"cannot read {path} ({reason}); rebuild it with "
                            "`partrain prepare --force`") from None
    for name, value in arrays.items():
        setattr(data, name, value)
    return data


def _read_attrs(f, path: Path) -> CifarData:
    a = f.attrs
    fmt = a.get("format")
    if not isinstance(fmt, str) or fmt != FORMAT:
        raise PartrainError(f"{path} is an HDF5 file but not a partrain CIFAR-10 store "
                            "(made elsewhere?); rebuild it with `partrain prepare --force`")
    version = a.get("schema_version")
    if not isinstance(version, (int, np.integer)) or int(version) != SCHEMA_VERSION:
        raise PartrainError(f"{path} has schema version {excerpt(version)}, this partrain reads "
                            f"version {SCHEMA_VERSION}; rebuild it with `partrain prepare --force`")
    try:
        names = a["class_names"]
        if not isinstance(names, np.ndarray) or names.ndim != 1:
            raise TypeError(f"class_names is {excerpt(names)}, not a list of names")
        names = [n.decode() if isinstance(n, bytes) else str(n) for n in names]
        mean, std = _numbers(a["mean"], "mean"), _numbers(a["std"], "std")
        source_name, source_sha256 = printable(str(a["source_name"])), str(a["source_sha256"])
        digests = _digests(a)
    except (KeyError, TypeError, ValueError, UnicodeDecodeError) as e:
        raise PartrainError(f"{path} lacks a valid attribute ({excerpt(str(e))}); rebuild it "
                            "with `partrain prepare --force`") from None
    data = CifarData(None, None, None, None, names, mean, std, source_name, source_sha256,
                     int(version), path, digests)
    _check_header(data, str(path))
    return data


def _numbers(value, name: str) -> np.ndarray:
    """An attribute as float32, quietly: numpy warns when it casts complex numbers (it drops the
    imaginary part) or overflows (1e300 becomes inf, which `_check_header` then refuses)."""
    v = np.asarray(value)
    if v.dtype.kind not in "biuf":
        raise TypeError(f"{name} is {excerpt(v)}, not numbers")
    with np.errstate(over="ignore", invalid="ignore"):
        return v.astype(np.float32)


def _digests(attrs) -> dict[str, str] | None:
    """The four array digests, or None for a store written before they existed (none of them)."""
    names = [f"{split}_{kind}" for split in SPLITS for kind in ("images", "labels")]
    found = {n: attrs.get(f"{n}_sha256") for n in names}
    if all(v is None for v in found.values()):
        return None
    for n, v in found.items():
        if not isinstance(v, str) or len(v) != 64:
            raise ValueError(f"{n}_sha256 is {excerpt(v)}, not a sha256")
    return found


def _datasets(f, split: str, path: Path):
    """The split's two datasets, as hard links inside this file (an external link, or a virtual
    or external dataset, would read some other file)."""
    group = f.get(split, getlink=True)
    links = [group] + ([f[split].get(n, getlink=True) for n in ("images", "labels")]
                       if isinstance(f.get(split), h5py.Group) else [])
    if len(links) != 3 or not all(isinstance(x, h5py.HardLink) for x in links) or not all(
            isinstance(f[split].get(n), h5py.Dataset) for n in ("images", "labels")):
        raise PartrainError(f"{path} has no {split}/images and {split}/labels; rebuild it with "
                            "`partrain prepare --force`")
    images, labels = f[split]["images"], f[split]["labels"]
    _check_split(images.shape, images.dtype, labels.shape, labels.dtype, split, str(path))
    return images, labels


def _check_sizes(found: dict, path: Path, read_images: bool) -> None:
    """Refuse, before anything is read, what the file cannot hold: a dataset whose declared size
    exceeds the bytes it really stores (unwritten, external or virtual data, read back as fill
    values) or the file, and arrays larger than the memory available to read them into."""
    file_size = path.stat().st_size
    total = 0
    for split, pair in found.items():
        for ds in pair:
            plist = ds.id.get_create_plist()
            stored = 0 if ds.is_virtual or plist.get_external_count() else ds.id.get_storage_size()
            if stored > file_size or (plist.get_nfilters() == 0 and stored < ds.nbytes):
                raise PartrainError(
                    f"{path}: {ds.name} declares {ds.shape[0]:,} entries ({_size(ds.nbytes)}) but "
                    f"the file holds {_size(stored)} of them; rebuild it with `partrain prepare "
                    "--force`")
        total += pair[1].nbytes + (pair[0].nbytes if read_images else 0)
    free = _available_memory()
    if free is not None and total > free:
        raise PartrainError(f"{path} needs {_size(total)} of memory to read, and only "
                            f"{_size(free)} is available")


def _available_memory() -> int | None:
    """MemAvailable from /proc/meminfo in bytes (None where there is no such file)."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    return None


def _size(n: int) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def _verified(array: np.ndarray, name: str, data: CifarData, path: Path) -> np.ndarray:
    """`array` (as read), checked against the digest `prepare` recorded (if it recorded one)."""
    if data.digests is not None and array_sha256(array) != data.digests[name]:
        split, kind = name.split("_")
        raise PartrainError(f"{path}: {split}/{kind} do not match the sha256 recorded when the "
                            "file was made (the file is damaged); re-run `partrain prepare "
                            "--force`")
    return array


# ------------------------------------------------------------------------------------ validation

def _check_header(d: CifarData, where: str) -> None:
    names = d.class_names  # printed in tables by prepare, evaluate and predict
    if len(names) != NUM_CLASSES or not all(0 < len(n) <= 64 and n.isprintable() for n in names):
        raise PartrainError(f"{where}: expected {NUM_CLASSES} class names (printable, at most 64 "
                            f"characters), got {len(names)}: {excerpt(names)}")
    for name in ("mean", "std"):
        v = getattr(d, name)
        if v.shape != (3,) or not np.all(np.isfinite(v)):
            raise PartrainError(f"{where}: attribute {name} must be 3 finite numbers, got "
                                f"{excerpt(v)}")
    if not np.all(d.std > 0):
        raise PartrainError(f"{where}: every channel's std must be positive, got {d.std}")


def _check_split(ishape, idtype, lshape, ldtype, split: str, where: str) -> None:
    n = ishape[0] if len(ishape) else 0
    if len(ishape) != 4 or tuple(ishape[1:]) != IMAGE_SHAPE or idtype != np.uint8:
        raise PartrainError(f"{where}: {split}/images must be (N, 3, 32, 32) uint8, "
                            f"got {excerpt(tuple(ishape))} {excerpt(str(idtype), 40)}")
    if tuple(lshape) != (n,) or ldtype != np.uint8:
        raise PartrainError(f"{where}: {split}/labels must be ({n},) uint8, got "
                            f"{excerpt(tuple(lshape))} {excerpt(str(ldtype), 40)}")
    if n == 0:
        raise PartrainError(f"{where}: the {split} split is empty")


def _check_labels(labels: np.ndarray, split: str, where: str) -> None:
    if labels.size and int(labels.max()) >= NUM_CLASSES:
        raise PartrainError(f"{where}: {split} labels must lie in 0..{NUM_CLASSES - 1}, "
                            f"found {int(labels.max())}")

"""The HDF5 file made by `partrain prepare`: its schema and a validating reader (the writer is
store_writer.py).

Layout (schema version 2; version 1, CIFAR-10 only, is still read)::

    /train/images  (N, 3, H, W) uint8   NCHW, channels R, G, B
    /train/labels  (N,)         uint8   0..K-1 (uint16 when K > 256)
    /test/images   (M, 3, H, W) uint8
    /test/labels   (M,)         uint8
    attrs: format="partrain-images" (version 1: "partrain-cifar10"), schema_version=2,
           image_shape (3,) = (3, H, W), num_classes = K   version 1: (3, 32, 32) and 10, implied
           class_names (K str)
           mean, std (3,) float32   per-channel statistics of the train images, pixel units 0..255
           source_name, source_sha256   what the file was built from
           {split}_{images,labels}_sha256   sha256 of each array's C-order bytes (a store
                                            written before these existed loads unverified)

The file is DATA_DIR/cifar10.h5 whatever the source (CIFAR-10, CIFAR-100, an image folder): the
name predates the other sources, and every command finds the store of --data-dir by it.

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
import reprlib
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from ..errors import PartrainError

SCHEMA_VERSION = 2
FORMATS = {1: "partrain-cifar10", 2: "partrain-images"}  # schema version -> format attribute
FILENAME = "cifar10.h5"
SPLITS = ("train", "test")
IMAGE_SHAPE = (3, 32, 32)  # CIFAR's; version 1 stores hold only these
NUM_CLASSES = 10
MAX_CLASSES = 65535        # labels are uint16 at most
MIN_SIDE, MAX_SIDE = 4, 1024  # image height and width a store may hold


def label_dtype(num_classes: int) -> np.dtype:
    """uint8 labels up to 256 classes (every CIFAR store), uint16 beyond."""
    return np.dtype(np.uint8 if num_classes <= 256 else np.uint16)


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
    image_shape: tuple[int, int, int] = IMAGE_SHAPE  # (3, H, W) of every image

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


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


class ChannelSums:
    """Per-channel sums of pixels and of squared pixels of uint8 NCHW images, added chunk by
    chunk as exact integers: the statistics are the same whatever the chunking."""

    def __init__(self, channels: int):
        self.s = [0] * channels
        self.ss = [0] * channels
        self.n_pix = 0

    def add(self, block: np.ndarray) -> None:
        if not len(block):
            return
        sums = np.sum(block, axis=(0, 2, 3), dtype=np.int64)
        sqsums = np.sum(np.square(block, dtype=np.uint32), axis=(0, 2, 3), dtype=np.int64)
        for c in range(len(self.s)):
            self.s[c] += int(sums[c])
            self.ss[c] += int(sqsums[c])
        self.n_pix += block.shape[0] * block.shape[2] * block.shape[3]

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        """(mean, population std) in pixel units as float32: the float64 values rounded once."""
        n = self.n_pix
        if n == 0:
            raise PartrainError("cannot compute channel statistics of an empty image set")
        mean = np.array([sc / n for sc in self.s], np.float64)
        var = np.array([(n * q - sc * sc) / (n * n) for sc, q in zip(self.s, self.ss)],
                       np.float64)
        return mean.astype(np.float32), np.sqrt(var).astype(np.float32)


def channel_stats(images: np.ndarray, chunk: int = 1000) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and (population) std of uint8 NCHW images, in pixel units, as float32
    (`ChannelSums` over chunks of `chunk` images: memory stays at a few chunks' worth)."""
    sums = ChannelSums(images.shape[1])
    for lo in range(0, images.shape[0], chunk):
        sums.add(images[lo:lo + chunk])
    return sums.result()


def os_reason(e: OSError) -> str:
    """An OSError of reading or writing a store in words (the reader's and the writer's)."""
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
            found = {split: _datasets(f, split, path, data) for split in splits}
            _check_sizes(found, path, read_images)
            arrays = {}
            for split, (images, labels) in found.items():
                labels = labels[()]
                check_labels(labels, split, str(path), data.num_classes)
                arrays[f"{split}_labels"] = _verified(labels, f"{split}_labels", data, path)
                arrays[f"{split}_images"] = (_verified(images[()], f"{split}_images", data, path)
                                             if read_images else None)
    except (OSError, KeyError, RuntimeError) as e:  # corrupt or truncated blocks or metadata
        reason = os_reason(e) if isinstance(e, OSError) else excerpt(str(e).strip("'\""), 120)
        raise PartrainError(f"cannot read {path} ({reason}); rebuild it with "
                            "`partrain prepare --force`") from None
    for name, value in arrays.items():
        setattr(data, name, value)
    return data


def _read_attrs(f, path: Path) -> CifarData:
    a = f.attrs
    fmt = a.get("format")
    if not isinstance(fmt, str) or fmt not in FORMATS.values():
        raise PartrainError(f"{path} is an HDF5 file but not a partrain store (made elsewhere?); "
                            "rebuild it with `partrain prepare --force`")
    version = a.get("schema_version")
    if (not isinstance(version, (int, np.integer)) or int(version) not in FORMATS
            or FORMATS[int(version)] != fmt):
        raise PartrainError(f"{path} has schema version {excerpt(version)}, this partrain reads "
                            f"versions {', '.join(map(str, FORMATS))}; rebuild it with "
                            "`partrain prepare --force`")
    try:
        names = a["class_names"]
        if not isinstance(names, np.ndarray) or names.ndim != 1:
            raise TypeError(f"class_names is {excerpt(names)}, not a list of names")
        names = [n.decode() if isinstance(n, bytes) else str(n) for n in names]
        mean, std = _numbers(a["mean"], "mean"), _numbers(a["std"], "std")
        source_name, source_sha256 = printable(str(a["source_name"])), str(a["source_sha256"])
        digests = _digests(a)
        shape, classes = (_shape_attrs(a) if int(version) >= 2 else (IMAGE_SHAPE, NUM_CLASSES))
    except (KeyError, TypeError, ValueError, UnicodeDecodeError) as e:
        raise PartrainError(f"{path} lacks a valid attribute ({excerpt(str(e))}); rebuild it "
                            "with `partrain prepare --force`") from None
    data = CifarData(None, None, None, None, names, mean, std, source_name, source_sha256,
                     int(version), path, digests, image_shape=shape)
    check_header(data, str(path), classes)
    check_image_shape(shape, str(path))
    return data


def _shape_attrs(attrs) -> tuple[tuple[int, int, int], int]:
    """Version 2's image_shape (3 whole numbers) and num_classes (a whole number)."""
    shape, classes = np.asarray(attrs["image_shape"]), np.asarray(attrs["num_classes"])
    if shape.shape != (3,) or shape.dtype.kind not in "iu":
        raise ValueError(f"image_shape is {excerpt(shape.tolist())}, not 3 whole numbers")
    if classes.shape != () or classes.dtype.kind not in "iu":
        raise ValueError(f"num_classes is {excerpt(classes.tolist())}, not a whole number")
    return tuple(int(v) for v in shape), int(classes)


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


def _datasets(f, split: str, path: Path, data: CifarData):
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
    check_split(images.shape, images.dtype, labels.shape, labels.dtype, split, str(path),
                data.image_shape, label_dtype(data.num_classes))
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

def check_header(d: CifarData, where: str, num_classes: int | None = None) -> None:
    """Class names (as many as `num_classes` declares, where a file declares it: 2 to
    MAX_CLASSES, printable, at most 64 characters, all different), mean and std."""
    names = d.class_names  # printed in tables by prepare, evaluate and predict
    want = len(names) if num_classes is None else num_classes
    if (len(names) != want or not 2 <= want <= MAX_CLASSES
            or not all(0 < len(n) <= 64 and n.isprintable() for n in names)):
        raise PartrainError(f"{where}: expected {want} class names (2 to {MAX_CLASSES}, "
                            f"printable, at most 64 characters), got {len(names)}: "
                            f"{excerpt(names)}")
    if len(set(names)) != len(names):
        raise PartrainError(f"{where}: class names must differ, got {excerpt(names)}")
    for name in ("mean", "std"):
        v = getattr(d, name)
        if v.shape != (3,) or not np.all(np.isfinite(v)):
            raise PartrainError(f"{where}: attribute {name} must be 3 finite numbers, got "
                                f"{excerpt(v)}")
    if not np.all(d.std > 0):
        raise PartrainError(f"{where}: every channel's std must be positive, got {d.std}")


def check_image_shape(shape, where: str) -> None:
    """RGB images of MIN_SIDE to MAX_SIDE pixels a side."""
    shape = tuple(shape)
    if (len(shape) != 3 or shape[0] != 3
            or not all(MIN_SIDE <= s <= MAX_SIDE for s in shape[1:])):
        raise PartrainError(f"{where}: images must be 3 x H x W with H and W from {MIN_SIDE} to "
                            f"{MAX_SIDE}, got {excerpt(shape)}")


def check_split(ishape, idtype, lshape, ldtype, split: str, where: str,
                image_shape=IMAGE_SHAPE, want_ldtype=None, allow_empty: bool = False) -> None:
    """Shapes and dtypes of a split's arrays: images (N, *image_shape) uint8 (any 3 x H x W
    when image_shape is None), labels (N,) of `want_ldtype` (a file's: uint8 or uint16 by its
    class count), or of any integer dtype when None (data to write: converted when written)."""
    n = ishape[0] if len(ishape) else 0
    want = "(N, 3, H, W)" if image_shape is None else "(N, " + ", ".join(map(str, image_shape)) + ")"
    if (len(ishape) != 4 or idtype != np.uint8
            or (image_shape is not None and tuple(ishape[1:]) != tuple(image_shape))):
        raise PartrainError(f"{where}: {split}/images must be {want} uint8, "
                            f"got {excerpt(tuple(ishape))} {excerpt(str(idtype), 40)}")
    ok = ldtype == want_ldtype if want_ldtype is not None else np.dtype(ldtype).kind in "iu"
    if tuple(lshape) != (n,) or not ok:
        kind = "integers" if want_ldtype is None else str(np.dtype(want_ldtype))
        raise PartrainError(f"{where}: {split}/labels must be ({n},) {kind}, got "
                            f"{excerpt(tuple(lshape))} {excerpt(str(ldtype), 40)}")
    if n == 0 and not allow_empty:
        raise PartrainError(f"{where}: the {split} split is empty")


def check_labels(labels: np.ndarray, split: str, where: str, num_classes: int = NUM_CLASSES):
    if labels.size and (int(labels.max()) >= num_classes or int(labels.min()) < 0):
        bad = int(labels.max()) if int(labels.max()) >= num_classes else int(labels.min())
        raise PartrainError(f"{where}: {split} labels must lie in 0..{num_classes - 1}, "
                            f"found {bad}")


from .store_writer import StoreWriter, write_store  # noqa: E402  (the writer builds on the above)

__all__ = ["CifarData", "ChannelSums", "StoreWriter", "channel_stats", "inspect_store",
           "load_store", "write_store"]

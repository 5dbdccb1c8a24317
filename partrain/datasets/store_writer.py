"""Writing a store (the schema is in store.py): atomically, and in chunks when the images come as
a stream (an image folder of any size is decoded a few hundred images at a time).

`StoreWriter` is the one writer: `write_store` hands it whole arrays, `prepare --images` one
decoded chunk after another. Images go into a temp file in the destination folder; `finish`
records the statistics and digests, fsyncs and renames it over the destination; any failure
(disk full, read-only folder, a bad image, Ctrl-C) removes the temp file and leaves whatever was
at the destination as it was. The digests and channel statistics are accumulated chunk by chunk,
so they equal those of the whole arrays (sha256 of the C-order bytes; exact integer sums).
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from pathlib import Path

import h5py
import numpy as np

from ..errors import PartrainError
from . import store
from .store import SPLITS, CifarData, ChannelSums, os_reason, printable

CHUNK_BYTES = 1 << 20  # HDF5 chunk of the image datasets: about 1 MiB of images


class StoreWriter:
    """A store being written. Use as a context manager; `add(split, images, labels)` any number
    of times per split (train and test may alternate), then `finish()`."""

    def __init__(self, path, image_shape, class_names, source_name: str, source_sha256: str,
                 expected: dict[str, int] | None = None):
        """expected: about how many images each split will get (a smaller HDF5 chunk for a
        small split: a chunk is allocated whole)."""
        self.path = Path(path)
        self.expected = expected or {}
        self.image_shape = tuple(int(v) for v in image_shape)
        self.class_names = [str(n) for n in class_names]
        self.label_dtype = store.label_dtype(len(self.class_names))
        self.header = CifarData(None, None, None, None, self.class_names, np.zeros(3, np.float32),
                                np.ones(3, np.float32), printable(str(source_name)),
                                str(source_sha256), store.SCHEMA_VERSION, self.path,
                                image_shape=self.image_shape)
        store.check_header(self.header, "data to write")
        store.check_image_shape(self.image_shape, "data to write")
        self.counts = {s: 0 for s in SPLITS}
        self.hashes = {f"{s}_{k}": hashlib.sha256() for s in SPLITS for k in ("images", "labels")}
        self.sums = ChannelSums(self.image_shape[0])
        self.tmp: Path | None = None
        self.file = None

    def __enter__(self) -> "StoreWriter":
        folder = self.path.parent
        try:
            fd, name = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=folder)
        except OSError as e:
            raise PartrainError(f"cannot write to {folder}: {os_reason(e)}") from None
        os.close(fd)
        self.tmp = Path(name)
        try:
            self.file = h5py.File(self.tmp, "w")
            for split in SPLITS:
                rows = max(1, min(CHUNK_BYTES // int(np.prod(self.image_shape)),
                                  self.expected.get(split, 1 << 30)))
                g = self.file.create_group(split)
                g.create_dataset("images", (0,) + self.image_shape, np.uint8,
                                 maxshape=(None,) + self.image_shape,
                                 chunks=(rows,) + self.image_shape)
                g.create_dataset("labels", (0,), self.label_dtype, maxshape=(None,),
                                 chunks=(min(max(rows, 4096), self.expected.get(split, 4096)),))
        except OSError as e:
            self._discard()
            raise PartrainError(f"cannot write {self.path}: {os_reason(e)}") from None
        return self

    def __exit__(self, kind, value, tb):
        if self.tmp is not None:  # not finished: an exception (or no finish call)
            self._discard()
        return False

    def add(self, split: str, images: np.ndarray, labels: np.ndarray) -> None:
        """Append a chunk of uint8 (n, *image_shape) images with their labels to `split`."""
        images, labels = np.ascontiguousarray(images), np.ascontiguousarray(labels)
        store.check_split(images.shape, images.dtype, labels.shape, labels.dtype, split,
                          "data to write", image_shape=self.image_shape, allow_empty=True)
        store.check_labels(labels, split, "data to write", len(self.class_names))
        labels = labels.astype(self.label_dtype, copy=False)
        n0, n = self.counts[split], len(labels)
        try:
            for kind, array in (("images", images), ("labels", labels)):
                ds = self.file[split][kind]
                ds.resize(n0 + n, axis=0)
                ds[n0:n0 + n] = array
                self.hashes[f"{split}_{kind}"].update(array.data)
        except OSError as e:
            raise PartrainError(f"cannot write {self.path}: {os_reason(e)}") from None
        if split == "train":
            self.sums.add(images)
        self.counts[split] = n0 + n

    def finish(self, source_sha256: str | None = None) -> CifarData:
        """Attributes, fsync, rename: the store is now at `path`. Returns its header.
        source_sha256: the source's digest, if it was known only once all of it was read."""
        if source_sha256 is not None:
            self.header.source_sha256 = str(source_sha256)
        for split in SPLITS:
            if self.counts[split] == 0:
                raise PartrainError(f"data to write: the {split} split is empty")
        mean, std = self.sums.result()
        data = self.header
        data.mean, data.std = mean, std
        data.digests = {name: h.hexdigest() for name, h in self.hashes.items()}
        store.check_header(data, "data to write")
        try:
            _write_attrs(self.file, data)
            self.file.close()
            os.chmod(self.tmp, 0o666 & ~_umask())  # mkstemp made it private: a normal file's mode
            with open(self.tmp, "rb+") as f:
                os.fsync(f.fileno())  # the bytes are on disk before the name points at them
            os.replace(self.tmp, self.path)
            _fsync_dir(self.path.parent)
        except OSError as e:
            self._discard()
            raise PartrainError(f"cannot write {self.path}: {os_reason(e)}") from None
        self.tmp = None
        return data

    def _discard(self) -> None:
        with contextlib.suppress(Exception):
            if self.file is not None:
                self.file.close()
        if self.tmp is not None:
            with contextlib.suppress(OSError):
                self.tmp.unlink()
        self.tmp = None


def _write_attrs(f, data: CifarData) -> None:
    f.attrs["format"] = store.FORMATS[store.SCHEMA_VERSION]
    f.attrs["schema_version"] = np.int64(data.schema_version)
    f.attrs["image_shape"] = np.asarray(data.image_shape, np.int64)
    f.attrs["num_classes"] = np.int64(len(data.class_names))
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
    """Write a store of whole arrays atomically (see the module doc); returns it, arrays
    included. The image shape is the arrays' own; the class count is len(class_names)."""
    arrays = dict(train_images=np.asarray(train_images), train_labels=np.asarray(train_labels),
                  test_images=np.asarray(test_images), test_labels=np.asarray(test_labels))
    shape = arrays["train_images"].shape
    store.check_split(shape, arrays["train_images"].dtype, arrays["train_labels"].shape,
                      arrays["train_labels"].dtype, "train", "data to write",
                      image_shape=tuple(shape[1:]) if len(shape) == 4 else None)
    sizes = {split: max(1, len(arrays[f"{split}_labels"])) for split in SPLITS}
    with StoreWriter(path, shape[1:], class_names, source_name, source_sha256, sizes) as w:
        for split in SPLITS:
            w.add(split, arrays[f"{split}_images"], arrays[f"{split}_labels"])
        data = w.finish()
    for name, array in arrays.items():
        setattr(data, name, array.astype(w.label_dtype) if name.endswith("labels") else array)
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

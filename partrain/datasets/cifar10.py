"""CIFAR-10: download the official archive, and read either official layout into numpy arrays.

Two layouts are read, as a `.tar.gz` (streamed member by member, never extracted to disk) or as
an already-extracted folder:

- binary (`cifar-10-binary.tar.gz`): `cifar-10-batches-bin/data_batch_{1..5}.bin`,
  `test_batch.bin`, `batches.meta.txt`; each record is 3073 bytes: a label byte, then 1024 red,
  1024 green and 1024 blue bytes (row-major 32x32).
- python (`cifar-10-python.tar.gz`): `cifar-10-batches-py/data_batch_{1..5}`, `test_batch`,
  `batches.meta`: pickled dicts. Pickles can run code when loaded, so they are read by
  `SafeUnpickler`, which resolves only the three numpy names an array needs.
- CIFAR-100's python layout (`cifar-100-python.tar.gz`) goes through the same reading; its
  pickles are decoded by cifar100.py.

Everything that can go wrong with the user's input becomes a one-line `PartrainError`.
"""
from __future__ import annotations

import gzip
import hashlib
import http.client
import io
import os
import tarfile
import urllib.error
import urllib.request
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import PartrainError
from . import cifar100
from .safepickle import unpickle

URL = "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz"
MD5 = "c32a1d4ab5d03f1284b67883e8d87530"
ARCHIVE_NAME = "cifar-10-binary.tar.gz"

RECORD_BYTES = 1 + 3 * 32 * 32
TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
LAYOUTS = {  # layout -> (top folder, {role: file name})
    "binary": ("cifar-10-batches-bin", {
        **{b: b + ".bin" for b in TRAIN_BATCHES}, "test_batch": "test_batch.bin",
        "meta": "batches.meta.txt"}),
    "python": ("cifar-10-batches-py", {
        **{b: b for b in TRAIN_BATCHES}, "test_batch": "test_batch", "meta": "batches.meta"}),
    "cifar100": (cifar100.TOP, cifar100.FILES),  # CIFAR-100's python layout (cifar100.py)
}
MAX_MEMBER_BYTES = 1 << 26  # CIFAR-10's largest file is 31 MB; a gzip bomb's are refused unread
OFFLINE_HINT = ("on a machine without internet, copy cifar-10-binary.tar.gz (or "
                "cifar-10-python.tar.gz) here and run: partrain prepare --source PATH")


@dataclass
class RawCifar:
    """What one archive or folder holds, as arrays in the store's layout."""

    train_images: np.ndarray  # (N, 3, 32, 32) uint8
    train_labels: np.ndarray  # (N,) uint8
    test_images: np.ndarray
    test_labels: np.ndarray
    class_names: list[str]
    layout: str               # "binary" or "python"
    source_name: str
    source_sha256: str


# ------------------------------------------------------------------------------ decoding batches

def decode_binary_batch(buf: bytes, where: str) -> tuple[np.ndarray, np.ndarray]:
    """One binary batch (records of label byte + 3072 pixel bytes) -> (images, labels)."""
    if len(buf) == 0 or len(buf) % RECORD_BYTES:
        raise PartrainError(f"{where}: {len(buf)} bytes is not a whole number of "
                            f"{RECORD_BYTES}-byte records (wrong record length or truncated file)")
    rec = np.frombuffer(buf, np.uint8).reshape(-1, RECORD_BYTES)
    labels, images = rec[:, 0].copy(), rec[:, 1:].reshape(-1, 3, 32, 32).copy()
    _check_labels(labels, where)
    return images, labels


def decode_binary_meta(buf: bytes, where: str) -> list[str]:
    try:
        names = [line.strip() for line in buf.decode("utf-8").splitlines() if line.strip()]
    except UnicodeDecodeError:
        raise PartrainError(f"{where}: class names are not text") from None
    return _check_names(names, where)


def decode_python_batch(buf: bytes, where: str) -> tuple[np.ndarray, np.ndarray]:
    """One pickled batch {b'data': (N, 3072) uint8, b'labels': [int]} -> (images, labels)."""
    d = unpickle(buf, where)
    if not isinstance(d, dict) or b"data" not in d or b"labels" not in d:
        raise PartrainError(f"{where}: expected a dict with b'data' and b'labels'")
    data, labels = (np.asarray(v) if isinstance(v, np.ndarray) else v  # plain ndarray again
                    for v in (d[b"data"], d[b"labels"]))
    if (not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2
            or data.shape[1] != RECORD_BYTES - 1 or data.shape[0] == 0):
        shape = getattr(data, "shape", None)
        raise PartrainError(f"{where}: b'data' must be an (N, 3072) uint8 array, got "
                            f"{type(data).__name__} {shape} {getattr(data, 'dtype', '')}")
    # a flat list of ints, checked before numpy sees it: np.asarray of a list of 20 shared
    # lists nested 26 deep builds 20 * 2**26 elements (GBs) from a pickle of a few hundred bytes
    flat = (labels.ndim == 1 and labels.dtype.kind in "iub" if isinstance(labels, np.ndarray)
            else isinstance(labels, list) and all(type(v) is int and -99 < v < 99 for v in labels))
    if not flat or len(labels) != data.shape[0]:
        raise PartrainError(f"{where}: b'labels' must be a flat list of {data.shape[0]} "
                            "integers in 0..9")
    labels = np.asarray(labels, np.int64)
    _check_labels(labels, where)
    return np.array(data, np.uint8, order="C").reshape(-1, 3, 32, 32), labels.astype(np.uint8)


def decode_python_meta(buf: bytes, where: str) -> list[str]:
    d = unpickle(buf, where)
    names = d.get(b"label_names") if isinstance(d, dict) else None
    if not isinstance(names, list) or not all(isinstance(n, (bytes, str)) for n in names):
        raise PartrainError(f"{where}: expected a dict with b'label_names' (a list of names)")
    try:
        names = [n.decode("utf-8") if isinstance(n, bytes) else n for n in names]
    except UnicodeDecodeError:
        raise PartrainError(f"{where}: class names are not text") from None
    return _check_names(names, where)


def _check_labels(labels: np.ndarray, where: str) -> None:
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        bad = labels[(labels < 0) | (labels > 9)][0]
        raise PartrainError(f"{where}: label {int(bad)} is outside 0..9")


def _check_names(names: list[str], where: str) -> list[str]:
    if len(names) != 10:
        raise PartrainError(f"{where}: expected 10 class names, found {len(names)}")
    return names


# ------------------------------------------------------------------------- reading a whole source

def read_source(path, labels: str = "fine") -> RawCifar:
    """Read a CIFAR-10 `.tar.gz` (either layout), a CIFAR-100 python `.tar.gz` (its `labels`:
    fine or coarse), or an extracted folder of any of them."""
    path = Path(path)
    if not path.exists():
        raise PartrainError(f"source {path} does not exist")
    layout, files, digest = (_read_folder if path.is_dir() else _read_archive)(path)
    return _assemble(layout, files, path.resolve().name, digest, str(path), labels)


def _assemble(layout: str, files: dict[str, bytes], source_name: str, digest: str,
              where: str, labels: str = "fine") -> RawCifar:
    top, names = LAYOUTS[layout]
    loc = {role: f"{where}: {top}/{name}" for role, name in names.items()}
    if layout == "cifar100":
        class_names = cifar100.decode_meta(files.pop("meta"), loc["meta"], labels)
        test_images, test_labels = cifar100.decode_batch(files.pop("test_batch"),
                                                         loc["test_batch"], labels)
        train_images, train_labels = cifar100.decode_batch(files.pop("train"), loc["train"],
                                                           labels)
        return RawCifar(train_images, train_labels, test_images, test_labels, class_names,
                        f"CIFAR-100 python layout, {labels} labels", source_name, digest)
    if labels != "fine":
        raise PartrainError(f"--labels {labels} is for CIFAR-100; {where} is CIFAR-10")
    decode_batch = decode_binary_batch if layout == "binary" else decode_python_batch
    decode_meta = decode_binary_meta if layout == "binary" else decode_python_meta
    class_names = decode_meta(files.pop("meta"), loc["meta"])
    test_images, test_labels = decode_batch(files.pop("test_batch"), loc["test_batch"])
    parts = [decode_batch(files.pop(b), loc[b]) for b in TRAIN_BATCHES]  # raw bytes freed as we go
    train_images = np.concatenate([p[0] for p in parts])
    train_labels = np.concatenate([p[1] for p in parts])
    del parts
    return RawCifar(train_images, train_labels, test_images, test_labels, class_names, layout,
                    source_name, digest)


def _limit(layout: str) -> int:
    """The largest member (or file) a layout may have: CIFAR-100's train pickle is 155 MB."""
    return cifar100.MAX_MEMBER_BYTES if layout == "cifar100" else MAX_MEMBER_BYTES


def _read_folder(path: Path) -> tuple[str, dict[str, bytes], str]:
    """A folder that is (or contains) cifar-10-batches-bin/ or cifar-10-batches-py/."""
    for layout, (top, names) in LAYOUTS.items():
        for folder in (path / top, path):
            if folder.is_dir() and (folder / next(iter(names.values()))).is_file():
                files, h = {}, hashlib.sha256()
                for role, name in names.items():
                    f = folder / name
                    if not f.is_file():
                        raise PartrainError(f"{folder} has no {name} (incomplete {layout} layout)")
                    if f.stat().st_size > _limit(layout):  # a link to some huge file
                        raise PartrainError(f"{f} is {f.stat().st_size} bytes, far too large")
                    try:
                        files[role] = f.read_bytes()
                    except OSError as e:
                        raise PartrainError(f"cannot read {f}: {e.strerror or e}") from None
                    # the digest of a folder covers each file's name and content, in a fixed order
                    h.update(f"{name}\0{len(files[role])}\0".encode())
                    h.update(files[role])
                return layout, files, h.hexdigest()
    raise PartrainError(f"{path} holds no CIFAR-10 batches (expected cifar-10-batches-bin/ or "
                        "cifar-10-batches-py/ with data_batch_1..5, test_batch and the meta file, "
                        "or CIFAR-100's cifar-100-python/)")


class _HashingReader(io.RawIOBase):
    """A read-only file wrapper that feeds every byte it passes on into a sha256."""

    def __init__(self, f):
        self.f, self.sha256 = f, hashlib.sha256()

    def readable(self):
        return True

    def readinto(self, b):
        n = self.f.readinto(b)
        if n:
            self.sha256.update(memoryview(b)[:n])
        return n


def _read_archive(path: Path) -> tuple[str, dict[str, bytes], str]:
    """Stream a (gzipped) tar once: collect the needed members in memory, hash the file bytes."""
    where = str(path)
    try:
        raw = open(path, "rb")
    except OSError as e:
        raise PartrainError(f"cannot open source {path}: {e.strerror or e}") from None
    with raw:
        magic = raw.read(2)
        raw.seek(0)
        hashing = _HashingReader(raw)
        buffered = io.BufferedReader(hashing, buffer_size=1 << 20)
        stream = gzip.GzipFile(fileobj=buffered, mode="rb") if magic == b"\x1f\x8b" else buffered
        try:
            layout, files = _collect_members(stream, where)
            for s in (stream, buffered):  # to the very end: gzip checks its CRC and length,
                while s.read(1 << 20):         # and the hash is whole
                    pass
        except PartrainError:
            raise
        except (EOFError, gzip.BadGzipFile, zlib.error) as e:
            raise PartrainError(f"{where}: truncated or corrupt gzip data ({e})") from None
        except tarfile.TarError as e:
            msg = str(e) or type(e).__name__
            raise PartrainError(f"{where}: not a readable tar archive ({msg}); expected "
                                "cifar-10-binary.tar.gz, cifar-10-python.tar.gz or a folder") from None
        except OSError as e:
            raise PartrainError(f"cannot read {where}: {e.strerror or e}") from None
    return layout, files, hashing.sha256.hexdigest()


def _collect_members(stream, where: str) -> tuple[str, dict[str, bytes]]:
    wanted = {f"{top}/{name}": (layout, role)
              for layout, (top, names) in LAYOUTS.items() for role, name in names.items()}
    found: dict[str, dict[str, bytes]] = {layout: {} for layout in LAYOUTS}
    with tarfile.open(fileobj=stream, mode="r|") as tar:
        for m in tar:
            name = m.name[2:] if m.name.startswith("./") else m.name
            if name not in wanted:
                continue  # readme.html, folders, anything else: not needed
            layout, role = wanted[name]
            if not m.isfile():
                raise PartrainError(f"{where}: {name} is not a regular file")
            if role in found[layout]:
                raise PartrainError(f"{where}: {name} appears twice")
            if m.size > _limit(layout):
                raise PartrainError(f"{where}: {name} is {m.size} bytes, far too large")
            if layout == "binary" and role != "meta" and (m.size == 0 or m.size % RECORD_BYTES):
                raise PartrainError(f"{where}: {name}: {m.size} bytes is not a whole number of "
                                    f"{RECORD_BYTES}-byte records (wrong record length)")
            data = tar.extractfile(m).read()
            if len(data) != m.size:
                raise PartrainError(f"{where}: {name} is truncated")
            found[layout][role] = data
    present = [lay for lay in LAYOUTS if found[lay]]
    if not present:
        raise PartrainError(f"{where} holds no CIFAR-10 batches (expected cifar-10-batches-bin/ "
                            "or cifar-10-batches-py/ with data_batch_1..5, test_batch and meta)")
    if len(present) > 1:
        raise PartrainError(f"{where} mixes the {' and '.join(present)} layouts; use one of them")
    layout = present[0]
    top, names = LAYOUTS[layout]
    missing = [f"{top}/{names[r]}" for r in names if r not in found[layout]]
    if missing:
        raise PartrainError(f"{where} is missing {', '.join(missing)}")
    return layout, found[layout]


# ------------------------------------------------------------------------------------ downloading

def file_md5(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def download(url: str, dest, md5: str | None = MD5, *, timeout: float = 30.0,
             progress: bool = True) -> Path:
    """Download `url` to `dest` via `dest.part`, renamed only once complete and md5-verified.

    A `.part` left by an interrupted run is continued with an HTTP Range request (or started
    over if the server ignores it); a `.part` that fails the md5 is removed, so a rerun starts
    clean. Nothing named `dest` ever exists unless it is whole.
    """
    dest = Path(dest)
    part = dest.with_name(dest.name + ".part")
    for attempt in range(2):
        resumed = _fetch(url, part, timeout, progress)
        got = file_md5(part) if md5 else None
        if md5 and got != md5:
            part.unlink()
            if resumed and attempt == 0:
                continue  # the bytes kept from last time were bad: one clean retry from zero
            raise PartrainError(f"downloaded {url} has md5 {got}, expected {md5}; removed it, "
                                "rerun to download again")
        os.replace(part, dest)
        return dest
    raise AssertionError("unreachable")


def _fetch(url: str, part: Path, timeout: float, progress: bool) -> bool:
    """Bring `part` up to the full file; returns whether it continued earlier bytes."""
    from tqdm import tqdm

    have = part.stat().st_size if part.exists() else 0
    headers = {"User-Agent": "partrain"}
    if have:
        headers["Range"] = f"bytes={have}-"
    try:
        resp = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416 and have:
            return True  # nothing left to fetch: the .part may already be whole; md5 decides
        raise PartrainError(f"download of {url} failed: HTTP {e.code} {e.reason}") from None
    except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
        reason = getattr(e, "reason", None) or e
        raise PartrainError(f"cannot download {url} ({reason}); {OFFLINE_HINT}") from None
    with resp:
        content_range = resp.headers.get("Content-Range", "")
        resumed = bool(have) and resp.status == 206 and content_range.startswith(f"bytes {have}-")
        if not resumed:
            have = 0  # server sent the whole file: start over
        length = resp.headers.get("Content-Length")
        total = have + int(length) if length and length.isdigit() else None
        got = have
        try:
            with open(part, "ab" if resumed else "wb") as f, \
                    tqdm(total=total, initial=have, unit="B", unit_scale=True, unit_divisor=1024,
                         desc=part.name[:-5], disable=not progress, leave=False) as bar:
                while True:
                    try:
                        chunk = resp.read(1 << 16)
                    except (http.client.HTTPException, OSError) as e:
                        raise PartrainError(f"download of {url} interrupted after {got} bytes "
                                            f"({type(e).__name__}); rerun to continue it") from None
                    if not chunk:
                        break
                    f.write(chunk)
                    got += len(chunk)
                    bar.update(len(chunk))
        except OSError as e:  # opening or writing the .part: disk full, read-only folder
            raise PartrainError(f"cannot write {part}: {e.strerror or e}") from None
    if total is not None and got != total:
        raise PartrainError(f"download of {url} stopped after {got} of {total} bytes; "
                            "rerun to continue it")
    return resumed

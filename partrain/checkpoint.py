"""Atomic checkpoints: named arrays plus JSON metadata in one HDF5 file.

A save writes a temporary file beside the target, fsyncs it, then `os.replace`s it over the target
and fsyncs the directory, so a writer killed at any moment leaves either the old checkpoint or the
new one, never a half-written file at `path`. Loading checks everything and turns any problem into
one PartrainError line, because resuming from a bad file is a user-fixable situation.

File layout (format version 1): root attributes `format`, `format_version`, `partrain_version`;
group `arrays` with one dataset per array (exact dtype and shape, uncompressed); scalar string
dataset `meta` holding the JSON text. (meta is a dataset, not an attribute: HDF5 attributes are
limited to 64 KB in the default file format and meta may hold a whole run history.)

The file starts with a 512-byte HDF5 user block (which HDF5 itself skips) holding the sha256 of
everything after it. `load_checkpoint` checks it before HDF5 parses a byte: a single flipped bit
in HDF5's own metadata can send the library into an endless loop inside `h5py.File` (seen in
fuzzing), which no timeout in Python can interrupt. Files written before the seal (they start with
HDF5's signature) are still read, unchecked.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import secrets
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from . import __version__
from .errors import PartrainError

FORMAT = "partrain-checkpoint"
FORMAT_VERSION = 1
USERBLOCK = 512  # bytes before HDF5's superblock: SEAL, the hex sha256 of the rest, a newline
SEAL = b"partrain-checkpoint sha256 "
HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"


def save_checkpoint(path: str | os.PathLike, arrays: dict[str, np.ndarray],
                    meta: dict[str, Any]) -> Path:
    """Write `arrays` and JSON-serialisable `meta` to `path` atomically; returns the path.

    numpy scalars and arrays inside meta are converted to Python numbers and lists.
    """
    path = Path(path)
    meta_text = json.dumps(meta, default=_to_json)  # fail before touching the disk
    arrays = {_check_name(k): np.asarray(v) for k, v in arrays.items()}
    for k, v in arrays.items():
        if v.dtype.hasobject:
            raise ValueError(f"array {k!r} has dtype object; checkpoints hold numeric arrays")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}.{secrets.token_hex(4)}")
    try:
        with h5py.File(tmp, "w-", userblock_size=USERBLOCK) as f:
            f.attrs["format"] = FORMAT
            f.attrs["format_version"] = FORMAT_VERSION
            f.attrs["partrain_version"] = __version__
            group = f.create_group("arrays")
            for k, v in arrays.items():
                group.create_dataset(k, data=v)
            f.create_dataset("meta", data=meta_text, dtype=h5py.string_dtype("utf-8"))
        _seal(tmp)
        _fsync(tmp)
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise PartrainError(f"could not write checkpoint {path}: {_one_line(e)}") from e
        raise
    _fsync(path.parent, directory=True)  # make the rename itself durable
    _remove_stale_temps(path)
    return path


def load_checkpoint(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """(arrays, meta) from a checkpoint; PartrainError if missing, damaged, foreign or too new.

    The bytes are read once and checked against the seal; HDF5 then parses that same copy."""
    path = Path(path)
    if not path.is_file():
        raise PartrainError(f"checkpoint {path} does not exist" if not path.exists()
                            else f"checkpoint {path} is not a file")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise PartrainError(f"cannot read checkpoint {path}: {_one_line(e)}") from None
    _check_seal(path, data)
    try:
        f = h5py.File(io.BytesIO(data), "r")
    except (OSError, ValueError) as e:
        raise PartrainError(f"{path} is not a readable checkpoint (truncated or not HDF5): "
                            f"{_one_line(e)}") from None
    try:
        with f:
            _check_format(path, f)
            group = f.get("arrays")
            if not isinstance(group, h5py.Group):
                raise PartrainError(f"checkpoint {path} is damaged: it has no group of arrays")
            arrays = {k: _read_dataset(path, group, k, len(data)) for k in group}
            raw = _read_dataset(path, f, "meta", len(data))
            meta = json.loads(raw.decode("utf-8") if isinstance(raw, bytes) else raw)
    except PartrainError:
        raise
    except (OSError, KeyError, ValueError, TypeError, RuntimeError, AttributeError) as e:
        raise PartrainError(f"checkpoint {path} is damaged: {_one_line(e)}") from None
    if not isinstance(meta, dict):
        raise PartrainError(f"checkpoint {path} is damaged: meta is not a JSON object")
    return {k: np.asarray(v) for k, v in arrays.items()}, meta


def _check_seal(path: Path, data: bytes) -> None:
    """PartrainError unless `data` starts with a seal that matches the rest, or is an unsealed
    HDF5 file (a checkpoint from before the seal, or a foreign file)."""
    if data.startswith(HDF5_SIGNATURE):
        return
    if not data.startswith(SEAL) or len(data) <= USERBLOCK:
        raise PartrainError(f"{path} is not a readable checkpoint (truncated or not HDF5)")
    if data[:USERBLOCK] != _userblock(hashlib.sha256(memoryview(data)[USERBLOCK:])):
        raise PartrainError(f"checkpoint {path} is damaged: its bytes do not match the sha256 "
                            f"it was written with (truncated or changed on disk)")


def _check_format(path: Path, f: h5py.File) -> None:
    if f.attrs.get("format") != FORMAT:
        raise PartrainError(f"{path} is an HDF5 file but not a partrain checkpoint")
    version = int(f.attrs.get("format_version", -1))
    if version > FORMAT_VERSION:
        raise PartrainError(
            f"{path} has checkpoint format {version}, written by partrain "
            f"{f.attrs.get('partrain_version', '?')}; this partrain {__version__} reads "
            f"up to format {FORMAT_VERSION}: upgrade partrain")
    if version < 1:
        raise PartrainError(f"{path} has an invalid checkpoint format version {version}")


def _read_dataset(path: Path, group, name: str, file_size: int):
    """group[name]'s value. The writer stores plain uncompressed datasets, so one that is not a
    dataset, is filtered or declares more bytes than the file holds is refused before reading:
    HDF5 would otherwise allocate whatever a hostile or damaged header declares."""
    ds = group.get(name)
    if not isinstance(ds, h5py.Dataset):
        raise PartrainError(f"checkpoint {path} is damaged: {name} is not a dataset")
    if ds.compression is not None:
        raise PartrainError(f"checkpoint {path} is damaged: dataset {name} is compressed")
    if ds.nbytes > file_size:
        raise PartrainError(f"checkpoint {path} is damaged: dataset {name} declares "
                            f"{ds.nbytes:,} bytes in a file of {file_size:,}")
    return ds[()]


# -- helpers -------------------------------------------------------------------------------------

def _check_name(name: str) -> str:
    if not isinstance(name, str) or not name or "/" in name or name in (".", ".."):
        raise ValueError(f"bad array name {name!r}: use a non-empty string without '/'")
    return name


def _seal(path: Path) -> None:
    """Write the seal into the user block of the closed HDF5 file at `path`."""
    h = hashlib.sha256()
    with open(path, "r+b") as f:
        f.seek(USERBLOCK)
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
        f.seek(0)
        f.write(_userblock(h))


def _userblock(h) -> bytes:
    """The user block for a file whose bytes after it hash to h (zero padding included)."""
    return (SEAL + h.hexdigest().encode() + b"\n").ljust(USERBLOCK, b"\0")


def _to_json(x: Any) -> Any:
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, os.PathLike):
        return os.fspath(x)
    raise TypeError(f"meta value of type {type(x).__name__} is not JSON-serialisable")


def _fsync(path: Path, directory: bool = False) -> None:
    """Flush a file to disk (errors raise); for a directory, best effort (some filesystems refuse)."""
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        if not directory:
            raise


def _remove_stale_temps(path: Path) -> None:
    """Delete temporaries of `path` left by writers that were killed (their pid is gone)."""
    for tmp in path.parent.glob(f".{path.name}.tmp.*"):
        if is_stale_temp(tmp):
            tmp.unlink(missing_ok=True)


def is_stale_temp(tmp: Path) -> bool:
    """Whether `tmp` is a save's temporary (`.<name>.tmp.<pid>.<hex>`) whose writer is gone: a
    SIGKILL during a save leaves one, and it is no part of the run."""
    parts = Path(tmp).name.split(".")
    if len(parts) < 5 or parts[0] != "" or parts[-3] != "tmp":
        return False
    try:
        pid = int(parts[-2])
    except ValueError:
        return False
    return pid != os.getpid() and not pid_alive(pid)


def pid_alive(pid: int) -> bool:
    """Whether process `pid` exists (a stale temporary's writer is gone when it does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # exists but belongs to someone else
    return True


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__

"""The restricted unpickler for CIFAR-10's python layout (its batches are pickles: untrusted
bytes from a download). Only plain containers and numpy arrays of numbers come out, every array
holding its own bytes from the pickle, so nothing runs and nothing grows past the pickle's size.
"""
from __future__ import annotations

import io
import math
import pickle

import numpy as np

try:
    from numpy._core import multiarray  # numpy >= 2
except ImportError:  # pragma: no cover - numpy 1.x
    from numpy.core import multiarray

from ..errors import PartrainError
from .store import excerpt


class RefusedGlobal(pickle.UnpicklingError):
    """A pickle named a global that `SafeUnpickler` does not allow, or misused an allowed one."""


def _ndarray(*args):
    """`numpy.ndarray` for a pickle: the class `_reconstruct` builds, never called. Called, it takes
    any shape, buffer and strides: strides=(0, 1) makes one 3 KB image into as many as the shape
    asks for. (Functions stand in for numpy's names: a BUILD opcode changes nothing they do.)"""
    raise RefusedGlobal("refused to call numpy.ndarray directly (a stride trick?)")


def _reconstruct(subtype, shape, dtype):
    """numpy's pickles make an empty `_reconstruct(ndarray, (0,), b'b')`, filled by setstate."""
    if subtype is not _ndarray:
        raise RefusedGlobal("refused _reconstruct of anything but numpy.ndarray")
    return multiarray._reconstruct(_CheckedArray, (0,), b"b")


class _DtypeSpec:
    """What a pickle says `numpy.dtype(...)` is: a name and a byte order. numpy's own dtype
    setstate never sees the pickle; only the number types of `_DTYPES` become real dtypes."""

    __slots__ = ("name", "order")
    _DTYPES = {f"{k}{n}" for k in "iu" for n in (1, 2, 4, 8)} | {"f4", "f8", "b1"}

    def __init__(self, name, *_):
        self.name, self.order = (name.decode("latin-1") if type(name) is bytes else name), "|"

    def __setstate__(self, state):
        order = state[1] if isinstance(state, tuple) and len(state) >= 5 else None
        self.order = order.decode("ascii", "replace") if isinstance(order, bytes) else order
        if self.order not in ("<", ">", "|", "=") or any(s is not None for s in state[2:5]):
            raise RefusedGlobal("refused a numpy dtype that is not a plain number type")

    def dtype(self) -> np.dtype:
        if not isinstance(self.name, str) or self.name not in self._DTYPES:
            raise RefusedGlobal(f"refused numpy dtype {str(self.name)[:20]!r}")
        dt = np.dtype(self.name)
        return dt.newbyteorder(self.order) if self.order in "<>" else dt


class _CheckedArray(np.ndarray):
    """Filled only by a checked setstate (numpy's own segfaults on some states): a `_DtypeSpec`
    number type and exactly the bytes of its shape, from the pickle."""

    def __setstate__(self, state):
        ok = isinstance(state, tuple) and len(state) in (4, 5)
        shape, spec, fortran, raw = state[-4:] if ok else (None,) * 4
        if (not ok or not isinstance(shape, tuple) or len(shape) > 8
                or not all(type(s) is int and s >= 0 for s in shape) or type(raw) is not bytes
                or not isinstance(spec, _DtypeSpec) or not isinstance(fortran, int)):
            raise RefusedGlobal("refused an array state that numpy never writes")
        dtype = spec.dtype()
        if math.prod(shape) * dtype.itemsize != len(raw):
            raise RefusedGlobal(f"array of shape {str(shape)[:60]} does not match its "
                                f"{len(raw)} bytes")
        super().__setstate__((1, shape, dtype, bool(fortran), raw))


class SafeUnpickler(pickle._Unpickler):
    """Unpickler that can rebuild numpy arrays of numbers and plain containers, nothing else.

    Plain data (dict, list, bytes, str, int) needs no lookup at all; any other global a pickle
    names -- os.system, builtins.eval, subprocess.Popen -- is refused before it can run. The
    three numpy names are stand-ins (above) that let through only what numpy itself writes:
    every array holds its own bytes from the pickle, so never more memory than the pickle's size.
    This is pickle's pure-Python unpickler, whose memo is a dict: the C one grows an array to any
    index a PUT names (LONG_BINPUT 1426420068 in an 85-byte pickle: 11 GB and a minute).
    """

    _ALLOWED = {("numpy.core.multiarray", "_reconstruct"): _reconstruct,
                ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
                ("numpy", "ndarray"): _ndarray, ("numpy", "dtype"): lambda *a: _DtypeSpec(*a)}

    def find_class(self, module, name):
        obj = self._ALLOWED.get((module, name))
        if obj is None:
            raise RefusedGlobal(f"refused to load {excerpt(module, 60)}.{excerpt(name, 60)}")
        return obj


def unpickle(buf: bytes, where: str):
    """The object a CIFAR-10 python-layout pickle holds, or one PartrainError line."""
    try:
        return SafeUnpickler(io.BytesIO(buf), encoding="bytes").load()
    except RefusedGlobal as e:
        raise PartrainError(f"{where}: unsafe pickle, {e}; only the numpy arrays of "
                            "CIFAR-10 are accepted") from None
    except Exception as e:  # noqa: BLE001 - any failure to parse untrusted bytes is bad input
        raise PartrainError(f"{where}: not a CIFAR-10 pickle ({type(e).__name__}: "
                            f"{excerpt(str(e), 100)})") from None

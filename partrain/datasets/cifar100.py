"""CIFAR-100's python layout (`cifar-100-python.tar.gz`): `cifar-100-python/train`, `test` and
`meta`, pickled dicts read through the restricted unpickler (safepickle.py), like CIFAR-10's.

Every image has two labels: one of 100 fine classes ("apple", "aquarium_fish", ...) and one of 20
coarse superclasses ("fruit_and_vegetables", ...). A store holds one of them: fine by default,
as the published CIFAR-100 accuracies are (`partrain prepare --labels coarse` for the other).
The archive itself is read by cifar10.py's layout machinery (streamed, hashed, never extracted).
"""
from __future__ import annotations

import numpy as np

from ..errors import PartrainError
from .safepickle import unpickle

TOP = "cifar-100-python"
FILES = {"train": "train", "test_batch": "test", "meta": "meta"}  # role -> file name
LABELS = {"fine": 100, "coarse": 20}  # label kind -> number of classes
RECORD = 3 * 32 * 32
MAX_MEMBER_BYTES = 1 << 28  # its train pickle is 155 MB; anything far larger is refused unread


def decode_batch(buf: bytes, where: str, labels: str = "fine") -> tuple[np.ndarray, np.ndarray]:
    """A pickled split {b'data': (N, 3072) uint8, b'fine_labels': [int], b'coarse_labels': [int]}
    -> (images (N, 3, 32, 32) uint8, labels of kind `labels` as uint8)."""
    k = _kind(labels)
    d = unpickle(buf, where)
    key = f"{labels}_labels".encode()
    if not isinstance(d, dict) or b"data" not in d or key not in d:
        raise PartrainError(f"{where}: expected a dict with b'data' and {key!r}")
    data, y = d[b"data"], d[key]
    if (not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2
            or data.shape[1] != RECORD or data.shape[0] == 0):
        raise PartrainError(f"{where}: b'data' must be an (N, 3072) uint8 array, got "
                            f"{type(data).__name__} {getattr(data, 'shape', None)} "
                            f"{getattr(data, 'dtype', '')}")
    # a flat list of small ints, checked before numpy sees it (see cifar10.decode_python_batch)
    flat = (y.ndim == 1 and y.dtype.kind in "iu" if isinstance(y, np.ndarray)
            else isinstance(y, list) and all(type(v) is int and -999 < v < 999 for v in y))
    if not flat or len(y) != data.shape[0]:
        raise PartrainError(f"{where}: {key!r} must be a flat list of {data.shape[0]} integers "
                            f"in 0..{k - 1}")
    y = np.asarray(y, np.int64)
    if y.size and (y.min() < 0 or y.max() >= k):
        bad = y[(y < 0) | (y >= k)][0]
        raise PartrainError(f"{where}: {labels} label {int(bad)} is outside 0..{k - 1}")
    return np.array(data, np.uint8, order="C").reshape(-1, 3, 32, 32), y.astype(np.uint8)


def decode_meta(buf: bytes, where: str, labels: str = "fine") -> list[str]:
    """meta {b'fine_label_names': [...100], b'coarse_label_names': [...20]} -> the names of
    kind `labels`."""
    k = _kind(labels)
    d = unpickle(buf, where)
    key = f"{labels}_label_names".encode()
    names = d.get(key) if isinstance(d, dict) else None
    if not isinstance(names, list) or not all(isinstance(n, (bytes, str)) for n in names):
        raise PartrainError(f"{where}: expected a dict with {key!r} (a list of names)")
    try:
        names = [n.decode("utf-8") if isinstance(n, bytes) else n for n in names]
    except UnicodeDecodeError:
        raise PartrainError(f"{where}: class names are not text") from None
    if len(names) != k:
        raise PartrainError(f"{where}: expected {k} {labels} class names, found {len(names)}")
    return names


def _kind(labels: str) -> int:
    if labels not in LABELS:
        raise PartrainError(f"--labels must be one of {', '.join(LABELS)}, got {labels!r}")
    return LABELS[labels]

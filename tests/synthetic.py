"""Tiny synthetic CIFAR-10 look-alikes for tests: archives of both official layouts, and stores.

- `binary_members` / `python_members`: {member name: bytes} of a small archive, which a test can
  corrupt before `write_tar` packs it; `make_binary_archive` / `make_python_archive` do both.
- `make_tiny_store(path, n_train, n_test, seed)`: a valid cifar10.h5 whose images are learnable
  (each class has its own colour and a brighter quadrant, plus noise), for training tests.
"""
from __future__ import annotations

import io
import pickle
import struct
import tarfile
from pathlib import Path

import numpy as np

CLASS_NAMES = ["airplane", "automobile", "bird", "cat", "deer",
               "dog", "frog", "horse", "ship", "truck"]
BIN_TOP = "cifar-10-batches-bin"
PY_TOP = "cifar-10-batches-py"


def random_split(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """n random uint8 images (n, 3, 32, 32) and labels 0..9 (n,)."""
    images = rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8)
    labels = rng.integers(0, 10, n).astype(np.uint8)
    return images, labels


def make_splits(n_per_batch: int = 40, n_test: int = 50, seed: int = 0):
    """Five train batches and one test batch: {batch name: (images, labels)}."""
    rng = np.random.default_rng(seed)
    batches = {f"data_batch_{i}": random_split(n_per_batch, rng) for i in range(1, 6)}
    batches["test_batch"] = random_split(n_test, rng)
    return batches


def expected_arrays(batches):
    """(train_images, train_labels, test_images, test_labels) that `prepare` should store."""
    train = [batches[f"data_batch_{i}"] for i in range(1, 6)]
    return (np.concatenate([b[0] for b in train]), np.concatenate([b[1] for b in train]),
            batches["test_batch"][0], batches["test_batch"][1])


def binary_records(images: np.ndarray, labels: np.ndarray) -> bytes:
    """The official binary encoding: per record, a label byte then 3072 pixel bytes (R, G, B)."""
    rec = np.empty((len(labels), 3073), np.uint8)
    rec[:, 0] = labels
    rec[:, 1:] = images.reshape(len(labels), -1)
    return rec.tobytes()


def binary_members(batches, class_names=CLASS_NAMES) -> dict[str, bytes]:
    members = {f"{BIN_TOP}/batches.meta.txt": ("\n".join(class_names) + "\n\n").encode()}
    for name, (images, labels) in batches.items():
        members[f"{BIN_TOP}/{name}.bin"] = binary_records(images, labels)
    members[f"{BIN_TOP}/readme.html"] = b"<html>not needed</html>"
    return members


class _Py2Pickler(pickle._Pickler):
    """Protocol 2 as Python 2's cPickle wrote the official files: byte strings as BINSTRING.

    (Python 3's protocol 2 would instead call `_codecs.encode`, which the real files never do.)
    """

    dispatch = pickle._Pickler.dispatch.copy()

    def save_bytes(self, obj):
        n = len(obj)
        op = pickle.SHORT_BINSTRING + bytes([n]) if n < 256 else pickle.BINSTRING + struct.pack("<i", n)
        self.write(op + obj)
        self.memoize(obj)

    dispatch[bytes] = save_bytes


def py2_pickle(obj, numpy_module: str = "numpy.core.multiarray") -> bytes:
    """A protocol-2 pickle like the official ones, naming `numpy_module` for `_reconstruct`."""
    f = io.BytesIO()
    _Py2Pickler(f, protocol=2).dump(obj)
    return f.getvalue().replace(b"cnumpy._core.multiarray\n_reconstruct\n",
                                f"c{numpy_module}\n_reconstruct\n".encode())


def python_members(batches, class_names=CLASS_NAMES, dumps=py2_pickle) -> dict[str, bytes]:
    """The official python layout: pickles of dicts with bytes keys (see `py2_pickle`)."""
    meta = {b"label_names": [n.encode() for n in class_names], b"num_cases_per_batch": 10000,
            b"num_vis": 3072}
    members = {f"{PY_TOP}/batches.meta": dumps(meta)}
    for name, (images, labels) in batches.items():
        d = {b"batch_label": name.encode(), b"labels": [int(v) for v in labels],
             b"data": images.reshape(len(labels), -1),
             b"filenames": [f"img_{i}.png".encode() for i in range(len(labels))]}
        members[f"{PY_TOP}/{name}"] = dumps(d)
    members[f"{PY_TOP}/readme.html"] = b"<html>not needed</html>"
    return members


def write_tar(path, members: dict[str, bytes], gz: bool = True) -> Path:
    """Pack {name: bytes} into a tar (gzipped by default), with folder entries like the original."""
    path = Path(path)
    with tarfile.open(path, "w:gz" if gz else "w") as tar:
        for folder in sorted({n.rsplit("/", 1)[0] for n in members if "/" in n}):
            info = tarfile.TarInfo(folder)
            info.type = tarfile.DIRTYPE
            info.mode = 0o755
            tar.addfile(info)
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(data))
    return path


def write_folder(root, members: dict[str, bytes]) -> Path:
    """Write {name: bytes} as files under `root` (an 'already extracted' archive)."""
    root = Path(root)
    for name, data in members.items():
        f = root / name
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_bytes(data)
    return root


def make_binary_archive(path, n_per_batch: int = 40, n_test: int = 50, seed: int = 0):
    """A tiny cifar-10-binary.tar.gz; returns (path, batches)."""
    batches = make_splits(n_per_batch, n_test, seed)
    return write_tar(path, binary_members(batches)), batches


def make_python_archive(path, n_per_batch: int = 40, n_test: int = 50, seed: int = 0):
    """A tiny cifar-10-python.tar.gz; returns (path, batches)."""
    batches = make_splits(n_per_batch, n_test, seed)
    return write_tar(path, python_members(batches)), batches


def learnable_split(n: int, rng: np.random.Generator, noise: float = 40.0):
    """n images whose class shows in the colour and in which quadrant is brighter, plus noise."""
    palette = np.random.default_rng(12345).uniform(50, 205, (10, 3))  # fixed per class
    labels = (np.arange(n) % 10).astype(np.uint8)
    rng.shuffle(labels)
    x = palette[labels][:, :, None, None] + rng.normal(0, noise, (n, 3, 32, 32))
    quadrant = labels % 4
    for q in range(4):
        r, c = divmod(q, 2)
        x[quadrant == q, :, r * 16:(r + 1) * 16, c * 16:(c + 1) * 16] += 30
    return np.clip(np.rint(x), 0, 255).astype(np.uint8), labels


def make_tiny_store(path, n_train: int = 500, n_test: int = 100, seed: int = 0) -> Path:
    """Write a valid small cifar10.h5 with learnable images; returns its path."""
    from partrain.datasets.store import write_store

    rng = np.random.default_rng(seed)
    train_images, train_labels = learnable_split(n_train, rng)
    test_images, test_labels = learnable_split(n_test, rng)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_store(path, train_images, train_labels, test_images, test_labels, CLASS_NAMES,
                source_name=f"synthetic(seed={seed})", source_sha256="0" * 64)
    return path


class _Py2StrPickler(_Py2Pickler):
    """Python 2's cPickle for every string: numpy's 'u1' and '|' as well (read back as bytes)."""

    dispatch = _Py2Pickler.dispatch.copy()

    def save_str(self, obj):
        data = obj.encode("latin-1")
        n = len(data)
        op = pickle.SHORT_BINSTRING + bytes([n]) if n < 256 else pickle.BINSTRING + struct.pack("<i", n)
        self.write(op + data)
        self.memoize(obj)  # the str itself: a transient bytes object's id can come back

    dispatch[str] = save_str


def py2_str_pickle(obj) -> bytes:
    """A protocol-2 pickle in which every str is a byte string, as in the official files."""
    f = io.BytesIO()
    _Py2StrPickler(f, protocol=2).dump(obj)
    return f.getvalue().replace(b"numpy._core.multiarray\n", b"numpy.core.multiarray\n")


class CallNdarray:
    """Pickles as a direct call numpy.ndarray(shape, dtype, buffer, offset, strides)."""

    def __init__(self, shape, dtype, buffer, strides):
        self.args = (shape, np.dtype(dtype), buffer, 0, strides)

    def __reduce__(self):
        return np.ndarray, self.args


def stride_bomb_batch(n: int) -> bytes:
    """A pickled batch of n images and labels that holds one image: strides (0, 1) repeat it.

    Asked to be contiguous, numpy materialises n * 3072 bytes from a pickle of about 3 KB.
    """
    return py2_pickle({b"data": CallNdarray((n, 3072), "u1", bytes(3072), (0, 1)),
                       b"labels": CallNdarray((n,), "i8", bytes(8), (0,))})


def nested_labels_batch(depth: int, n: int = 20) -> bytes:
    """A valid batch of n images whose b'labels' are n references to one list nested `depth`
    deep ([x, x] at every level): np.asarray of it holds n * 2**depth integers."""
    x = [0, 0]
    for _ in range(depth):
        x = [x, x]
    return py2_pickle({b"data": np.zeros((n, 3072), np.uint8), b"labels": [x] * n})


class BadArrayState:
    """Pickles as numpy does (_reconstruct, then __setstate__), with any state: numpy 2.4's own
    setstate crashes (SIGSEGV) on an object dtype whose list is shorter than the shape."""

    def __init__(self, state):
        self.state = state

    def __reduce__(self):
        return (_numpy_reconstruct(), (np.ndarray, (0,), b"b"), self.state)


def _numpy_reconstruct():
    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy 1.x
        from numpy.core.multiarray import _reconstruct
    return _reconstruct


def object_state_batch() -> bytes:
    """A batch whose b'data' is an object array of 1000 x 3072 filled from a one-item list."""
    state = (1, (1000, 3072), np.dtype("O"), False, [1])
    return py2_pickle({b"data": BadArrayState(state), b"labels": [0] * 1000})


def write_gray_png(path, width: int, height: int, value: int = 128) -> Path:
    """A valid 8-bit grayscale PNG of one colour, written row by row: a 10 000 x 10 000 image
    takes about 0.5 s, 120 KB on disk and a few KB of memory here (decoding it takes 100 MB)."""
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + data))
        return struct.pack(">I", len(data)) + kind + data + crc

    z = zlib.compressobj(9)
    row = b"\x00" + bytes([value]) * width  # filter type 0, then the pixels
    idat = b"".join(z.compress(row) for _ in range(height)) + z.flush()
    path = Path(path)
    path.write_bytes(b"\x89PNG\r\n\x1a\n"
                     + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
                     + chunk(b"IDAT", idat) + chunk(b"IEND", b""))
    return path


def memo_bomb_batch(index: int = 1_426_420_068) -> bytes:
    """A 12-byte pickle of an empty dict stored at memo index `index` (LONG_BINPUT): CPython's C
    unpickler grows its memo array to index + 1 entries (11 GB for the default) and zeroes it."""
    return b"\x80\x02}r" + struct.pack("<I", index) + b"."

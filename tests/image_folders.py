"""Small image folders, CSVs and CIFAR-100 archives for the tests of `prepare --images / --csv`
and `--source cifar-100-python.tar.gz`, built in a test's tmp_path."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from synthetic import py2_pickle, write_tar

COLOURS = {"red": (200, 40, 40), "green": (40, 180, 60), "blue": (40, 60, 200)}
SHAPES = [(40, 60), (64, 64), (50, 50), (90, 30)]  # (height, width): mixed sizes
FORMATS = ["png", "jpg", "bmp", "webp"]            # mixed formats


def learnable_image(colour, rng, h: int, w: int) -> np.ndarray:
    """(h, w, 3) uint8: the class colour at a random brightness, a brighter square in the
    middle (what a centre crop keeps), noise."""
    base = np.array(colour, np.float64) * rng.uniform(0.6, 1.0)
    img = base[None, None] + rng.normal(0, 30, (h, w, 3))
    img[h // 3:2 * h // 3, w // 3:2 * w // 3] += 40
    return np.clip(img, 0, 255).astype(np.uint8)


def make_folder(root, per_class: int = 12, seed: int = 0, colours=COLOURS) -> Path:
    """root/CLASS/NNN.EXT for each class: `per_class` images of mixed sizes and formats."""
    from PIL import Image
    rng = np.random.default_rng(seed)
    root = Path(root)
    for name, colour in colours.items():
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            h, w = SHAPES[i % len(SHAPES)]
            ext = FORMATS[i % len(FORMATS)]
            Image.fromarray(learnable_image(colour, rng, h, w)).save(folder / f"{i:03d}.{ext}")
    return root


def add_trouble(root) -> dict:
    """One corrupt file, one empty class, one non-image file, one duplicate: what they are."""
    root = Path(root)
    bad = root / "red" / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png" * 10)
    (root / "empty").mkdir()
    (root / "red" / "notes.txt").write_text("not an image")
    dup = root / "blue" / "copy.png"
    shutil.copy(root / "blue" / "000.png", dup)
    return {"bad": bad, "dup": dup}


def write_csv(path, rows, header: bool = True, sep: str = ",") -> Path:
    path = Path(path)
    lines = ([f"path{sep}label"] if header else []) + [f"{p}{sep}{lab}" for p, lab in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


def cifar100_members(n_train: int = 60, n_test: int = 20, seed: int = 0) -> tuple[dict, dict]:
    """{member: bytes} of a small cifar-100-python.tar.gz, and the arrays in it."""
    rng = np.random.default_rng(seed)
    arrays = {}
    members = {}
    for split, n in (("train", n_train), ("test", n_test)):
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        fine = [int(v) for v in rng.integers(0, 100, n)]
        coarse = [f // 5 for f in fine]
        arrays[split] = (data.reshape(n, 3, 32, 32), np.array(fine), np.array(coarse))
        members[f"cifar-100-python/{split}"] = py2_pickle(
            {b"filenames": [b"x.png"] * n, b"batch_label": b"b", b"fine_labels": fine,
             b"coarse_labels": coarse, b"data": data})
    members["cifar-100-python/meta"] = py2_pickle(
        {b"fine_label_names": [f"fine{i}".encode() for i in range(100)],
         b"coarse_label_names": [f"coarse{i}".encode() for i in range(20)]})
    return members, arrays


def make_cifar100_archive(path, **kw) -> tuple[Path, dict]:
    members, arrays = cifar100_members(**kw)
    return write_tar(path, members), arrays

"""`partrain prepare --images DIR` / `--csv FILE`: the user's own images into a store.

The listing (datasets/images.py) is made first, so every class, every test-split choice and the
store's size are known before any image is decoded. Images are then decoded a chunk at a time
and streamed into the store (store_writer.StoreWriter): memory stays at one chunk of decoded
images whatever the folder's size. A file that cannot be decoded stops the run with its path
(nothing is written; a store already there stays as it was), unless `skip_bad`, when it is left
out and listed at the end. Files with the same bytes are reported (within a split, and — a
leak of test images into training — across the two); they are kept.
"""
from __future__ import annotations

import hashlib
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np

from .datasets import store
from .datasets.images import Listing, held_out, list_csv, list_folder, pillow, read_image
from .errors import PartrainError
from .prepare import class_table, output_path, statistics_line
from .progress import Phase

CHUNK = 256          # images decoded per chunk (with 224 x 224 images: 38 MB)
DEFAULT_TEST_FRACTION = 0.2
SHOW = 5             # bad or duplicate files named in the summary; the rest are counted


def prepare_images(data_dir="data", images=None, csv=None, images_test=None, csv_test=None,
                   test_fraction: float | None = None, size: int = 32, seed: int = 0,
                   skip_bad: bool = False, force: bool = False, quiet: bool = False,
                   echo: Callable[[str], None] = print, warn: Callable[[str], None] | None = None
                   ) -> Path:
    """Build DATA_DIR/cifar10.h5 from an image folder (`images`) or a CSV/TSV (`csv`); the test
    split from `images_test` / `csv_test`, else `test_fraction` of each class (default 0.2) held
    out with `seed`. Returns the store's path; PartrainError on bad input."""
    warn = warn or (lambda text: print(text, file=sys.stderr))
    t0 = time.perf_counter()
    train, test = _listings(images, csv, images_test, csv_test, test_fraction, seed)
    if not store.MIN_SIDE <= size <= store.MAX_SIDE:
        raise PartrainError(f"--size must lie in {store.MIN_SIDE}..{store.MAX_SIDE}, got {size}")
    pillow()  # the one line saying how to install it, before anything is written
    out = output_path(data_dir, force, echo)
    if out is None:
        return Path(data_dir) / store.FILENAME
    for note in train.notes + test.notes:
        warn(f"note: {note}")
    source = str(images or csv)
    seen: dict[str, tuple[str, Path]] = {}  # file sha256 -> (split, first path)
    report = {"bad": [], "dup": [], "leak": []}
    digest = hashlib.sha256()
    total = len(train.items) + len(test.items)
    try:
        with store.StoreWriter(out, (3, size, size), train.class_names, source, "",
                               {"train": len(train.items), "test": len(test.items)}) as w, \
                Phase(f"decoding {total:,} images", total, "image", quiet) as phase:
            for split, listing in (("train", train), ("test", test)):
                for lo in range(0, len(listing.items), CHUNK):
                    chunk = listing.items[lo:lo + CHUNK]
                    x, y = _decode(chunk, split, size, skip_bad, seen, report, digest)
                    w.add(split, x, y)
                    phase.update(len(chunk))
            data = w.finish(digest.hexdigest())
            seconds = phase.seconds
    except MemoryError:
        raise PartrainError(f"not enough memory to decode {CHUNK} images of {size} x {size}"
                            ) from None
    data.train_labels, data.test_labels = _labels(out)
    echo(_summary(data, out, train, test, report, seconds, time.perf_counter() - t0))
    return out


def _listings(images, csv, images_test, csv_test, test_fraction, seed) -> tuple[Listing, Listing]:
    if (images is None) == (csv is None):
        raise PartrainError("give one source of training images: --images DIR or --csv FILE")
    if images_test is not None and csv_test is not None:
        raise PartrainError("give at most one source of test images: --images-test or --csv-test")
    given_test = images_test is not None or csv_test is not None
    if given_test and test_fraction is not None:
        raise PartrainError("--test-fraction holds out test images from the training source; "
                            "with --images-test or --csv-test there is nothing to hold out")
    train = list_folder(images) if images is not None else list_csv(csv)
    if images_test is not None:
        return train, list_folder(images_test, train.class_names)
    if csv_test is not None:
        return train, list_csv(csv_test, train.class_names)
    return held_out(train, DEFAULT_TEST_FRACTION if test_fraction is None else test_fraction,
                    seed)


def _decode(chunk, split, size, skip_bad, seen, report, digest) -> tuple[np.ndarray, np.ndarray]:
    """The chunk's images, decoded (uint8 (n, 3, size, size)) with their labels; bad files
    raise, or with skip_bad are left out and recorded; duplicates recorded."""
    x = np.empty((len(chunk), 3, size, size), np.uint8)
    y = np.empty(len(chunk), np.int64)
    n = 0
    for path, label in chunk:
        try:
            content = path.read_bytes()
            x[n] = read_image(path, size, content=content)
        except (PartrainError, OSError) as e:
            why = (str(e) if isinstance(e, PartrainError) else f"{path} does not exist"
                   if isinstance(e, FileNotFoundError) else f"cannot read {path}: {e.strerror or e}")
            if not skip_bad:
                raise PartrainError(f"{why}; pass --skip-bad to leave such files out") from None
            report["bad"].append(why)
            continue
        sha = hashlib.sha256(content).hexdigest()
        if sha in seen:
            first_split, first = seen[sha]
            report["leak" if first_split != split else "dup"].append(f"{path} = {first}")
        else:
            seen[sha] = (split, path)
        digest.update(f"{split}\0{label}\0{sha}\n".encode())
        y[n] = label
        n += 1
    return x[:n], y[:n]


def _labels(out: Path):
    data = store.inspect_store(out)  # the labels only: checked as every later command reads them
    return data.train_labels, data.test_labels


def _summary(data, out, train: Listing, test: Listing, report: dict, decode_s: float,
             total_s: float) -> str:
    n = len(data.train_labels) + len(data.test_labels)
    lines = [f"read {data.source_name} ({len(train.class_names)} classes, "
             f"{len(train.items) + len(test.items):,} image files)"]
    lines += class_table(data.class_names, data.train_labels, data.test_labels)
    lines.append(statistics_line(data) + "   (centre-cropped to square, resized)")
    for key, what in (("bad", "unreadable file(s) left out (--skip-bad)"),
                      ("dup", "duplicate file(s) (the same bytes) within a split, kept"),
                      ("leak", "file(s) in the test split with the same bytes as a training "
                               "file (the test accuracy will flatter), kept")):
        if report[key]:
            lines.append(f"  {len(report[key])} {what}: " + "; ".join(report[key][:SHOW])
                         + (f"; and {len(report[key]) - SHOW} more" if len(report[key]) > SHOW
                            else ""))
    lines.append(f"decoded {n:,} images in {decode_s:.1f} s ({n / max(decode_s, 1e-9):,.0f} "
                 f"images/s); wrote {out} ({out.stat().st_size / 2**20:.1f} MiB) in "
                 f"{total_s:.1f} s")
    return "\n".join(lines)

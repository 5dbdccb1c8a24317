"""`partrain predict RUN INPUT...`: the top classes, with probabilities, for images or test samples.

Image files (PNG, JPEG, anything Pillow reads) are cropped to a centred square, resized to 32 x 32
RGB and normalised with the per-channel mean and std stored in the run's data file, exactly like
the training images. Pillow is an optional extra (`pip install 'partrain[images]'`); indices into
the test set (`test_index=True`) need only the store.
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Sequence

import numpy as np

from .datasets.store import excerpt, inspect_store, load_store
from .errors import PartrainError
from .evaluate import batched_logits, data_path, load_run, run_scale_shift

SIZE = 32
# A 32 x 32 classifier needs nothing near Pillow's own limit (89 Mpixel, then a warning with a
# source line up to 179 Mpixel: 530 MB for a 10 000 x 10 000 PNG). JPEGs are decoded at 1/2 to
# 1/8 scale first (draft), so this bounds what is decoded, not what a camera makes.
MAX_PIXELS = 1 << 24  # 4096 x 4096


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax in float64, shifted by the row maximum so that exp never overflows."""
    z = np.asarray(logits, np.float64)
    z = np.exp(z - z.max(axis=-1, keepdims=True))
    return z / z.sum(axis=-1, keepdims=True)


def load_image(path: str | Path) -> np.ndarray:
    """An image file as a (3, 32, 32) uint8 RGB array: centre-cropped to square, then resized.

    Transparent pixels are put on white (a photo's background is rarely black). Images of more
    than MAX_PIXELS (after a JPEG's draft scaling) are refused from their header, before decoding.
    """
    path = Path(path)
    try:
        from PIL import Image, ImageOps, UnidentifiedImageError
    except ImportError:
        raise PartrainError("reading image files needs Pillow: pip install 'partrain[images]' "
                            "(or predict test images by index with --test-index)") from None
    if not path.is_file():
        raise PartrainError(f"{path} does not exist" if not path.exists() else f"{path} is not a file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(path)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise PartrainError(f"{path} is too large to be read safely (over "
                            f"{Image.MAX_IMAGE_PIXELS / 1e6:.0f} Mpixel; predict reads up to "
                            f"{MAX_PIXELS // 2**20} Mpixel)") from None
    except UnidentifiedImageError:
        raise PartrainError(f"{path} is not an image (Pillow cannot read it; use PNG or "
                            "JPEG)") from None
    except (OSError, ValueError, SyntaxError) as e:  # a damaged header
        raise PartrainError(f"{path} is a damaged image: {excerpt(str(e))}") from None
    try:
        with img:
            img.draft("RGB", (4 * SIZE, 4 * SIZE))  # JPEG only: decode at a reduced scale
            if img.width * img.height > MAX_PIXELS:
                raise PartrainError(f"{path} is {img.width} x {img.height} pixels, more than "
                                    f"predict reads ({MAX_PIXELS // 2**20} Mpixel; the model sees "
                                    f"{SIZE} x {SIZE}): shrink it first")
            img.load()
            if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
                img = img.convert("RGBA")
                background = Image.new("RGBA", img.size, (255, 255, 255, 255))
                img = Image.alpha_composite(background, img)
            img = ImageOps.fit(img.convert("RGB"), (SIZE, SIZE), method=Image.Resampling.LANCZOS)
            array = np.asarray(img, dtype=np.uint8)
    except Image.DecompressionBombError:  # a frame larger than the header said
        raise PartrainError(f"{path} is too large to be read safely") from None
    except (OSError, ValueError, SyntaxError) as e:  # truncated or corrupt image data
        raise PartrainError(f"{path} is a damaged image: {excerpt(str(e))}") from None
    return np.ascontiguousarray(array.transpose(2, 0, 1))


def parse_indices(inputs: Sequence[str], n_test: int | None = None) -> list[int]:
    out = []
    for s in inputs:
        try:
            i = int(s)
        except ValueError:
            raise PartrainError(f"--test-index wants integers, got {excerpt(repr(s))}") from None
        if i < 0 or (n_test is not None and i >= n_test):
            raise PartrainError(f"test index {i} is out of range (the test set has "
                                f"{n_test:,} images: 0..{n_test - 1})" if n_test else
                                f"test index {i} is negative")
        out.append(i)
    return out


def predict_run(run: str | Path, inputs: Sequence[str], test_index: bool = False,
                data_dir: str | Path | None = None, checkpoint: str = "best", top: int = 3) -> dict:
    """Top-`top` predictions for each input: {"checkpoint", "results": [{"input", "top": [(class,
    probability), ...], and for test samples "true"}]}. Every input is checked before any work."""
    if not inputs:
        raise PartrainError("nothing to predict: give image files, or test indices with --test-index")
    indices = parse_indices(inputs) if test_index else None
    model, config, meta_run = load_run(run, checkpoint)
    path = data_path(config, data_dir)
    if test_index:
        data = load_store(path, splits=("test",))
        indices = parse_indices(inputs, len(data.test_labels))
        images, labels = data.test_images[indices], data.test_labels[indices]
        names = [f"test[{i}]" for i in indices]
    else:
        images = np.stack([load_image(p) for p in inputs])
        data = inspect_store(path)
        labels, names = None, [str(p) for p in inputs]
    if list(data.class_names) != list(meta_run.get("class_names", data.class_names)):
        raise PartrainError(f"{path} has other class names than the run {run} was trained with")
    scale, shift = run_scale_shift(config, path, data)
    probs = softmax(np.concatenate([z for _, z, _ in batched_logits(
        model, images, np.arange(len(images)), scale, shift)]))
    k = min(top, probs.shape[1])
    results = []
    for n, p in enumerate(probs):
        best = np.argsort(-p, kind="stable")[:k]
        r = {"input": names[n], "top": [(data.class_names[j], float(p[j])) for j in best]}
        if labels is not None:
            r["true"] = data.class_names[int(labels[n])]
        results.append(r)
    return {"checkpoint": meta_run["checkpoint"]["path"], "results": results}


def format_predictions(out: dict) -> list[str]:
    """One line per input: name, then the top classes with probabilities (and the true class)."""
    width = max(len(r["input"]) for r in out["results"])
    cell = max(len(name) for r in out["results"] for name, _ in r["top"]) + 7
    lines = []
    for r in out["results"]:
        top = "  ".join(f"{name} {p:.1%}".ljust(cell) for name, p in r["top"])
        line = f"{r['input']:<{width}}  {top}"
        if "true" in r:
            mark = "right" if r["top"][0][0] == r["true"] else "wrong"
            line += f"  (true: {r['true']}, {mark})"
        lines.append(line.rstrip())
    return lines

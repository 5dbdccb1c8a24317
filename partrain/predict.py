"""`partrain predict RUN INPUT...`: the top classes, with probabilities, for images or test samples.

Image files (PNG, JPEG, anything Pillow reads) are cropped to a centred square, resized to the
model's input size (RGB) and normalised with the per-channel mean and std stored in the run's data file, exactly like
the training images. Pillow is an optional extra (`pip install 'partrain[images]'`); indices into
the test set (`test_index=True`) need only the store.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from .datasets.images import read_image
from .datasets.store import excerpt, inspect_store, load_store
from .errors import PartrainError
from .progress import Phase
from .evaluate import batched_logits, check_store_fits, data_path, load_run, run_scale_shift



def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax in float64, shifted by the row maximum so that exp never overflows."""
    z = np.asarray(logits, np.float64)
    z = np.exp(z - z.max(axis=-1, keepdims=True))
    return z / z.sum(axis=-1, keepdims=True)


def load_image(path: str | Path, size: int = 32) -> np.ndarray:
    """An image file as a (3, size, size) uint8 RGB array, as `prepare --images` reads one
    (`datasets.images.read_image`: centre-cropped to square, then resized)."""
    return read_image(path, size, hint=" (or predict test images by index with --test-index)")


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
                data_dir: str | Path | None = None, checkpoint: str = "best", top: int = 3,
                quiet: bool = True) -> dict:
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
        data = inspect_store(path)
        labels, names = None, [str(p) for p in inputs]
    check_store_fits(data, meta_run, model, path, run)
    if not test_index:
        with Phase(f"reading {len(inputs):,} images", len(inputs), "image", quiet) as phase:
            images = np.empty((len(inputs),) + tuple(model.input_shape), np.uint8)
            for i, p in enumerate(inputs):
                images[i] = load_image(p, model.input_shape[1])
                phase.update()
    scale, shift = run_scale_shift(config, path, data)
    with Phase(f"predicting {len(images):,} images", len(images), "image", quiet) as phase:
        probs = softmax(np.concatenate([z for _, z, _ in batched_logits(
            model, images, np.arange(len(images)), scale, shift, phase=phase)]))
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

"""Test-time augmentation: average a model's evaluation logits over flipped and shifted views.

As airbench94's `infer(..., tta_level)`, we average LOGITS (not softmax probabilities), with its
weights:
- "none":            the image alone;
- "flip":            ½ image + ½ mirrored image;
- "flip_translate":  ½ of "flip" on the image + ½ of the mean of "flip" on two 1-px translations
  (window moved up-left and down-right, reflect padding), i.e. weights ¼, ¼ and ⅛ × 4 over six
  forward passes.
Inputs are normalised float NCHW batches; reflect padding commutes with per-channel normalisation,
so padding here equals padding the raw pixels.
"""
from __future__ import annotations

import numpy as np

MODES = ("none", "flip", "flip_translate")
VIEWS = {"none": 1, "flip": 2, "flip_translate": 6}  # forward passes per image


def describe(what: str, n: int, mode: str = "none") -> str:
    """A pass's progress label: "test set, 10,000 images, 6 TTA views"."""
    views = "" if mode == "none" else f", {VIEWS[mode]} TTA views"
    return f"{what}, {n:,} images{views}"


def tta_views(x: np.ndarray, mode: str = "flip_translate") -> list[tuple[float, np.ndarray]]:
    """[(weight, view)] for an (N, C, H, W) batch; the weights sum to 1."""
    if mode not in MODES:
        raise ValueError(f"unknown TTA mode {mode!r}; choose from {', '.join(MODES)}")
    if mode == "none":
        return [(1.0, x)]
    flip = lambda v: np.ascontiguousarray(v[..., ::-1])  # noqa: E731
    if mode == "flip":
        return [(0.5, x), (0.5, flip(x))]
    h, w = x.shape[2:]
    padded = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)), mode="reflect")
    up_left = np.ascontiguousarray(padded[:, :, 0:h, 0:w])
    down_right = np.ascontiguousarray(padded[:, :, 2:h + 2, 2:w + 2])
    return [(0.25, x), (0.25, flip(x)), (0.125, up_left), (0.125, flip(up_left)),
            (0.125, down_right), (0.125, flip(down_right))]


def tta_logits(model, x: np.ndarray, mode: str = "flip_translate",
               logits: np.ndarray | None = None) -> np.ndarray:
    """Weighted mean of `model.logits(view)` over the TTA views of x; (N, n_classes) float64.

    logits: the caller's float64 logits of x itself, if it has them (the first view is x), which
    saves that pass. Batching a large test set is `evaluate.batched_logits`'s job.
    """
    acc = None
    for weight, view in tta_views(x, mode):
        if view is x and logits is not None:
            z = logits
        else:
            z = np.asarray(model.logits(view), np.float64)
        acc = z * weight if acc is None else acc + z * weight
    return acc

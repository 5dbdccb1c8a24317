"""Turning sample indices into a normalised float32 batch.

Images stay uint8 (in shared memory for the engine); each step gathers its samples and normalises
them with the per-channel train statistics stored by `prepare`. Augmentation (`augment.py`: flips and
translations) is applied to the uint8 samples before normalising, keyed by (seed, epoch, sample
index) so that a sample looks the same whichever worker draws it.
"""
from __future__ import annotations

import numpy as np

from .augment import augment_batch


def normaliser(mean: np.ndarray, std: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(scale, shift) with x = pixel * scale - shift, shaped (3, 1, 1) for broadcasting."""
    mean = np.asarray(mean, np.float64).reshape(3, 1, 1)
    std = np.asarray(std, np.float64).reshape(3, 1, 1)
    return (1.0 / std).astype(np.float32), (mean / std).astype(np.float32)


def make_batch(images: np.ndarray, labels: np.ndarray, idx: np.ndarray,
               scale: np.ndarray, shift: np.ndarray,
               out: np.ndarray | None = None, dtype=np.float32,
               augment=None, epoch: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Gather `images[idx]` (uint8 NCHW) into a normalised float batch; returns (x, y int64).

    augment: an `augment.AugmentSpec` (or None): the samples are flipped and translated as
    (augment.seed, epoch, idx) decide, before normalising.
    """
    n = len(idx)
    if out is None or out.shape[0] < n or out.dtype != dtype:
        out = np.empty((n,) + images.shape[1:], dtype)
    x = out[:n]
    if augment is not None and augment.active:
        pixels = augment_batch(images, idx, augment.seed, epoch, augment.flip, augment.translate)
    else:
        pixels = images[idx]
    np.multiply(pixels, scale, out=x, dtype=dtype, casting="unsafe")
    x -= shift
    return x, labels[idx].astype(np.int64)

"""Turning sample indices into a normalised float32 batch.

Images stay uint8 (in shared memory for the engine); each step gathers its samples and normalises
them with the run's normalisation (`normalization`: by default the per-channel train statistics
stored by `prepare`). Augmentation (`augment.py`: flips and
translations) is applied to the uint8 samples before normalising, keyed by (seed, epoch, sample
index) so that a sample looks the same whichever worker draws it.
"""
from __future__ import annotations

import numpy as np

from .augment import augment_batch
from .errors import PartrainError


NORMALIZATIONS = ("channel", "mean-image")


def normaliser(mean: np.ndarray, std: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(scale, shift) with x = pixel * scale - shift, for broadcasting over (N, C, H, W): shaped
    (C, 1, 1) from per-channel values, or (C, H, W) from a per-pixel mean image."""
    mean, std = _per_channel_or_pixel(mean), _per_channel_or_pixel(std)
    return (1.0 / std).astype(np.float32), (mean / std).astype(np.float32)


def _per_channel_or_pixel(v) -> np.ndarray:
    v = np.asarray(v, np.float64)
    return v.reshape(-1, 1, 1) if v.ndim <= 1 else v


def split_train_val(n: int, val_size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A seeded split of range(n) into sorted train and validation indices."""
    if val_size >= n:
        raise PartrainError(f"--val-size {val_size} leaves no training data (train set has {n})")
    perm = np.random.default_rng([seed, 0x5A11]).permutation(n)
    return np.sort(perm[val_size:]), np.sort(perm[:val_size])


def normalization(cfg, data, train_idx=None) -> tuple[np.ndarray, np.ndarray]:
    """The (mean, std) a run normalises its images with (`cfg.normalize`): "channel", the store's
    per-channel statistics of the train images; "mean-image", the cs231n course's preprocessing:
    the mean training image (over the run's training indices, `train_idx`, else its split) is
    subtracted and nothing divided. The same arrays for fit, evaluate, predict and TTA."""
    if getattr(cfg, "normalize", "channel") == "channel":
        return np.asarray(data.mean, np.float64), np.asarray(data.std, np.float64)
    if train_idx is None:
        train_idx, _ = split_train_val(len(data.train_labels), cfg.val_size, cfg.seed)
    return mean_image(data.train_images, train_idx), np.ones(data.train_images.shape[1])


def run_normaliser(cfg, data, train_idx=None) -> tuple[np.ndarray, np.ndarray]:
    """(scale, shift) of `normalization(cfg, data, train_idx)`."""
    return normaliser(*normalization(cfg, data, train_idx))


def mean_image(images, idx, chunk: int = 4096) -> np.ndarray:
    """The mean of images[idx] (uint8 N, C, H, W; an array or an h5py dataset) in float64,
    summed chunk by chunk in index order (so every process gets the same bits)."""
    idx = np.asarray(idx)
    total = np.zeros(images.shape[1:], np.float64)
    for lo in range(0, len(idx), chunk):
        total += np.asarray(images[idx[lo:lo + chunk]]).sum(axis=0, dtype=np.float64)
    return total / max(len(idx), 1)


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

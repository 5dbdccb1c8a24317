"""Training-set augmentation in the workers: horizontal flips and small translations (airbench94).

Every decision is a pure function of (seed, epoch, global sample index) — a counter-based hash, no
random-number state — so a sample looks the same whichever worker draws it and however a minibatch
is split: results do not depend on the worker count, the shard boundaries or the batch order.

- Flips are airbench's "alternating" flips: each image gets a fixed random flip bit from the seed,
  XOR-ed with the epoch's parity, so every image is seen flipped exactly every other epoch (more
  diversity per pair of epochs than independent coin flips).
- Translations: a window offset (dy, dx), each uniform in [-translate, translate], fresh per epoch,
  read from the image reflect-padded by `translate` (as airbench's pad-then-random-crop):
  out[c, y, x] = reflect(img)[c, y + dy, x + dx]. A flip is applied after the translation; with
  symmetric offsets the order does not change the distribution.

Images stay uint8 here; `batches.make_batch`-style normalisation comes after.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_FLIP_STREAM = 0x464C4950  # "FLIP": the flip bits do not depend on the epoch


@dataclass(frozen=True)
class AugmentSpec:
    """What the runners apply to every training sample: the run's seed (the key), flips on or off
    and the largest translation in pixels. Small and picklable: the workers get it at start-up,
    and only the epoch travels with each step."""

    seed: int = 0
    flip: bool = True
    translate: int = 2

    def __post_init__(self):
        if int(self.translate) != self.translate or self.translate < 0:
            raise ValueError(f"translate must be a whole number of pixels >= 0, got "
                             f"{self.translate}")

    @property
    def active(self) -> bool:
        return bool(self.flip) or self.translate > 0


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser on a uint64 array (wrapping arithmetic), a good 64-bit hash."""
    x = x ^ (x >> np.uint64(30))
    x = x * _M1
    x = x ^ (x >> np.uint64(27))
    x = x * _M2
    return x ^ (x >> np.uint64(31))


def sample_hash(seed: int, stream: int, idx) -> np.ndarray:
    """64-bit hash of (seed, stream, index) for each index: the only source of randomness here."""
    idx = np.asarray(idx, np.int64).astype(np.uint64).reshape(-1)
    key = _mix(np.array([seed & 0xFFFFFFFFFFFFFFFF], np.uint64) + _GOLDEN)
    key = _mix(key ^ np.array([stream & 0xFFFFFFFFFFFFFFFF], np.uint64))
    return _mix(key + (idx + np.uint64(1)) * _GOLDEN)


def decisions(seed: int, epoch: int, idx, flip: bool = True,
              translate: int = 2) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(flip bool, dy int, dx int) for the given global sample indices in this epoch."""
    idx = np.asarray(idx)
    n = idx.size
    if flip:
        base = (sample_hash(seed, _FLIP_STREAM, idx) >> np.uint64(40)) & np.uint64(1)
        flips = (base.astype(np.int64) ^ (epoch & 1)).astype(bool)
    else:
        flips = np.zeros(n, bool)
    if translate > 0:
        h = sample_hash(seed, 2 * epoch + 1, idx)  # a fresh stream per epoch
        span = np.uint64(2 * translate + 1)
        dy = ((h >> np.uint64(32)) % span).astype(np.int64) - translate
        dx = ((h & np.uint64(0xFFFFFFFF)) % span).astype(np.int64) - translate
    else:
        dy = dx = np.zeros(n, np.int64)
    return flips, dy, dx


def shift_flip(batch: np.ndarray, flips: np.ndarray, dy: np.ndarray, dx: np.ndarray,
               pad: int, out: np.ndarray | None = None) -> np.ndarray:
    """Apply given decisions to an (n, C, H, W) batch: reflect-pad by `pad`, take the window at
    offset (dy, dx) from the centre, then mirror the rows of samples with flips[i]."""
    n, c, h, w = batch.shape
    if out is None:
        out = np.empty_like(batch)
    if pad > 0:
        if np.any(np.abs(dy) > pad) or np.any(np.abs(dx) > pad):
            raise ValueError(f"offsets must be within the padding {pad}")
        padded = np.pad(batch, ((0, 0), (0, 0), (pad, pad), (pad, pad)), mode="reflect")
        # (n, C, 2p+1, 2p+1, H, W) view of every window; one gather copies the chosen ones.
        win = sliding_window_view(padded, (h, w), axis=(2, 3))
        rows = np.arange(n)[:, None]
        out[...] = win[rows, np.arange(c)[None, :], (dy + pad)[:, None], (dx + pad)[:, None]]
    else:
        out[...] = batch
    f = np.flatnonzero(flips)
    if f.size:
        out[f] = out[f, ..., ::-1]
    return out


def augment_batch(images: np.ndarray, idx, seed: int, epoch: int, flip: bool = True,
                  translate: int = 2, out: np.ndarray | None = None) -> np.ndarray:
    """images[idx] (uint8, N C H W) flipped and translated as (seed, epoch, idx) decide.

    `out` (n, C, H, W) of the images' dtype is reused when given (the workers' buffer).
    """
    idx = np.asarray(idx)
    flips, dy, dx = decisions(seed, epoch, idx, flip, translate)
    batch = images[idx]
    if out is not None:
        out = out[:len(idx)]
    return shift_flip(batch, flips, dy, dx, translate, out)

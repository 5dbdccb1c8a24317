"""Averages of the flat parameter vector: an exponential moving average (EMA) and Lookahead.

Both work on the one flat vector (see `nn.params`) in place, chunk by chunk with one scratch buffer,
so they cost a few passes over the parameters per call and no full-size temporaries.

- `ParamEMA(decay)`: ema = decay·ema + (1 - decay)·params after each step (hlb-cifar10 / airbench
  v1 evaluate with such an average). `warmup=True` uses min(decay, (1 + t)/(10 + t)) so that early
  steps are not dominated by the initial weights. Evaluate with `swap_in` / `swap_out` (exchange
  contents, no copy kept) or `copy_to`.
- `Lookahead(alpha)`: every call moves slow weights toward the fast ones, slow += alpha·(fast −
  slow), then resets the fast weights to the slow ones (Zhang et al. 2019; airbench95/96 call it
  every 5 steps with a decay schedule).

Batch-norm running statistics live in the model's `state` vector; average them with a second
`ParamEMA` if wanted (airbench's EMA copies them as they are).
"""
from __future__ import annotations

import numpy as np

CHUNK = 65536


def _chunks(n: int, chunk: int):
    for lo in range(0, n, chunk):
        yield lo, min(lo + chunk, n)


class ParamEMA:
    def __init__(self, decay: float, warmup: bool = False, chunk: int = CHUNK):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay, self.warmup, self.chunk = float(decay), bool(warmup), int(chunk)
        self.ema: np.ndarray | None = None
        self._scratch: np.ndarray | None = None

    def _buf(self, dtype) -> np.ndarray:
        if self._scratch is None or self._scratch.dtype != dtype:
            self._scratch = np.empty(self.chunk, dtype)
        return self._scratch

    def init(self, params: np.ndarray, out: np.ndarray | None = None) -> None:
        """Start the average at `params` (into `out` if given: a shared or checkpoint array)."""
        self.ema = np.array(params, copy=True) if out is None else out
        if out is not None:
            np.copyto(out, params)

    def decay_at(self, step: int | None) -> float:
        if step is None or not self.warmup:
            return self.decay
        return min(self.decay, (1.0 + step) / (10.0 + step))

    def update(self, params: np.ndarray, step: int | None = None) -> float:
        """ema = d·ema + (1-d)·params in place; returns the decay d used."""
        if self.ema is None:
            self.init(params)
            return 0.0
        d = self.decay_at(step)
        dt = self.ema.dtype
        keep, take = np.array(d, dt), np.array(1.0 - d, dt)
        buf = self._buf(dt)
        for lo, hi in _chunks(params.size, self.chunk):
            e, b = self.ema[lo:hi], buf[:hi - lo]
            np.multiply(e, keep, out=e)
            np.multiply(params[lo:hi], take, out=b)
            np.add(e, b, out=e)
        return d

    def copy_to(self, out: np.ndarray) -> np.ndarray:
        np.copyto(out, self.ema)
        return out

    def swap(self, params: np.ndarray) -> None:
        """Exchange the contents of `params` and the average (call again to undo)."""
        buf = self._buf(params.dtype)
        for lo, hi in _chunks(params.size, self.chunk):
            p, e, b = params[lo:hi], self.ema[lo:hi], buf[:hi - lo]
            np.copyto(b, p)
            np.copyto(p, e)
            np.copyto(e, b)

    swap_in = swap_out = swap

    def swapped(self, params: np.ndarray):
        """Context manager: the averaged weights are in `params` inside the block."""
        ema = self

        class _Swapped:
            def __enter__(self):
                ema.swap(params)
                return params

            def __exit__(self, *exc):
                ema.swap(params)

        return _Swapped()


class Lookahead:
    def __init__(self, alpha: float = 0.5, chunk: int = CHUNK):
        if not 0.0 < alpha <= 1.0:
            raise ValueError(f"lookahead alpha must be in (0, 1], got {alpha}")
        self.alpha, self.chunk = float(alpha), int(chunk)
        self.slow: np.ndarray | None = None

    def init(self, params: np.ndarray) -> None:
        self.slow = np.array(params, copy=True)

    def update(self, params: np.ndarray, alpha: float | None = None) -> None:
        """slow += a·(params − slow); params = slow. `alpha` overrides for a schedule."""
        if self.slow is None:
            self.init(params)
            return
        a = np.array(self.alpha if alpha is None else alpha, self.slow.dtype)
        for lo, hi in _chunks(params.size, self.chunk):
            p, s = params[lo:hi], self.slow[lo:hi]
            np.subtract(p, s, out=p)   # p = fast - slow (params is reset below anyway)
            np.multiply(p, a, out=p)
            np.add(s, p, out=s)
            np.copyto(p, s)

"""Lookahead on the flat parameter vector, and airbench94's schedule for it.

`Lookahead(alpha)`: every call moves slow weights toward the fast ones, slow += alpha·(fast −
slow), then resets the fast weights to the slow ones (Zhang et al. 2019). It works on the one flat
vector (see `nn.params`) in place, chunk by chunk, so a call costs a few passes over the
parameters and no full-size temporaries. `AirbenchLookahead` calls it every 5 steps with
airbench94's decay schedule, on the parameters and on the model state (batch-norm statistics).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .errors import PartrainError

CHUNK = 65536


def _chunks(n: int, chunk: int):
    for lo in range(0, n, chunk):
        yield lo, min(lo + chunk, n)


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


class AirbenchLookahead:
    """airbench94's Lookahead: every 5 steps the slow copy of the parameters and of the model
    state (batch-norm running statistics; the whitening filters there never change, so neither
    does their average) moves toward the trained ones, slow = d·slow + (1-d)·fast with
    d = 0.95⁵·(t/T)³, and the trained ones are reset to it; after the last step T, they are set to
    the slow copy (d = 1). Early on d ≈ 0 (almost no averaging); at the end d ≈ 0.77. As in
    airbench94 (its state_dict sweep), frozen parameters are averaged too: the whitening bias
    still moves toward its slow copy after it stops training. Runs in the parent between steps
    (the workers are idle then); the slow copies are checkpointed, so resume stays exact.
    """

    EVERY, BASE = 5, 0.95 ** 5

    def __init__(self, params: np.ndarray, state: np.ndarray, total_steps: int):
        self.total = total_steps
        self.parts = [(Lookahead(), params), (Lookahead(), state)]
        for la, arr in self.parts:
            la.init(arr)

    def after_step(self, t: int) -> None:
        """Call after step t (1-based) is done."""
        if t % self.EVERY == 0:
            self._update(1.0 - self.BASE * (min(t, self.total) / self.total) ** 3)
        if t == self.total:
            self._update(0.0)

    def _update(self, alpha: float) -> None:
        for la, arr in self.parts:
            if arr.size:
                la.update(arr, alpha)

    def arrays(self) -> dict[str, np.ndarray]:
        return {"lookahead.params": self.parts[0][0].slow, "lookahead.state": self.parts[1][0].slow}

    def restore(self, arrays: dict, run: Path) -> None:
        for name, dst in self.arrays().items():
            src = arrays.get(name)
            if src is None or src.shape != dst.shape or src.dtype != dst.dtype:
                raise PartrainError(f"checkpoint in {run} does not match this run ({name})")
            dst[...] = src

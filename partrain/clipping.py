"""Clipping the gradient by its global L2 norm (--clip-norm C), with the same bits for any N.

The rule: g *= C / max(|g|, C). When |g| <= C nothing is touched (the step is the unclipped
one, bit for bit); above, the gradient is scaled to norm C. (PyTorch's clip_grad_norm_
multiplies by min(1, C / (|g| + 1e-6)), which also shrinks a gradient just below C by a hair.)
|g| is the norm of the step's summed gradient, the mean over the step's samples, before the
optimizer adds weight decay, coupled (L2) or decoupled: as in PyTorch, where clip_grad_norm_
runs on p.grad before optimizer.step() adds the decay. A non-finite norm clips nothing (the
loss is reported as non-finite at once).

Why the sum of squares is the same for any number of workers and machines: it is taken over
fixed blocks of BLOCK elements of the flat vector (BLOCK is the slice alignment of
`parallel.reduce`, so each worker's slice is whole blocks and no block is split between two).
Each block's sum is computed in float64 by one fixed tree of elementwise additions (16 -> 8 ->
4 -> 2 -> 1) into its own entry of a block vector; that vector is then summed by a fixed tree
too (`tree_sum`). An elementwise float64 addition is exactly rounded and the trees depend on the
vector's length alone, so the norm is a function of the gradient's bits only: with --micro-batch,
whose gradients have the same bits for any N, the clipped step has them too. Worker w writes the
blocks of its slice (in shared memory) and the parent sums them; under MPI every rank holds the
whole summed gradient before this, so each computes the same norm with no extra message.
"""
from __future__ import annotations

import math

import numpy as np

from .parallel.reduce import ALIGN

BLOCK = ALIGN                 # elements per block: every worker's slice is whole blocks
CHUNK = 4096 * BLOCK          # elements per pass (512 KB of float64 scratch)


def n_blocks(size: int) -> int:
    """Blocks of a flat vector of `size` elements (the last may be short)."""
    return -(-size // BLOCK)


def block_sums(g: np.ndarray, lo: int, hi: int, out: np.ndarray,
               scratch: np.ndarray | None = None) -> None:
    """out[block] = the float64 sum of squares of each block of g[lo:hi] (lo a multiple of
    BLOCK; hi too, or the vector's end): one fixed tree per block, whatever lo and hi are."""
    if lo % BLOCK or (hi % BLOCK and hi != len(g)):
        raise ValueError(f"[{lo}, {hi}) is not made of whole blocks of {BLOCK}")
    buf = scratch if scratch is not None else np.empty(CHUNK, np.float64)
    for a in range(lo, hi, CHUNK):
        b = min(hi, a + CHUNK)
        x = buf[:n_blocks(b - a) * BLOCK]
        x[:b - a] = g[a:b]
        x[b - a:] = 0.0            # the short last block: zeros add nothing (x + 0 == x)
        np.multiply(x, x, out=x)   # exact: a float32 squared fits in a float64
        y = x.reshape(-1, BLOCK)
        w = BLOCK
        while w > 1:
            w //= 2
            np.add(y[:, :w], y[:, w:2 * w], out=y[:, :w])
        out[a // BLOCK:a // BLOCK + len(y)] = y[:, 0]


def tree_sum(v: np.ndarray) -> float:
    """The sum of v by a fixed pairwise tree of elementwise additions (halves added, an odd
    last element carried up): the same bits wherever it runs, for the same v."""
    x = np.array(v, np.float64)
    n = len(x)
    if n == 0:
        return 0.0
    while n > 1:
        h = n // 2
        np.add(x[:h], x[h:2 * h], out=x[:h])
        if n % 2:
            x[h] = x[2 * h]
        n = h + n % 2
    return float(x[0])


def scale(g: np.ndarray, lo: int, hi: int, factor: float) -> None:
    """g[lo:hi] *= factor (in g's dtype), unless factor is 1."""
    if factor < 1.0 and hi > lo:
        np.multiply(g[lo:hi], np.asarray(factor, g.dtype), out=g[lo:hi])


class Clipper:
    """One process's clipping: the block vector (shared memory in the engine), the last step's
    norm and whether it clipped."""

    def __init__(self, max_norm: float, size: int, blocks: np.ndarray | None = None):
        self.max_norm = float(max_norm)
        self.blocks = np.zeros(n_blocks(size), np.float64) if blocks is None else blocks
        self._scratch = np.empty(CHUNK, np.float64)
        self.norm: float | None = None
        self.clipped = False

    def partial(self, g: np.ndarray, lo: int, hi: int) -> None:
        """The blocks of g[lo:hi] (a worker's slice) into the block vector."""
        if hi > lo:
            block_sums(g, lo, hi, self.blocks, self._scratch)

    def combine(self) -> float:
        """The norm of the whole block vector; returns the factor every slice is scaled by."""
        self.norm = math.sqrt(tree_sum(self.blocks))
        self.clipped = math.isfinite(self.norm) and self.norm > self.max_norm
        return self.max_norm / self.norm if self.clipped else 1.0

    def clip(self, g: np.ndarray, lo: int = 0, hi: int | None = None) -> None:
        """The whole step in one process: norm of all of g, then g[lo:hi] scaled (default all);
        a `reduce.reduce_and_step` before_step hook."""
        self.partial(g, 0, len(g))
        scale(g, lo, len(g) if hi is None else hi, self.combine())

    @property
    def last(self) -> tuple[float, bool] | None:
        """(norm before clipping, clipped?) of the last step, or None before the first."""
        return None if self.norm is None else (self.norm, self.clipped)

"""The reduction: N gradient buffers in, one optimizer step out, behind one small interface.

After the compute phase, worker w's gradient buffer holds (sum of its samples' losses)' / B. The
reduction sums the N buffers in the fixed order w = 0..N-1 (so a run is bit-reproducible) and
steps the optimizer with the sum. Who does that work is the only difference between the two:

- `parent`: the parent sums all N buffers over the whole flat vector and steps; its cost grows
  with N while the workers wait.
- `sharded` (default): the flat vector is cut into N contiguous slices; worker w sums slice w
  across all buffers and steps the optimizer on slice w only — a reduce-scatter with a sharded
  optimizer (ZeRO stage 1 on one machine). Each worker touches P·(N+4)/N floats instead of the
  parent touching P·(N+4).

Both give bit-identical parameters: every element sees the same additions in the same order and the
optimizer's per-element arithmetic does not depend on the slice (see `optim`).

Beyond one machine, `reduce_and_step(..., allreduce=f)` calls `f(reduced[lo:hi])` between the
node-local sum and the optimizer step: an MPI backend passes an in-place all-reduce over ranks
there.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

ALIGN = 16     # slice boundaries on 64-byte lines (float32), so no two workers write one line


@dataclass(frozen=True)
class Reduction:
    """Where phase 2 of a step runs: in the workers (each on its range) or in the parent."""

    name: str
    in_workers: bool

    def ranges(self, size: int, n_workers: int) -> list[tuple[int, int]]:
        """The [lo, hi) each actor reduces: one per worker (sharded) or one for the parent."""
        return shard_slices(size, n_workers) if self.in_workers else [(0, size)]


REDUCTIONS: dict[str, Reduction] = {
    "sharded": Reduction("sharded", in_workers=True),
    "parent": Reduction("parent", in_workers=False),
}


def get_reduction(name: str) -> Reduction:
    try:
        return REDUCTIONS[name]
    except KeyError:
        raise ValueError(f"unknown reduction {name!r}; choose from "
                         f"{', '.join(REDUCTIONS)}") from None


def shard_slices(size: int, n: int, align: int = ALIGN) -> list[tuple[int, int]]:
    """[0, size) in n contiguous near-equal slices whose inner bounds are multiples of `align`.

    Each inner bound is the multiple of `align` nearest to size·w/n, so slice lengths differ by at
    most `align`; some are empty only when size < n·align.
    """
    bounds = [min(size, (size * w // n + align // 2) // align * align) for w in range(n)] + [size]
    return [(bounds[w], bounds[w + 1]) for w in range(n)]


def sum_into(grads: Sequence[np.ndarray], out: np.ndarray, lo: int, hi: int) -> None:
    """out[lo:hi] = grads[0][lo:hi] + grads[1][lo:hi] + ... + grads[N-1][lo:hi], in that order."""
    dst = out[lo:hi]
    if len(grads) == 1:
        np.copyto(dst, grads[0][lo:hi])
        return
    np.add(grads[0][lo:hi], grads[1][lo:hi], out=dst)
    for g in grads[2:]:
        np.add(dst, g[lo:hi], out=dst)


def sum_except(grads: Sequence[np.ndarray], out: np.ndarray, lo: int, hi: int,
               skip: Sequence[tuple[int, int]]) -> None:
    """`sum_into` over [lo, hi) less the sorted, disjoint ranges `skip`."""
    at = lo
    for a, b in skip:
        if a > at:
            sum_into(grads, out, at, min(a, hi))
        at = max(at, b)
        if at >= hi:
            return
    if at < hi:
        sum_into(grads, out, at, hi)


def reduce_and_step(grads: Sequence[np.ndarray], reduced: np.ndarray, params: np.ndarray,
                    opt_state: dict[str, np.ndarray], optimizer, lo: int, hi: int, t: int,
                    lr: float, allreduce: Callable[[np.ndarray], None] | None = None,
                    before_step: Callable[[np.ndarray, int, int], None] | None = None,
                    deferred=None) -> tuple[float, float]:
    """Sum grads[*][lo:hi] into reduced[lo:hi], then step params[lo:hi] with it.

    With a single buffer (and no all-reduce) the optimizer reads that buffer directly: the sum of
    one term is itself, and the copy would cost a pass over the slice. Returns the seconds spent
    (summing and `before_step`, in the optimizer). before_step(source, lo, hi): called with the
    summed slice before the step, also for an empty slice (--clip-norm: every worker takes part
    in the norm's round trip). deferred: a `rowgrad.Deferred`, whose weight ranges are not
    summed but written whole by its `fill` (row-parallel weight gradients).

    (Fusing the two passes chunk by chunk, so the sum is stepped while in cache, measured no faster
    on the development machine, and every optimizer call has a fixed cost of ~30 µs.)
    """
    if hi <= lo:
        if before_step is not None:
            before_step(reduced, lo, hi)
        return 0.0, 0.0
    c0 = time.perf_counter()
    if len(grads) == 1 and allreduce is None and deferred is None:
        source = grads[0]
    else:
        if deferred is not None:
            deferred.fill(reduced, lo, hi)
        sum_except(grads, reduced, lo, hi, deferred.ranges if deferred is not None else ())
        if allreduce is not None:  # the sum must be complete across ranks before any step
            allreduce(reduced[lo:hi])
        source = reduced
    if before_step is not None:
        before_step(source, lo, hi)
    c1 = time.perf_counter()
    optimizer.step(params, source, opt_state, t, lr, lo, hi)
    return c1 - c0, time.perf_counter() - c1

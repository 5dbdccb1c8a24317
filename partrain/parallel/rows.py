"""The parent's sums after a step's compute phase, across its workers and (under MPI) machines:
the loss, the correct count, the batch-norm statistics and, with micro-batches, the rows.

Every rank makes the same calls in the same order, so each all-reduce meets its partners; the
stop flag travels with them, so every rank takes the same branch after the step.
"""
from __future__ import annotations

import numpy as np

from ..step import merge_stats, n_micro, sum_results, sum_stats

ROW_BLOCKS = ("rows", "results", "mstats")  # gradient, (loss, correct), BN statistics per row


def agree_across_machines(cross, stop, model, stats, loss: float, correct: int,
                          batch: int) -> tuple[float, int]:
    """Without micro-batches: one small all-reduce of the global loss, correct count and
    whether any rank was asked to stop; then the batch-norm statistics of the whole global batch
    (in their own dtype, so 2 ranks x N workers sum exactly as 1 rank x 2N workers)."""
    ctrl = np.array([loss, correct, float(stop.asked)], np.float64)
    cross.allreduce(ctrl)
    if ctrl[2] > 0:
        stop.requested = True
    if model.stats_size:
        total = sum_stats(stats)
        cross.allreduce(total)
        merge_stats(model, total[None, :], batch)
    return float(ctrl[0]), int(round(ctrl[1]))


def blank_other_rows(shm, micro: int, step_lo: int, lo: int, hi: int, k: int) -> None:
    """Under MPI with micro-batches: the rows this machine does not compute set to -0.0, so the
    all-reduce adds only exact zeros to each row's owner (x + -0.0 == x for every x; +0.0
    would turn a -0.0 into +0.0)."""
    mine = set(range((lo - step_lo) // micro, n_micro(hi - step_lo, micro)))
    for name in ROW_BLOCKS:
        for r in set(range(k)) - mine:
            shm[name][r] = -0.0


def micro_results(shm, model, k: int, batch: int, cross, stop) -> tuple[float, int]:
    """With micro-batches, after the compute phase: the rows made whole across machines (one
    all-reduce each, and whether any rank was asked to stop), then the loss, correct count and
    batch-norm statistics summed over rows k = 0, 1, ..., exactly as one process does."""
    if cross is not None:
        for name in ROW_BLOCKS:
            cross.allreduce(shm[name][:k].reshape(-1))
        ctrl = np.array([float(stop.asked)], np.float64)
        cross.allreduce(ctrl)
        if ctrl[0] > 0:
            stop.requested = True
    if model.stats_size:
        merge_stats(model, shm["mstats"][:k], batch)
    return sum_results(shm["results"][:k])

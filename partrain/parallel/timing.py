"""The timings of one engine step and how they split into compute, waiting, reduction,
optimizer and signalling (what `partrain bench` reports)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class StepTimes:
    """Raw timings of one step (seconds). compute: per worker; reduce/optim: per worker for
    `sharded`, one entry (the parent) for `parent`."""

    wall: float
    compute: np.ndarray
    reduce: np.ndarray
    optim: np.ndarray


def step_breakdown(wall: float, compute, reduce, optim) -> dict[str, float]:
    """Split one step's wall time into parts that add up to it.

    compute: mean worker compute time; wait: time lost to the slowest worker (in the compute phase
    and in the reduce phase); reduction / optimizer: mean time of the actors doing them;
    signalling: the rest (messages, process wake-ups, the parent's own bookkeeping).
    """
    compute = np.asarray(compute, np.float64)
    reduce = np.asarray(reduce, np.float64)
    optim = np.asarray(optim, np.float64)
    phase2 = reduce + optim
    parts = {
        "compute": float(compute.mean()),
        "wait": float(compute.max() - compute.mean() + phase2.max() - phase2.mean()),
        "reduction": float(reduce.mean()),
        "optimizer": float(optim.mean()),
    }
    parts["signalling"] = max(0.0, float(wall) - sum(parts.values()))
    return parts

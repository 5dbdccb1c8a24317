"""Going on after a lost worker (`--on-worker-failure restart`): the step it was in is done again
from its start, by fresh workers, over the same shared memory.

In phase 1 of a step the workers only write their own gradient rows, statistics and results, so
the parameters and optimizer state are still those of the step's start. In phase 2 each worker
steps its slice of them in place; a worker killed there leaves its slice half-written, and the
other slices may or may not have been stepped. So, with this option on, a worker first copies its
slice (parameters and every optimizer-state vector) into the `backup_*` blocks, marks its
`ctl[w, PHASE]` as BACKED_UP, steps, and marks STEPPED. After a loss the parent copies back every
slice whose mark says its backup is complete; a slice still marked NOT_STARTED was never touched.
The parent resets the marks before each step, and keeps its own copy of the batch-norm state
(which it merges itself). The copies cost a pass over the optimizer's vectors per step, split
over the workers like the optimizer step itself (BENCHMARKS.md, issue 13).
"""
from __future__ import annotations

import numpy as np

NOT_STARTED, BACKED_UP, STEPPED = 0.0, 1.0, 2.0
MAX_TRIES = 3  # losses of one step before the run stops after all


def backup_names(opt_state_names) -> dict[str, str]:
    """{shared block to back up: its backup's name}."""
    names = {"params": "backup_params"}
    names.update({f"opt_{k}": f"backup_opt_{k}" for k in opt_state_names})
    return names


def back_up_slice(shm, names: dict[str, str], lo: int, hi: int, ctl_row, column: int) -> None:
    """Worker side, before stepping [lo, hi): copy it into the backups, then mark the row."""
    ctl_row[column] = NOT_STARTED
    for src, dst in names.items():
        np.copyto(shm[dst][lo:hi], shm[src][lo:hi])
    ctl_row[column] = BACKED_UP


def restore_step_start(shm, names: dict[str, str], slices, marks) -> list[int]:
    """Parent side, with every worker gone: the slices whose backup is complete copied back, so
    the parameters and optimizer state are the step's start again. Returns those workers."""
    restored = []
    for w, (lo, hi) in enumerate(slices):
        if marks[w] >= BACKED_UP:
            for src, dst in names.items():
                np.copyto(shm[src][lo:hi], shm[dst][lo:hi])
            restored.append(w)
    return restored

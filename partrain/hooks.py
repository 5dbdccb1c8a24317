"""What a run tells the world as it trains: `metrics.jsonl` beside history.csv (for any tool that
tails a file), and the Python API's hooks (`api.fit(on_log_row=..., on_epoch_end=...,
on_checkpoint=...)`).

Both see exactly the rows history.csv gets, when it gets them, in the training process (rank 0
under MPI): `on_log_row(row)` for every row (a "step" row every --log-every steps, an "epoch" row
at each epoch's end), `on_checkpoint(path, which, meta)` after each checkpoint file is in place
(which: "last" for checkpoint.h5, "best" for best.h5; meta: the epoch, position, step `t`, best
validation accuracy, ...), and `on_epoch_end(row)` last, with the epoch's row, once its
checkpoints are saved: at an epoch's end the order is on_log_row(epoch row), on_checkpoint
("last"), on_checkpoint("best") when the epoch is the best so far, on_epoch_end. A hook that
raises stops the run as any error would: the last checkpoint stays, `fit(resume=...)` continues.

metrics.jsonl holds one JSON object per history row, with the filled columns only and `time`
(seconds since the epoch, when the row was written); each line is flushed as it is written. A
resumed run drops the rows logged after its checkpoint, as history.csv does.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from .errors import PartrainError

METRICS = "metrics.jsonl"


@dataclass
class Hooks:
    """The API's callbacks (each optional); see the module doc for when each is called."""

    on_log_row: Callable[[dict], Any] | None = None
    on_epoch_end: Callable[[dict], Any] | None = None
    on_checkpoint: Callable[[Path, str, dict], Any] | None = None

    def check(self) -> None:
        for name in ("on_log_row", "on_epoch_end", "on_checkpoint"):
            fn = getattr(self, name)
            if fn is not None and not callable(fn):
                raise PartrainError(f"{name} must be a function, got {type(fn).__name__}")


class RunEvents:
    """The run folder's sink: metrics.jsonl and the hooks, fed by RunDir as it writes."""

    def __init__(self, run: Path, hooks: Hooks | None = None):
        self.path = Path(run) / METRICS
        self.hooks = hooks or Hooks()
        self.last_epoch_row: dict | None = None

    def row(self, row: dict) -> None:
        """A history row was written: one JSON line, then on_log_row."""
        record = {k: _plain(v) for k, v in row.items() if v is not None and v != ""}
        record["time"] = round(time.time(), 3)
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
        if row.get("kind") == "epoch":
            self.last_epoch_row = dict(record)
        if self.hooks.on_log_row is not None:
            self.hooks.on_log_row(dict(record))

    def checkpoint(self, path: Path, which: str, meta: dict) -> None:
        if self.hooks.on_checkpoint is not None:
            self.hooks.on_checkpoint(Path(path), which, dict(meta))

    def epoch_end(self) -> None:
        if self.hooks.on_epoch_end is not None and self.last_epoch_row is not None:
            self.hooks.on_epoch_end(dict(self.last_epoch_row))

    def truncate(self, t: int) -> None:
        """Drop the lines of rows logged after step t (the checkpoint a resume starts from)."""
        if not self.path.exists():
            return
        keep, dropped = [], False
        with open(self.path) as f:
            for line in f:
                try:
                    step = json.loads(line).get("step")
                except ValueError:  # a line cut short by a kill: not a row
                    dropped = True
                    continue
                if isinstance(step, (int, float)) and step <= t:
                    keep.append(line if line.endswith("\n") else line + "\n")
                else:
                    dropped = True
        if dropped:
            tmp = self.path.with_name(self.path.name + ".tmp")
            tmp.write_text("".join(keep))
            os.replace(tmp, self.path)


def _plain(v):
    """numpy numbers as Python ones, for json."""
    return v.item() if hasattr(v, "item") else v

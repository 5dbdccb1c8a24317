"""How much memory a run's processes hold: what `partrain bench` and `fit`'s summary report.

Two figures, both from Linux's /proc (None elsewhere):
- PSS (proportional set size, /proc/<pid>/smaps_rollup) summed over the parent and its workers:
  a shared page is divided among the processes that map it, so the data set in shared memory
  counts once, not once per worker. This is the run's real footprint at that moment.
- peak RSS (VmHWM, /proc/<pid>/status) of each process: the most it ever had resident, shared
  pages counted in full. What a scheduler's per-process limit or the OOM killer sees.
"""
from __future__ import annotations

import os
from typing import Iterable

MIB = 2 ** 20


def pss_bytes(pid: int) -> int | None:
    """Proportional set size of a process, or None where it cannot be read."""
    return _field(f"/proc/{pid}/smaps_rollup", "Pss:")


def peak_rss_bytes(pid: int) -> int | None:
    """The process's largest resident set so far (VmHWM), or None where it cannot be read."""
    return _field(f"/proc/{pid}/status", "VmHWM:")


def _field(path: str, name: str) -> int | None:
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(name):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def usage(worker_pids: Iterable[int] = ()) -> dict:
    """{"total_pss_mib", "parent_peak_rss_mib", "worker_peak_rss_mib"} for this process and its
    workers (the largest worker's peak; None without workers); a figure /proc cannot give is
    None."""
    workers = list(worker_pids)
    pss = [pss_bytes(p) for p in [os.getpid()] + workers]
    peaks = [peak_rss_bytes(p) for p in workers]
    parent = peak_rss_bytes(os.getpid())
    mib = lambda b: None if b is None else round(b / MIB, 1)  # noqa: E731
    return {"total_pss_mib": None if None in pss else mib(sum(pss)),
            "parent_peak_rss_mib": mib(parent),
            "worker_peak_rss_mib": (mib(max(peaks)) if workers and None not in peaks else None)}


def describe(mem: dict) -> str:
    """One line for a summary: 'memory: 1.40 GiB in all (PSS); peak resident 0.31 GiB parent, ...'."""
    gib = lambda m: f"{m / 1024:.2f}"  # noqa: E731
    parts = []
    if mem.get("total_pss_mib") is not None:
        parts.append(f"{gib(mem['total_pss_mib'])} GiB in all (PSS)")
    peaks = []
    if mem.get("parent_peak_rss_mib") is not None:
        peaks.append(f"{gib(mem['parent_peak_rss_mib'])} GiB parent")
    if mem.get("worker_peak_rss_mib") is not None:
        peaks.append(f"{gib(mem['worker_peak_rss_mib'])} GiB largest worker")
    if peaks:
        parts.append("peak resident " + ", ".join(peaks))
    return "memory: " + "; ".join(parts) if parts else ""

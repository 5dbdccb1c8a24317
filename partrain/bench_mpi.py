"""`partrain bench --backend mpi`: what crossing machines costs per step, and what K machines
would cost.

Run under a launcher (`mpiexec -n K partrain bench --backend mpi --workers N ...`). Every rank
runs the same steps of the global batch (its part: B/K) and measures its step time and the time
its parent spent in the cross-machine all-reduces (`Cross.seconds`: the per-slice all-reduces of
the gradient, plus the small one of the loss, the stop flag and the batch-norm statistics). Rank
0 gathers one row per rank and prints them with the cross-machine share of the step and the
bandwidth the all-reduce achieved, taken as a ring all-reduce's 2(K-1)/K x S bytes per rank in
that time.

The estimate for other K keeps what one machine does as measured (its part of the batch, its
workers' compute, reduction and optimizer: the step minus the cross-machine time, i.e. weak
scaling: the global batch grows with K) and adds a ring all-reduce of the S gradient bytes at a
given bandwidth: step(K) = local + 2(K-1)/K x S / bandwidth. It ignores latency (2(K-1) messages
per slice) and stragglers, so it is a lower bound.
"""
from __future__ import annotations

import time
from typing import Callable

import numpy as np

from .bench import BenchConfig, _measure, open_images
from .errors import PartrainError
from .parallel.engine import ParallelRunner

ESTIMATE_RANKS = (2, 4, 8, 16, 32)


def ring_seconds(n_bytes: float, ranks: int, bandwidth: float) -> float:
    """Time of a bandwidth-bound ring all-reduce of n_bytes over `ranks` at bytes/s."""
    return 2 * (ranks - 1) / ranks * n_bytes / bandwidth if ranks > 1 else 0.0


def run_across(cfg: BenchConfig, cross, echo: Callable[[str], None] = print) -> tuple[list, dict]:
    """Measure on every rank; returns (rows of every rank, meta) on rank 0, ([], {}) elsewhere."""
    cfg.check()
    workers = (cfg.workers or [1])[0]
    model_spec, opt_spec = (cfg.model, dict(cfg.model_options)), (cfg.optimizer, {})
    rows = []
    with open_images(cfg, echo if cross.rank == 0 else _silent) as (images, labels, mean, std,
                                                                     source):
        too_big = [b for b in cfg.batches if b > len(labels)]
        if too_big:
            raise PartrainError(f"batch size {too_big[0]} exceeds the {len(labels)} images")
        with ParallelRunner(model_spec, opt_spec, images, labels, mean, std, seed=cfg.seed,
                            n_workers=workers, reduction="sharded", cross=cross) as runner:
            runner.set_order(np.random.default_rng(cfg.seed).permutation(len(labels)))
            grad_bytes = runner.params.nbytes
            t = 0
            for batch in cfg.batches:
                row, t = _measure(runner, batch, len(labels), cfg, t,
                                  on_start=lambda: setattr(cross, "seconds", 0.0))
                cross_s = cross.seconds  # of the timed steps only
                row.update(rank=cross.rank, ranks=cross.size, workers=workers,
                           model=cfg.model, grad_mib=round(grad_bytes / 2**20, 2),
                           cross_ms=round(1e3 * cross_s / cfg.steps, 3))
                row["cross_share"] = round(row["cross_ms"] / row["step_ms"], 4)
                row["bandwidth_gb_s"] = round(
                    ring_seconds(grad_bytes, cross.size, 1.0) / max(cross_s / cfg.steps, 1e-9)
                    / 1e9, 3)
                rows.append(row)
                if cross.watchdog is not None:
                    cross.watchdog.pet()
    everyone = cross.comm.gather(rows, root=0)
    if cross.rank:
        return [], {}
    rows = [r for part in everyone for r in part]
    meta = {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "ranks": cross.size,
            "workers_per_rank": workers, "data": source, "steps": cfg.steps}
    return rows, meta


def estimates(rows: list[dict], bandwidths_gb_s: list[float]) -> list[dict]:
    """Per batch and bandwidth, the estimated step for K machines (rank 0's measured local
    part plus a ring all-reduce of the gradient)."""
    out = []
    for r in (r for r in rows if r["rank"] == 0):
        local_ms = r["step_ms"] - r["cross_ms"]
        for bw in bandwidths_gb_s:
            for k in ESTIMATE_RANKS:
                cross_ms = 1e3 * ring_seconds(r["grad_mib"] * 2**20, k, bw * 1e9)
                out.append({"batch_per_machine": r["batch"] // r["ranks"], "bandwidth_gb_s": bw,
                            "machines": k, "step_ms": round(local_ms + cross_ms, 2),
                            "cross_share": round(cross_ms / (local_ms + cross_ms), 4)})
    return out


def format_rows(rows: list[dict], est: list[dict]) -> str:
    lines = ["rank  batch (global)  step ms  cross ms  cross share  all-reduce GB/s"]
    for r in rows:
        lines.append(f"{r['rank']:>4}  {r['batch']:>14}  {r['step_ms']:>7.2f}  "
                     f"{r['cross_ms']:>8.2f}  {r['cross_share']:>11.1%}  "
                     f"{r['bandwidth_gb_s']:>15.2f}")
    lines.append("estimate (weak scaling: each machine keeps its part of the batch; ring "
                 "all-reduce, no latency):")
    lines.append("batch/machine  GB/s  machines  step ms  cross share")
    for e in est:
        lines.append(f"{e['batch_per_machine']:>13}  {e['bandwidth_gb_s']:>4g}  "
                     f"{e['machines']:>8}  {e['step_ms']:>7.2f}  {e['cross_share']:>11.1%}")
    return "\n".join(lines)


def _silent(text: str) -> None:
    pass

"""The scaling benchmark: steady-state images/s against the number of workers.

For each reduction (`sharded`, `parent`), each worker count N and each global batch size it starts a
`ParallelRunner`, runs `warmup` steps, then times `steps` steps and reports:
- images/s, speed-up (throughput_N / throughput_1) and efficiency
  (throughput_N / (N · throughput_1));
- the mean per-step breakdown, which adds up to the measured step time: inside `runner.step`
  (`timing.step_breakdown`) compute, waiting for the slowest worker, reduction, optimizer,
  signalling (the rest of the step: messages, wake-ups, the parent's bookkeeping); and
  between_steps, the parent's time outside `runner.step` (this loop, and on a busy machine the
  time the parent waits for a core between two steps, which can exceed the step itself);
- worker start-up time, and memory (memory.py): the sum of PSS (proportional set size) over the
  parent and the workers after the timed steps — shared pages are divided among the processes
  that map them, so the data set in shared memory counts once, not N times —, the peak resident
  set of the parent and of the largest worker, and the size of the shared-memory blocks. The
  parent's peak is that of the whole command so far (a process's peak cannot be reset).
Results go to scaling.csv, scaling.json (with the machine and settings) and scaling.png, and a
table is printed. The data set is read from the store (HDF5) straight into shared memory; without
a store, random images are written to a temporary HDF5 file and read the same way.
"""
from __future__ import annotations

import contextlib
import csv
import json
import os
import platform
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import h5py
import numpy as np

from .datasets.store import channel_stats, inspect_store, label_dtype
from .nn.models import build_model
from .errors import PartrainError
from .memory import usage
from .config import TrainConfig
from .parallel.engine import ParallelRunner, usable_cores
from .parallel.timing import step_breakdown
from .progress import Phase

PARTS = ("compute", "wait", "reduction", "optimizer", "signalling", "between_steps")


@dataclass
class BenchConfig:
    model: str = "three-layer"
    model_options: dict = field(default_factory=dict)
    optimizer: str = "adam"
    lr: float = 1e-3
    workers: list[int] | None = None          # default: 1, 2, 4, ... up to the usable cores
    batches: list[int] = field(default_factory=lambda: [50, 200])
    reductions: list[str] = field(default_factory=lambda: ["sharded", "parent"])
    steps: int = 30
    warmup: int = 5
    data: str | None = None                    # a cifar10.h5; None: synthetic images
    synthetic: int = 10000                     # how many, when there is no store
    seed: int = 0
    micro_batch: int | None = None             # the order-free sum, as TrainConfig.micro_batch
    on_worker_failure: str = "stop"            # "restart": with the per-step backup copies

    def check(self) -> None:
        if self.steps < 1 or self.warmup < 0:
            raise PartrainError("--steps must be at least 1 and --warmup at least 0")
        if self.workers is not None and (not self.workers or min(self.workers) < 1):
            raise PartrainError(f"worker counts must be at least 1, got {self.workers}")
        if not self.batches or min(self.batches) < 1:
            raise PartrainError(f"batch sizes must be at least 1, got {self.batches}")


def default_workers(cores: int) -> list[int]:
    """1, 2, 4, ... up to `cores`, and `cores` itself."""
    out, n = [], 1
    while n <= cores:
        out.append(n)
        n *= 2
    if out[-1] != cores:
        out.append(cores)
    return out


@contextlib.contextmanager
def open_images(cfg: BenchConfig, echo: Callable[[str], None]):
    """Yield (images as an h5py dataset, labels, mean, std, description)."""
    if cfg.data is not None:

        info = inspect_store(cfg.data)  # validates the store and reads the labels
        with h5py.File(cfg.data, "r") as f:
            yield f["train/images"], info.train_labels, info.mean, info.std, str(cfg.data)
        return

    n = cfg.synthetic
    echo(f"no data set given: using {n:,} random images")
    rng = np.random.default_rng(cfg.seed)
    with tempfile.TemporaryDirectory(prefix="partrain-bench-") as tmp:
        path = Path(tmp) / "synthetic.h5"
        try:  # images and classes of the shape the model takes (CIFAR's unless its options say)
            model = build_model(cfg.model, **cfg.model_options)
        except (TypeError, ValueError) as e:
            raise PartrainError(f"cannot build {cfg.model}: {e}") from None
        images = rng.integers(0, 256, (n,) + tuple(model.input_shape), dtype=np.uint8)
        labels = rng.integers(0, model.n_classes, n).astype(label_dtype(model.n_classes))
        mean, std = channel_stats(images)
        with h5py.File(path, "w") as f:
            f.create_dataset("images", data=images)
        del images  # the parent keeps no copy: the data set lives in shared memory only
        with h5py.File(path, "r") as f:
            yield f["images"], labels, mean, std, f"synthetic ({n:,} random images)"


def run_scaling(cfg: BenchConfig, echo: Callable[[str], None] = print) -> tuple[list[dict], dict]:
    """Run the benchmark; returns (rows, meta)."""
    cfg.check()
    cores = usable_cores()
    workers = sorted(set(cfg.workers or default_workers(cores)))
    for n in workers:
        if n > cores:
            echo(f"warning: {n} workers but only {cores} usable cores: workers share cores, so "
                 f"the figures for N > {cores} do not measure scaling")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    if load > 0.5:
        echo(f"note: load average {load:.2f} before starting: other work is running, timings "
             f"will be noisy")
    meta = {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "host": platform.node(),
            "cpu": _cpu_name(), "usable_cores": cores, "load_average_before": load,
            "python": platform.python_version(), "numpy": np.__version__,
            "config": asdict(cfg), "workers": workers}
    rows: list[dict] = []
    if cfg.data is not None:  # the model fitted to the store's images and classes, as fit does
        from .new_run import fit_options
        cfg.model_options = fit_options(cfg.model, cfg.model_options, inspect_store(cfg.data))
    model_spec = (cfg.model, dict(cfg.model_options))
    micro = TrainConfig(model=cfg.model, model_options=dict(cfg.model_options),
                        micro_batch=cfg.micro_batch).micro_batch_of()
    meta["micro_batch"] = micro
    opt_spec = (cfg.optimizer, {})  # cfg.lr goes with every step
    with open_images(cfg, echo) as (images, labels, mean, std, source):
        meta["data"] = source
        n_images = len(labels)
        too_big = [b for b in cfg.batches if b > n_images]
        if too_big:
            raise PartrainError(f"batch size {too_big[0]} exceeds the {n_images} images")
        for reduction in cfg.reductions:
            for n in workers:
                t0 = time.perf_counter()
                try:
                    runner = ParallelRunner(model_spec, opt_spec, images, labels, mean, std,
                                            seed=cfg.seed, n_workers=n, reduction=reduction,
                                            micro_batch=micro, max_batch=max(cfg.batches),
                                            on_worker_failure=cfg.on_worker_failure)
                except (TypeError, ValueError) as e:
                    raise PartrainError(f"cannot build {cfg.model}: {e}") from None
                with runner:
                    setup_s = time.perf_counter() - t0
                    runner.set_order(np.random.default_rng(cfg.seed).permutation(n_images))
                    t = 0
                    for batch in cfg.batches:
                        what = (f"{reduction} N={n} batch {batch}: {cfg.warmup} warm-up + "
                                f"{cfg.steps} timed steps")
                        with Phase(what, cfg.warmup + cfg.steps, "step") as phase:
                            row, t = _measure(runner, batch, n_images, cfg, t, phase=phase)
                        mem = usage(runner.worker_pids)
                        row.update(model=cfg.model, reduction=reduction, workers=n,
                                   micro_batch=micro, on_worker_failure=cfg.on_worker_failure,
                                   startup_s=round(runner.startup_s, 3),
                                   setup_s=round(setup_s, 3),
                                   memory_pss_mib=mem["total_pss_mib"],
                                   parent_peak_mib=mem["parent_peak_rss_mib"],
                                   worker_peak_mib=mem["worker_peak_rss_mib"],
                                   shm_mib=round(runner.shm_bytes / 2**20, 1),
                                   row_parallel=list(runner.deferred))
                        rows.append(row)
                        echo(f"{reduction:>8}  N={n:<3} batch {batch:<5} "
                             f"{row['images_per_s']:>9.1f} img/s  step {row['step_ms']:.2f} ms")
                del runner  # its private copies of the parameters would count in the next PSS
    add_efficiency(rows)
    return rows, meta


def _measure(runner: ParallelRunner, batch: int, n_images: int, cfg: BenchConfig,
             t: int, clock: Callable[[], float] = time.perf_counter,
             on_start: Callable[[], None] | None = None, phase=None) -> tuple[dict, int]:
    """Time cfg.steps steps after cfg.warmup; the row's *_ms parts add up to its step_ms.
    on_start is called between the warm-up and the timed steps; phase (a progress.Phase) is told
    of every step (its cost falls in between_steps, outside the steps' own parts)."""
    starts = list(range(0, n_images - batch + 1, batch))
    k = 0
    tick = phase.update if phase is not None else (lambda n=1: None)
    for _ in range(cfg.warmup):
        t += 1
        runner.step(starts[k % len(starts)], starts[k % len(starts)] + batch, cfg.lr, t)
        k += 1
        tick()
    if on_start is not None:
        on_start()
    parts = dict.fromkeys(PARTS, 0.0)
    inside = 0.0
    t0 = clock()
    for _ in range(cfg.steps):
        t += 1
        lo = starts[k % len(starts)]
        runner.step(lo, lo + batch, cfg.lr, t)
        k += 1
        tick()
        lt = runner.last_times
        inside += lt.wall
        for key, v in step_breakdown(lt.wall, lt.compute, lt.reduce, lt.optim).items():
            parts[key] += v
    wall = clock() - t0
    parts["between_steps"] = max(0.0, wall - inside)
    row = {"batch": batch, "steps": cfg.steps, "images_per_s": round(cfg.steps * batch / wall, 1),
           "step_ms": round(1e3 * wall / cfg.steps, 3)}
    row.update({f"{key}_ms": round(1e3 * v / cfg.steps, 3) for key, v in parts.items()})
    return row, t


def add_efficiency(rows: list[dict]) -> None:
    """speedup = throughput_N / throughput_1 and efficiency = speedup / N, per (reduction, batch).
    Without an N = 1 row the smallest N is the reference (speed-up then relative to it)."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["reduction"], r["batch"]), []).append(r)
    for group in groups.values():
        base = min(group, key=lambda r: r["workers"])
        for r in group:
            ratio = r["images_per_s"] / base["images_per_s"]
            r["speedup"] = round(ratio * base["workers"], 3)
            r["efficiency"] = round(ratio * base["workers"] / r["workers"], 3)


COLUMNS = [("reduction", "reduction", "{}"), ("batch", "batch", "{}"), ("workers", "N", "{}"),
           ("images_per_s", "img/s", "{:.1f}"), ("speedup", "speed-up", "{:.2f}"),
           ("efficiency", "effic.", "{:.0%}"), ("step_ms", "step ms", "{:.2f}"),
           ("compute_ms", "compute", "{:.2f}"), ("wait_ms", "wait", "{:.2f}"),
           ("reduction_ms", "reduce", "{:.2f}"), ("optimizer_ms", "optim", "{:.2f}"),
           ("signalling_ms", "signal", "{:.2f}"),
           ("between_steps_ms", "between", "{:.2f}"), ("startup_s", "start s", "{:.2f}"),
           ("memory_pss_mib", "PSS MiB", "{:.0f}"), ("parent_peak_mib", "peak parent", "{:.0f}"),
           ("worker_peak_mib", "peak worker", "{:.0f}"), ("shm_mib", "shm MiB", "{:.0f}")]


def format_table(rows: list[dict]) -> str:
    head = [h for _, h, _ in COLUMNS]
    body = [[("-" if r.get(k) is None else f.format(r[k])) for k, _, f in COLUMNS] for r in rows]
    widths = [max(len(x) for x in col) for col in zip(head, *body)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(head, widths))]
    lines += ["  ".join(x.rjust(w) for x, w in zip(line, widths)) for line in body]
    return "\n".join(lines) + "\n(times are per step, in ms: compute and wait are the workers', " \
        "reduce/optim the mean over the actors doing them (reduce includes any row-parallel weight " \
        "gradients: row_parallel in scaling.json), signal the rest of the step, between the " \
        "parent's time outside the step: they add up to step ms)"


def write_results(rows: list[dict], meta: dict, out_dir) -> list[Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "scaling.csv", out / "scaling.json"]
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with open(paths[0], "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    paths[1].write_text(json.dumps({"meta": meta, "rows": rows}, indent=1, default=str) + "\n")
    if rows:
        from .plots import plot_scaling

        paths.append(plot_scaling(rows, out / "scaling.png"))
    return paths


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"

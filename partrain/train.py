"""The training loop: epochs, evaluation, history, checkpoints, exact resume.

`fit` reads as airbench's `main`: set up, `for epoch: for step:`, end of epoch, finish. One loop
drives either runner (in-process `LocalRunner`, or the worker pool `ParallelRunner`); the runner
owns the step, this module everything around it. The loop's state is one named record,
`RunState`, which is also what a checkpoint's metadata holds. Every random choice is a function
of (seed, epoch), so a run interrupted at any step boundary and resumed from its checkpoint ends
with exactly the parameters of the same run uninterrupted.
"""
from __future__ import annotations

import datetime as _dt
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from threadpoolctl import threadpool_limits

from . import __version__
from .batches import normalization, split_train_val
from .config import TrainConfig
from .recipes import optimizer_spec
from .datasets.store import load_store
from .errors import PartrainError
from .interrupt import Interrupted, catch_signals, raise_lost_interrupt
from .nn.model import Model
from .nn.models import build_model
from .optim import make_schedule
from .hooks import METRICS, Hooks
from .progress import Progress
from .rundir import MutedRunDir, RunDir, file_sha256
from .run_lock import RunLock
from .runner import make_runner
from .session import Session


# ------------------------------------------------------------------------- data choices
def epoch_order(train_idx: np.ndarray, seed: int, epoch: int) -> np.ndarray:
    """The order of the training samples in `epoch` (0-based): a function of (seed, epoch) only."""
    return train_idx[np.random.default_rng([seed, epoch]).permutation(len(train_idx))]


def batch_bounds(n: int, batch_size: int) -> list[tuple[int, int]]:
    """[lo, hi) of each step of an epoch; the last batch may be smaller (every sample is used)."""
    return [(lo, min(lo + batch_size, n)) for lo in range(0, n, batch_size)]


# --------------------------------------------------------------------------- loop state
@dataclass
class Meter:
    """Running sums over a stretch of steps: an epoch, or the window between two history rows.

    `seconds_before` is the time the stretch took in earlier calls of `fit` (a resumed epoch);
    `timed` counts only the images of this call, so images/s never mixes two processes' clocks.
    """

    loss_sum: float = 0.0
    correct: int = 0
    seen: int = 0
    seconds_before: float = 0.0
    t0: float = field(default_factory=time.perf_counter, repr=False)
    timed: int = field(default=0, repr=False)
    norm_sum: float = 0.0      # --clip-norm: the steps' gradient norms (before clipping),
    norm_steps: int = 0        # how many steps they are,
    clipped: int = 0           # and how many of them were clipped

    def add(self, loss_sum: float, correct: int, n: int, clip=None) -> None:
        """One step's sums; clip: its (gradient norm, clipped?) under --clip-norm, else None."""
        self.loss_sum += loss_sum
        self.correct += correct
        self.seen += n
        self.timed += n
        if clip is not None and np.isfinite(clip[0]):
            self.norm_sum += clip[0]
            self.norm_steps += 1
            self.clipped += bool(clip[1])

    def clip_columns(self) -> dict:
        """History's grad_norm (the mean) and clipped_frac of the stretch; {} without norms."""
        if not self.norm_steps:
            return {}
        return {"grad_norm": self.norm_sum / self.norm_steps,
                "clipped_frac": self.clipped / self.norm_steps}

    @property
    def loss(self) -> float:
        return self.loss_sum / max(self.seen, 1)

    @property
    def acc(self) -> float:
        return self.correct / max(self.seen, 1)

    def seconds(self) -> float:
        return self.seconds_before + time.perf_counter() - self.t0

    def rate(self) -> float:
        """Images per second of this call's share of the stretch."""
        return self.timed / max(time.perf_counter() - self.t0, 1e-9)

    def saved(self) -> dict:
        norms = ({"norm_sum": self.norm_sum, "norm_steps": self.norm_steps,
                  "clipped": self.clipped} if self.norm_steps else {})
        return {"loss_sum": self.loss_sum, "correct": self.correct, "seen": self.seen,
                "seconds": self.seconds(), **norms}

    @classmethod
    def restored(cls, d: dict | None) -> "Meter":
        d = d or {}
        return cls(d.get("loss_sum", 0.0), d.get("correct", 0), d.get("seen", 0),
                   d.get("seconds", 0.0), norm_sum=d.get("norm_sum", 0.0),
                   norm_steps=int(d.get("norm_steps", 0)), clipped=int(d.get("clipped", 0)))


@dataclass
class RunState:
    """Where a run is: the checkpoint's metadata, saved and restored by name.

    epoch: epochs finished; position: steps done in the current epoch; t: optimizer steps in
    all; elapsed_s: training time of earlier calls. The meters are the half-done epoch's sums
    (and its log window's), so that its history rows after a resume are the ones the
    uninterrupted run writes. best_val: the best validation accuracy; best_val_loss the best
    (lowest) loss; best_epoch: the epoch best.h5 holds (best by --early-stop-on; 0: none);
    early_stop: why --early-stop ended the run (its final line), None while it goes on.
    """

    epoch: int = 0
    position: int = 0
    t: int = 0
    best_val: float = -1.0
    elapsed_s: float = 0.0
    epoch_meter: Meter = field(default_factory=Meter)
    window: Meter = field(default_factory=Meter)
    best_epoch: int = 0
    best_val_loss: float | None = None
    early_stop: str | None = None

    def meta(self, cfg: TrainConfig, elapsed_now: float) -> dict:
        # No RNG state: every random choice (split, order, initialisation, augmentation) is
        # drawn from a generator seeded by (seed, epoch[, index]), so (epoch, position, t) fix all.
        mid_epoch = self.position > 0
        return {"epoch": self.epoch, "position": self.position, "t": self.t,
                "best_val": self.best_val, "elapsed_s": self.elapsed_s + elapsed_now,
                "epoch_meter": self.epoch_meter.saved() if mid_epoch else None,
                "window_meter": self.window.saved() if mid_epoch else None,
                "best_epoch": self.best_epoch, "best_val_loss": self.best_val_loss,
                "early_stop": self.early_stop, "config": cfg.to_dict(), "model": cfg.model}

    @classmethod
    def from_meta(cls, meta: dict, steps_per_epoch: int | None = None) -> "RunState":
        """The state a checkpoint's meta describes (its types checked by RunDir.restore). With
        the run's steps_per_epoch, a position its epochs never reach is refused: RunDir can
        only check that epoch, position and t fit some epoch length, which at epoch 0 is any."""
        state = cls(meta["epoch"], meta["position"], meta["t"], meta.get("best_val", -1.0),
                    meta.get("elapsed_s", 0.0), best_epoch=meta.get("best_epoch", 0),
                    best_val_loss=meta.get("best_val_loss"), early_stop=meta.get("early_stop"))
        spe = steps_per_epoch
        if spe is not None and (state.position > spe or state.t != state.epoch * spe
                                + state.position):
            raise PartrainError(f"the checkpoint is at step {state.position} of epoch "
                                f"{state.epoch + 1} (t {state.t}), which an epoch of {spe} "
                                f"steps never reaches: damaged, or from other settings")
        if not state.position:
            return state
        legacy = meta.get("epoch_sums")  # checkpoints before RunState: a positional list
        if legacy:
            ep_loss, ep_correct, ep_seen, win_loss, win_n, ep_seconds = legacy
            meta = {"epoch_meter": {"loss_sum": ep_loss, "correct": ep_correct, "seen": ep_seen,
                                    "seconds": ep_seconds},
                    "window_meter": {"loss_sum": win_loss, "seen": win_n}}
        state.epoch_meter = Meter.restored(meta.get("epoch_meter"))
        state.window = Meter.restored(meta.get("window_meter"))
        return state

    def start_epoch(self) -> None:
        """Fresh meters at an epoch's start; a resumed half-epoch keeps its sums (new clocks)."""
        if self.position == 0:
            self.epoch_meter, self.window = Meter(), Meter()
        else:
            self.epoch_meter.t0 = self.window.t0 = time.perf_counter()


# ---------------------------------------------------------------------------- the run
@dataclass
class Plan:
    """What a run's settings and data fix before the first step."""

    cfg: TrainConfig
    data: object
    model: object              # a model of the run's shape (its size, decay ranges, names)
    train_idx: np.ndarray
    val_idx: np.ndarray
    bounds: list
    schedule: object
    opt_spec: tuple
    micro: int | None          # the micro-batch of the order-free sum (None: off)
    mean: np.ndarray           # the run's normalisation (batches.normalization)
    std: np.ndarray

    @classmethod
    def of(cls, cfg: TrainConfig, data) -> "Plan":
        model = build_model(cfg.model, **cfg.model_options)
        micro = cfg.micro_batch_of(model)
        if micro and micro % model.group_size:
            raise PartrainError(f"--micro-batch {micro} is not a multiple of model "
                                f"{cfg.model}'s batch-norm group of {model.group_size}")
        train_idx, val_idx = split_train_val(len(data.train_labels), cfg.val_size, cfg.seed)
        # an optimizer step: --accumulate K batches, i.e. one batch of K x B (the last shorter)
        bounds = batch_bounds(len(train_idx), cfg.batch_size * cfg.accumulate)
        schedule = make_schedule(cfg.schedule, cfg.lr, cfg.epochs * len(bounds),
                                 warmup_steps=int(round(cfg.warmup_epochs * len(bounds))))
        return cls(cfg, data, model, train_idx, val_idx, bounds, schedule,
                   optimizer_spec(cfg, model, len(bounds)), micro,
                   *normalization(cfg, data, train_idx))

    @property
    def steps_per_epoch(self) -> int:
        return len(self.bounds)

    def make_runner(self, stop, cross=None, log_dir=None, step_timeout=None, on_restart=None):
        return make_runner(self.cfg, self.data, (self.cfg.model, dict(self.cfg.model_options)),
                           self.opt_spec, self.train_idx, stop, cross, log_dir, step_timeout,
                           self.micro, on_restart, (self.mean, self.std))

    def setting_up(self) -> str:
        """What happens before the first step that takes seconds ("" when nothing does)."""
        cfg, parts = self.cfg, []
        if cfg.workers > 1:
            parts.append(f"starting {cfg.workers} worker processes")
        if type(self.model).init_from_data is not Model.init_from_data:  # e.g. airbench
            parts.append(f"{cfg.model}'s data-dependent initialisation")
        return ", ".join(parts)

    def describe(self, run: Path, cross=None) -> str:
        cfg, aug = self.cfg, self.cfg.augment_spec()
        ranks = f"{cross.size} ranks x " if cross is not None and cross.size > 1 else ""
        return (f"training {cfg.model} ({self.model.layout.size:,} parameters) on "
                f"{len(self.train_idx):,} images, {ranks}{cfg.workers} worker(s), "
                f"batch {cfg.batch_size * cfg.accumulate}"
                + (f" ({cfg.accumulate} x {cfg.batch_size} accumulated)"
                   if cfg.accumulate > 1 else "")
                + (f" in micro-batches of {self.micro} (the same bits for any --workers)"
                   if self.micro else "") + ", "
                f"{cfg.optimizer} lr {cfg.lr:g}"
                + (f", gradients clipped to norm {cfg.clip_norm:g}" if cfg.clip_norm else "")
                + (f", augmentation: {_describe_augment(aug)}" if aug else "")
                + (f" (recipe {cfg.recipe})" if cfg.recipe else "") + f"; run folder {run}")


def fit(cfg: TrainConfig, run: Path, resume: bool = False, quiet: bool = False,
        evaluate_test: bool = True, max_steps: int | None = None, cross=None,
        step_timeout: float | None = None, hooks: Hooks | None = None) -> dict:
    """Train (or continue) the run in folder `run`; returns the final summary.

    max_steps stops after that many optimizer steps in this call (for tests and benchmarks), with
    a checkpoint as if interrupted. cross: the ranks of an MPI job (`parallel.mpi.Cross`), each
    calling fit alike; rank 0 alone writes the run folder and prints. step_timeout: how long the
    engine waits for a silent worker (None: its default). A new run that ends before its first
    checkpoint, for whatever reason, leaves no folder behind (see `_discard_unsaved`). hooks:
    the Python API's callbacks (hooks.py), called as history rows and checkpoints are written.
    """
    cfg.check()
    writer = cross is None or cross.rank == 0
    rd = (RunDir if writer else MutedRunDir)(run)
    if hooks is not None:
        hooks.check()
        rd.events.hooks = hooks
    # `partrain runs` sees the run as running while this is held (run_lock.py)
    lock = RunLock.take(run, 1 if cross is None else cross.size) if writer else None
    try:
        plan = Plan.of(cfg, load_store(cfg.data))
        _open_run_folder(rd, plan, resume, cross)
        # a loss that overflows to NaN is one line (in the loop), not numpy warnings before it
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            summary = _train(rd, plan, resume, quiet, evaluate_test, max_steps, cross,
                             step_timeout)
    except BaseException as e:
        if lock is not None:
            lock.release(e)
        if not resume and writer:
            _discard_unsaved(rd)
        raise
    if lock is not None:
        lock.release()
    return summary


def _discard_unsaved(rd: RunDir) -> None:
    """Remove a new run folder that holds no checkpoint and no worker log (only config.json and
    history rows): a run that never saved one cannot be resumed, and its folder would only block
    the name. A folder with logs/ stays: the error message points there."""
    path = Path(rd.path)
    if rd.has_checkpoint("last") or rd.has_checkpoint("best") or (path / "logs").exists():
        return
    for name in ("config.json", "history.csv", "summary.json", METRICS):
        (path / name).unlink(missing_ok=True)
    try:
        path.rmdir()
    except OSError:  # something else is in there: not ours to remove
        pass


def _train(rd, plan, resume, quiet, evaluate_test, max_steps, cross, step_timeout) -> dict:
    """fit's loop over epochs and steps, in the run folder `rd` opened for `plan`."""
    cfg, writer = plan.cfg, cross is None or cross.rank == 0
    progress = Progress(quiet or not writer)
    log_dir = Path(rd.path) / "logs" if writer else None  # written only by a failing worker
    # Ctrl-C is caught from before the workers start (interrupt.py): the first stops at the next
    # step boundary with a checkpoint, the second at once.
    setting_up = plan.setting_up()
    if setting_up:  # seconds of silence otherwise (forkserver, imports, the whitening's eigh)
        progress.line(f"setting up: {setting_up} ...")
    with catch_signals(cross is not None, writer) as stop, \
            plan.make_runner(stop, cross, log_dir, step_timeout,
                             on_restart=progress.warn) as runner:
        session = Session(rd, plan, runner, progress, cross)
        state = session.resume() if resume else RunState()
        ready = getattr(runner, "startup_s", None)
        progress.line(plan.describe(rd.path, cross)
                      + (f" (workers ready in {ready:.1f} s)" if ready is not None else ""))
        stopped, steps_done = None, 0
        if session.watchdog is not None:  # from the first step on, not only after it
            session.watchdog.resume()
        for epoch in range(state.epoch, cfg.epochs):
            runner.set_order(epoch_order(plan.train_idx, cfg.seed, epoch), epoch)
            progress.start_epoch(epoch, cfg.epochs, plan.steps_per_epoch, state.position)
            state.start_epoch()
            with threadpool_limits(1 if cfg.workers == 1 else None):
                for lo, hi in plan.bounds[state.position:]:
                    if stop.requested:  # also a Ctrl-C during worker start-up
                        break
                    lr = plan.schedule(state.t)
                    state.t += 1
                    loss_sum, correct = runner.step(lo, hi, lr, state.t)  # global, under MPI
                    if not np.isfinite(loss_sum):
                        raise PartrainError(f"loss became {loss_sum} at step {state.t}; "
                                            f"try a smaller --lr")
                    session.after_step(state.t, hi - lo)
                    state.position += 1
                    steps_done += 1
                    clip = runner.clip.last if runner.clip is not None else None  # --clip-norm
                    state.epoch_meter.add(loss_sum, correct, hi - lo, clip)
                    state.window.add(loss_sum, 0, hi - lo, clip)
                    if state.position % cfg.log_every == 0 or state.position == len(plan.bounds):
                        session.log_window(state, lr)
                    if max_steps is not None and steps_done >= max_steps:
                        stopped = "max_steps"
                        break
            progress.end_epoch()
            if stop.requested:
                stopped = "interrupted"
            if stopped is not None:
                session.checkpoint(state)
                break
            session.end_epoch(state)
            rd.events.epoch_end()  # the API's on_epoch_end: the epoch's row and checkpoints are in
            if state.early_stop is not None:  # --early-stop: finished (the reason is printed last)
                break
        summary = session.finish(state, stopped, steps_done, evaluate_test, stop)
    if writer and stopped is None:
        report = _write_report(rd.path, progress)
        progress.line(f"next: {'open ' + str(report) + ' (the run at a glance); ' if report else ''}"
                      f"partrain evaluate {rd.path} (per class); partrain plot {rd.path}")
        if state.early_stop is not None:
            progress.line(state.early_stop)
    return summary


def _write_report(run: Path, progress: Progress) -> Path | None:
    """report.html of the finished run (report.write_report, without a second test pass), or
    None: a report that cannot be drawn is a warning line, never a failed run. A Ctrl-C here
    (also one that landed inside a finaliser: interrupt.raise_lost_interrupt) ends the command
    with a line that says the run itself is complete."""
    try:
        from .report import write_report  # matplotlib: imported only when a report is drawn
        path = write_report(run, evaluate=False)
        raise_lost_interrupt()
        return path
    except KeyboardInterrupt as e:
        raise Interrupted(f"interrupted while drawing report.html; the run is finished and "
                          f"saved (partrain report {run} draws it)",
                          signum=getattr(e, "signum", signal.SIGINT)) from None
    except Exception as e:  # noqa: BLE001 - the run itself is done and saved
        progress.warn(f"no report.html: {' '.join(str(e).split()) or type(e).__name__}")
        return None


def _open_run_folder(rd: RunDir, plan: Plan, resume: bool, cross=None) -> None:
    """A new run writes config.json; a resumed one must have been trained on this data file.
    Under MPI every rank must have the same settings and the same data file."""
    cfg, data, sha = plan.cfg, plan.data, file_sha256(plan.cfg.data)
    if cross is not None:
        cross.agree({"settings": {k: v for k, v in cfg.to_dict().items() if k != "data"},
                     "data file sha256": sha})
        if cross.rank:
            return
    if not resume:
        rd.write_meta({
            "config": cfg.to_dict(), "partrain_version": __version__, "data_sha256": sha,
            "data_source": data.source_name, "class_names": list(data.class_names),
            "created": _dt.datetime.now().isoformat(timespec="seconds"),
            "parameters": plan.model.layout.size})
        return
    if rd.meta.get("data_sha256") != sha:
        raise PartrainError(f"data file {cfg.data} differs from the one this run was trained on")
    if not rd.has_checkpoint("last"):
        raise PartrainError(f"{rd.path} has no checkpoint to resume from: the run stopped before "
                            f"its first one; start it again with the same --name (the folder is "
                            f"reused)")


def _describe_augment(aug) -> str:
    parts = (["alternating flips"] if aug.flip else []) + (
        [f"translate {aug.translate} px"] if aug.translate else [])
    return " + ".join(parts)

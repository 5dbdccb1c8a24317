"""The learning-rate range test (Leslie Smith 2015; fastai's `lr_find`): train from a fresh
model for a few hundred steps while the learning rate grows exponentially, and record the loss.

The steps are fit's own: the same `train.Plan` (model, optimizer, normalisation, batches in
fit's epoch order, augmentation, micro-batches) and the same runner (`Plan.make_runner`: this
process for one worker, the worker pool for more), so the curve is the one `partrain fit` would
see at each learning rate. The learning rate is already an argument of every runner step (the
schedule's value in fit), so the sweep simply passes its own; nothing in the loop changes.

No run folder and no checkpoint is made; the model's parameters are dropped when the sweep ends.
What stays is the curve: `lr_find.csv`, `lr_find.json` and `lr_find.png` (`write_outputs`), each
written through a temporary file, so a failed write leaves no half a file.

The suggestion is the learning rate at the steepest descent of the smoothed loss against
log10(lr), before the smoothed loss reaches its minimum (see `suggest`).
"""
from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from threadpoolctl import threadpool_limits

from .config import TrainConfig
from .datasets.store import load_store
from .ema import AirbenchLookahead
from .errors import PartrainError
from .interrupt import catch_signals
from .new_run import fitted_config
from .rundir import write_atomic
from .train import Plan, epoch_order


@dataclass
class Sweep:
    """How the learning rate moves and when the test stops.

    lr of step i (0-based) = start_lr·(end_lr/start_lr)^(i/(steps-1)): the first step has
    start_lr, the last end_lr. beta: the smoothing of the loss (an exponential moving average
    with bias correction); its lag is about beta/(1-beta) steps, 9 for 0.9, which over 200 steps
    and 8 decades is a third of a decade (fastai's 0.98 lags by two decades there). The test
    stops when the smoothed loss exceeds `diverge` times its minimum, or a loss is not finite."""

    start_lr: float = 1e-7
    end_lr: float = 10.0
    steps: int = 200
    beta: float = 0.9
    diverge: float = 4.0

    def check(self) -> None:
        for name in ("start_lr", "end_lr", "beta", "diverge"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value):
                raise PartrainError(f"--{name.replace('_', '-')} must be a finite number, "
                                    f"got {value!r}")
        if self.start_lr <= 0:
            raise PartrainError(f"--start-lr must be more than 0, got {self.start_lr:g}")
        if self.start_lr >= self.end_lr:
            raise PartrainError(f"--start-lr {self.start_lr:g} must be below --end-lr "
                                f"{self.end_lr:g}")
        if self.steps < 2:
            raise PartrainError(f"--steps must be at least 2, got {self.steps}")
        if not 0 <= self.beta < 1:
            raise PartrainError(f"--beta must be in [0, 1), got {self.beta:g}")
        if self.diverge <= 1:
            raise PartrainError(f"--diverge must be more than 1, got {self.diverge:g}")

    def lr(self, i: int) -> float:
        return self.start_lr * (self.end_lr / self.start_lr) ** (i / (self.steps - 1))


@dataclass
class Curve:
    """What the sweep measured: one row per finished step with a finite loss (step is 1-based),
    why it ended (`stopped`: None when it ran all its steps), and the suggestion."""

    sweep: Sweep
    rows: list[dict] = field(default_factory=list)
    stopped: str | None = None
    suggestion: dict | None = None
    interrupt: BaseException | None = None  # a Ctrl-C's Interrupted, for the caller to raise

    def column(self, name: str) -> np.ndarray:
        return np.array([r[name] for r in self.rows], dtype=float)


class Smoother:
    """Exponential moving average with bias correction (as fastai's smoothed loss)."""

    def __init__(self, beta: float):
        self.beta, self.avg, self.n = beta, 0.0, 0

    def add(self, value: float) -> float:
        self.n += 1
        self.avg = self.beta * self.avg + (1 - self.beta) * value
        return self.avg / (1 - self.beta ** self.n)


def sweep_batches(plan: Plan, steps: int):
    """(epoch, lo, hi) of fit's first `steps` steps: its epochs in its order, as many as it
    takes (a small data set is gone through more than once)."""
    i, epoch = 0, 0
    while True:
        for lo, hi in plan.bounds:
            if i == steps:
                return
            yield epoch, lo, hi
            i += 1
        epoch += 1


def run_sweep(cfg: TrainConfig, sweep: Sweep, echo=None) -> Curve:
    """Run the range test with fit's settings `cfg`; returns the curve with its suggestion.

    A Ctrl-C stops after the current step (`interrupted` is then the curve's `stopped`); the
    caller writes what was measured and reports it."""
    cfg.check()
    sweep.check()
    data = load_store(cfg.data, splits=("train",))
    cfg = fitted_config(cfg, data)  # the model for the store's images and classes, as fit's
    plan = Plan.of(cfg, data)
    curve = Curve(sweep)
    say = echo or (lambda text: None)
    say(f"lr-find: {cfg.model} ({plan.model.layout.size:,} parameters), {cfg.optimizer}, "
        f"batch {cfg.batch_size}, {cfg.workers} worker(s); lr {sweep.start_lr:g} -> "
        f"{sweep.end_lr:g} over {sweep.steps} steps")
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"), \
            catch_signals() as stop, plan.make_runner(stop) as runner:
        lookahead = (AirbenchLookahead(runner.params, runner.state, sweep.steps)
                     if cfg.lookahead else None)
        with threadpool_limits(1 if cfg.workers == 1 else None):
            _steps(plan, sweep, runner, stop, lookahead, curve, say)
    curve.suggestion = suggest(curve)
    return curve


def _steps(plan, sweep, runner, stop, lookahead, curve, say) -> None:
    """The sweep's loop: fit's step with the sweep's learning rate, until the loss explodes."""
    smoother, best, epoch_set = Smoother(sweep.beta), math.inf, None
    report_every = max(1, sweep.steps // 10)
    for i, (epoch, lo, hi) in enumerate(sweep_batches(plan, sweep.steps)):
        if stop.requested:
            curve.stopped = "interrupted"
            curve.interrupt = stop.interrupted(f"interrupted after {i} of {sweep.steps} steps; "
                                               f"the curve so far is written")
            return
        if epoch != epoch_set:
            runner.set_order(epoch_order(plan.train_idx, plan.cfg.seed, epoch), epoch)
            epoch_set = epoch
        lr, t = sweep.lr(i), i + 1
        loss_sum, _ = runner.step(lo, hi, lr, t)
        loss = float(loss_sum) / (hi - lo)
        if not math.isfinite(loss):
            curve.stopped = f"loss became {loss} at step {t} (lr {lr:.3g})"
            return
        if lookahead is not None:
            lookahead.after_step(t)
        smoothed = smoother.add(loss)
        best = min(best, smoothed)
        curve.rows.append({"step": t, "lr": lr, "loss": loss, "smoothed": smoothed})
        if t % report_every == 0:
            say(f"step {t}/{sweep.steps}: lr {lr:.3g}  loss {loss:.4g}  smoothed {smoothed:.4g}")
        if smoothed > sweep.diverge * best:
            curve.stopped = (f"smoothed loss {smoothed:.4g} exceeded {sweep.diverge:g}x its "
                             f"minimum {best:.4g} at step {t} (lr {lr:.3g})")
            return


def suggest(curve: Curve) -> dict | None:
    """The learning rate at the steepest descent of the smoothed loss, or None (with no
    descent to speak of: the range starts too late or the loss never fell).

    The slope d(smoothed)/d(log10 lr) is a central difference over ±w steps (w = steps/40, 5 of
    200: enough to ride over one step's noise), taken only before the smoothed minimum (after it
    the loss is on its way up) and past the first w steps (where the bias correction still
    moves the average). The steepest point is where the loss falls fastest per decade, so a
    fit there learns fast yet stays well below the rate where it blows up; Smith's rule of
    thumb of a tenth of the minimum's lr lands near it (`lr_min_over_10` in the JSON)."""
    lr, y = curve.column("lr"), curve.column("smoothed")
    if len(y) < 3:
        return None
    w = max(1, curve.sweep.steps // 40)
    low = int(np.argmin(y))
    x = np.log10(lr)
    candidates = range(w, min(low, len(y) - w))
    if not candidates:
        return None
    slopes = [(y[i + w] - y[i - w]) / (x[i + w] - x[i - w]) for i in candidates]
    k = int(np.argmin(slopes))
    i = candidates[k]
    if slopes[k] >= 0 or y[0] - y[low] < 0.02 * abs(y[0]):
        return None
    return {"rule": "steepest descent of the smoothed loss", "lr": float(lr[i]),
            "step": int(curve.rows[i]["step"]), "smoothed": float(y[i]),
            "slope_per_decade": float(slopes[k]), "lr_min_smoothed": float(lr[low]),
            "lr_min_over_10": float(lr[low] / 10)}


# ------------------------------------------------------------------------------ the outputs
COLUMNS = ("step", "lr", "loss", "smoothed")


def write_outputs(curve: Curve, settings: dict, out_dir: Path) -> list[Path]:
    """lr_find.csv (the rows), lr_find.json (the settings, the sweep, why it stopped, the
    suggestion, the rows) and lr_find.png in out_dir (made if missing); returns their paths.
    settings: the TrainConfig fields the sweep used (`TrainConfig.to_dict`, or fewer)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    text = io.StringIO()
    writer = csv.DictWriter(text, COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: repr(r[k]) for k in COLUMNS} for r in curve.rows)
    paths = [out_dir / "lr_find.csv", out_dir / "lr_find.json", out_dir / "lr_find.png"]
    write_atomic(paths[0], text.getvalue().encode())
    doc = {"settings": settings, "sweep": asdict(curve.sweep), "stopped": curve.stopped,
           "suggestion": curve.suggestion, "rows": curve.rows}
    write_atomic(paths[1], (json.dumps(doc, indent=1, allow_nan=False) + "\n").encode())
    write_atomic(paths[2], plot_curve(curve, settings))
    return paths


def plot_curve(curve: Curve, settings: dict) -> bytes:
    """The PNG's bytes: loss and smoothed loss against lr (log axis), the suggestion marked."""
    from matplotlib.figure import Figure

    from .plots import DPI, FIGSIZE
    fig = Figure(figsize=FIGSIZE, dpi=DPI, layout="constrained")
    ax = fig.subplots()
    lr, loss, smoothed = curve.column("lr"), curve.column("loss"), curve.column("smoothed")
    if len(lr):
        ax.plot(lr, loss, color="tab:blue", alpha=0.3, linewidth=0.8, label="loss per step")
        ax.plot(lr, smoothed, color="tab:blue", linewidth=1.8,
                label=f"smoothed (EMA, beta {curve.sweep.beta:g})")
        ax.set_ylim(*_loss_range(loss, smoothed))
    else:
        ax.text(0.5, 0.5, "no finite loss", transform=ax.transAxes, ha="center", color="0.4")
    s = curve.suggestion
    if s is not None:
        ax.axvline(s["lr"], color="tab:red", linestyle="--", linewidth=1)
        ax.plot([s["lr"]], [s["smoothed"]], "o", color="tab:red", markersize=7,
                label=f"suggested lr {s['lr']:.2g} (steepest descent)")
    ax.set_xscale("log")
    ax.set_xlim(curve.sweep.start_lr, curve.sweep.end_lr)
    ax.set(title=f"Learning-rate range test: {settings.get('model')}, "
                 f"{settings.get('optimizer')}, batch {settings.get('batch_size')}", xlabel="learning rate (log scale)", ylabel="training loss")
    if curve.stopped is not None and curve.stopped != "interrupted" and len(lr):
        ax.axvline(lr[-1], color="0.5", linestyle=":", linewidth=1)
        ax.text(lr[-1], 0.5, f" stopped at lr {lr[-1]:.2g}: loss diverging", fontsize=8,
                transform=ax.get_xaxis_transform(), rotation=90, ha="left", va="center",
                color="0.35")
    ax.grid(alpha=0.3, which="major")
    ax.grid(alpha=0.08, which="minor")
    if len(lr):
        ax.legend(fontsize=8, loc="upper left")
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _loss_range(loss: np.ndarray, smoothed: np.ndarray) -> tuple[float, float]:
    """The y range that shows the descent: the explosion at the end would flatten it, so the
    top is at most two drops (start to minimum) above the start, or 30 % above the minimum."""
    first, low = smoothed[0], smoothed.min()
    drop = max(first - low, 0.0)
    top = min(max(smoothed.max(), first), max(first + 2 * drop, 1.3 * low, 1.05 * first))
    bottom = max(loss.min(), low - drop)
    pad = 0.05 * (top - bottom) + 1e-12
    return bottom - pad, top + pad

"""The training loop: epochs, evaluation, history, checkpoints, exact resume.

One loop drives either runner (in-process `LocalRunner`, or the worker pool `ParallelRunner`); the
runner owns the step, this module owns everything around it. Every random choice is a function of
(seed, epoch), so a run interrupted at any step boundary and resumed from its checkpoint ends with
exactly the parameters of the same run uninterrupted.
"""
from __future__ import annotations

import datetime as _dt
import signal
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from . import __version__
from .batches import normaliser
from .config import TrainConfig, optimizer_spec
from .errors import PartrainError
from .evaluate import accuracy, tta_accuracy
from .nn.models import build_model
from .rundir import RunDir, file_sha256


# ------------------------------------------------------------------------- data choices
def split_train_val(n: int, val_size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A seeded split of range(n) into sorted train and validation indices."""
    if val_size >= n:
        raise PartrainError(f"--val-size {val_size} leaves no training data (train set has {n})")
    perm = np.random.default_rng([seed, 0x5A11]).permutation(n)
    return np.sort(perm[val_size:]), np.sort(perm[:val_size])


def epoch_order(train_idx: np.ndarray, seed: int, epoch: int) -> np.ndarray:
    """The order of the training samples in `epoch` (0-based): a function of (seed, epoch) only."""
    return train_idx[np.random.default_rng([seed, epoch]).permutation(len(train_idx))]


def batch_bounds(n: int, batch_size: int) -> list[tuple[int, int]]:
    """[lo, hi) of each step of an epoch; the last batch may be smaller (every sample is used)."""
    return [(lo, min(lo + batch_size, n)) for lo in range(0, n, batch_size)]




class AirbenchLookahead:
    """airbench94's Lookahead: every 5 steps the slow copy of the parameters and of the model
    state (batch-norm running statistics; the whitening filters there never change, so neither
    does their average) moves toward the trained ones, slow = d·slow + (1-d)·fast with
    d = 0.95⁵·(t/T)³, and the trained ones are reset to it; after the last step T, they are set to
    the slow copy (d = 1). Early on d ≈ 0 (almost no averaging); at the end d ≈ 0.77. As in
    airbench94 (its state_dict sweep), frozen parameters are averaged too: the whitening bias
    still moves toward its slow copy after it stops training. Runs in the parent between steps
    (the workers are idle then); the slow copies are checkpointed, so resume stays exact.
    """

    EVERY, BASE = 5, 0.95 ** 5

    def __init__(self, params: np.ndarray, state: np.ndarray, total_steps: int):
        from .ema import Lookahead
        self.total = total_steps
        self.parts = [(Lookahead(), params), (Lookahead(), state)]
        for la, arr in self.parts:
            la.init(arr)

    def after_step(self, t: int) -> None:
        """Call after step t (1-based) is done."""
        if t % self.EVERY == 0:
            self._update(1.0 - self.BASE * (min(t, self.total) / self.total) ** 3)
        if t == self.total:
            self._update(0.0)

    def _update(self, alpha: float) -> None:
        for la, arr in self.parts:
            if arr.size:
                la.update(arr, alpha)

    def arrays(self) -> dict[str, np.ndarray]:
        return {"lookahead.params": self.parts[0][0].slow, "lookahead.state": self.parts[1][0].slow}

# ------------------------------------------------------------------------ Ctrl-C handling
class Interrupted(Exception):
    """Ctrl-C arrived; the loop stopped at a step boundary and saved a checkpoint."""


@contextmanager
def stop_at_step_boundary():
    """First SIGINT sets a flag the loop checks after each step; a second one interrupts at once."""
    state = {"stop": False}
    if not _is_main_thread():
        yield state
        return

    def handler(signum, frame):
        if state["stop"]:
            raise KeyboardInterrupt
        state["stop"] = True
        print("\nstopping after this step (Ctrl-C again to force)", file=sys.stderr, flush=True)

    old = signal.signal(signal.SIGINT, handler)
    try:
        yield state
    finally:
        signal.signal(signal.SIGINT, old)


def _is_main_thread() -> bool:
    import threading
    return threading.current_thread() is threading.main_thread()


# ------------------------------------------------------------------------------- resume
def resume_conflicts(saved: TrainConfig, asked: dict) -> list[str]:
    """Names of settings in `asked` that differ from the saved run and would break exactness."""
    out = []
    for k, v in asked.items():
        if k in TrainConfig.FREE_ON_RESUME or v is None:
            continue
        if k == "epochs" and saved.schedule == "constant" and v >= saved.epochs:
            continue  # more epochs of a constant schedule extend the same run exactly
        if getattr(saved, k) != v:
            out.append(f"{k} ({getattr(saved, k)!r} -> {v!r})")
    return out


# --------------------------------------------------------------------------------- fit
class Progress:
    """What the user sees while training.

    - On a terminal (the stream is a TTY): a tqdm bar per epoch with steps done, elapsed and ETA,
      the loss of the last logged window, the accuracy so far this epoch and images/s; at the end
      of the epoch the bar is replaced by a one-line summary (`line`).
    - Elsewhere (CI logs, pipes, files): the same numbers as a plain line, with the epoch's ETA,
      at most every tenth of an epoch and every `plain_every` seconds; no carriage returns, so
      logs stay readable.
    - quiet: nothing at all; the caller prints the final summary.
    Summaries (`line`) go to stdout; the bar goes to `stream` (stderr by default).
    """

    def __init__(self, quiet: bool, stream=None, tty: bool | None = None,
                 plain_every: float = 5.0):
        self.quiet, self.plain_every = quiet, plain_every
        self.stream = stream or sys.stderr
        self.tty = (hasattr(self.stream, "isatty") and self.stream.isatty()) if tty is None else tty
        self.bar = None
        self.epoch = self.epochs = self.total = self.done0 = self.next_plain = 0
        self.t0 = self.last_plain = time.perf_counter()

    def line(self, text: str) -> None:
        if self.quiet:
            return
        if self.bar is not None:
            self.bar.write(text, file=sys.stdout)
        else:
            print(text, flush=True)

    def start_epoch(self, epoch: int, epochs: int, total: int, done: int) -> None:
        """Epoch `epoch` (0-based) of `epochs` has `total` steps, `done` of them already (resume)."""
        self.epoch, self.epochs, self.total, self.done0 = epoch, epochs, total, done
        self.t0 = self.last_plain = time.perf_counter()
        self.next_plain = done + max(1, total // 10)
        if self.quiet or not self.tty:
            return
        from tqdm import tqdm
        self.bar = tqdm(total=total, initial=done, desc=f"epoch {epoch + 1}/{epochs}",
                        unit="step", file=self.stream, leave=False, dynamic_ncols=True)

    def update(self, pos: int, loss: float, acc: float, ips: float) -> None:
        """`pos` steps of the epoch are done; loss of the last window, accuracy so far, img/s."""
        if self.quiet:
            return
        if self.bar is not None:
            self.bar.set_postfix_str(f"loss {loss:.3f}, acc {acc:.1%}, {ips:,.0f} img/s",
                                     refresh=False)
            self.bar.update(pos - self.bar.n)
        elif (not self.tty and self.next_plain <= pos < self.total  # the epoch line ends it
              and time.perf_counter() - self.last_plain >= self.plain_every):
            self.next_plain = pos + max(1, self.total // 10)
            self.last_plain = now = time.perf_counter()
            eta = (now - self.t0) / max(pos - self.done0, 1) * (self.total - pos)
            print(f"epoch {self.epoch + 1}/{self.epochs} step {pos}/{self.total}: loss {loss:.4f}"
                  f"  acc {acc:.1%}  {ips:,.0f} img/s  ETA {format_duration(eta)}", flush=True)

    def end_epoch(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def format_duration(seconds: float) -> str:
    """12.3 s, 4 min 05 s, 1 h 02 min."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    m, s = divmod(int(round(seconds)), 60)
    if m < 60:
        return f"{m} min {s:02d} s"
    h, m = divmod(m, 60)
    return f"{h} h {m:02d} min"


def make_runner(cfg: TrainConfig, data, model_spec, opt_spec, train_idx=None):
    """LocalRunner for one worker, the engine for more; both initialise the model identically
    (init_from_data sees only `train_idx`) and augment as cfg says."""
    common = dict(seed=cfg.seed, augment=cfg.augment_spec(), init_idx=train_idx)
    if cfg.workers == 1:
        from .runner import LocalRunner
        return LocalRunner(model_spec, opt_spec, data.train_images, data.train_labels,
                           data.mean, data.std, **common)
    from .parallel.engine import ParallelRunner
    return ParallelRunner(model_spec, opt_spec, data.train_images, data.train_labels,
                          data.mean, data.std, n_workers=cfg.workers, reduction=cfg.reduction,
                          **common)


def fit(cfg: TrainConfig, run: Path, resume: bool = False, quiet: bool = False,
        evaluate_test: bool = True, max_steps: int | None = None) -> dict:
    """Train (or continue) the run in folder `run`; returns the final summary.

    max_steps stops after that many optimizer steps in this call (for tests and benchmarks), with
    a checkpoint as if interrupted.
    """
    from threadpoolctl import threadpool_limits

    from .datasets.store import load_store

    cfg.check()
    run = Path(run)
    rd = RunDir(run)
    data = load_store(cfg.data)
    sha = file_sha256(cfg.data)
    model = build_model(cfg.model, **cfg.model_options)
    model_spec = (cfg.model, dict(cfg.model_options))
    scale, shift = normaliser(data.mean, data.std)
    train_idx, val_idx = split_train_val(len(data.train_labels), cfg.val_size, cfg.seed)
    bounds = batch_bounds(len(train_idx), cfg.batch_size)
    steps_per_epoch = len(bounds)
    opt_spec = optimizer_spec(cfg, model, steps_per_epoch)
    from .optim import make_schedule
    schedule = make_schedule(cfg.schedule, cfg.lr, cfg.epochs * steps_per_epoch,
                             warmup_steps=int(round(cfg.warmup_epochs * steps_per_epoch)))

    epoch, pos, t, best_val = 0, 0, 0, -1.0
    elapsed_before, carried = 0.0, None
    if resume:
        meta_run = rd.meta
        if meta_run.get("data_sha256") != sha:
            raise PartrainError(f"data file {cfg.data} differs from the one this run was trained on")
        if not rd.has_checkpoint("last"):
            raise PartrainError(f"{run} has no checkpoint to resume from")
    else:
        rd.write_meta({
            "config": cfg.to_dict(), "partrain_version": __version__, "data_sha256": sha,
            "data_source": data.source_name, "class_names": list(data.class_names),
            "created": _dt.datetime.now().isoformat(timespec="seconds"),
            "parameters": model.layout.size})

    progress = Progress(quiet)
    with make_runner(cfg, data, model_spec, opt_spec, train_idx) as runner:
        lookahead = (AirbenchLookahead(runner.params, runner.state, cfg.epochs * steps_per_epoch)
                     if cfg.lookahead else None)
        # The engine copied the images into shared memory: read validation batches from there and
        # let the parent's own copy go (150 MB for CIFAR-10).
        data.train_images = runner.images

        def saved_arrays() -> dict:
            # What a checkpoint holds: the flat vectors of the runner (and the Lookahead's slow
            # copies), written by `checkpoint` and copied back, checked, by `rd.restore`.
            arrays = {"params": runner.params, "state": runner.state}
            arrays.update({f"opt.{k}": v for k, v in runner.opt_state.items()})
            if lookahead is not None:
                arrays.update(lookahead.arrays())
            return arrays

        if resume:
            meta = rd.restore(saved_arrays())
            epoch, pos, t = meta["epoch"], meta["position"], meta["t"]
            if epoch >= cfg.epochs:
                raise PartrainError(f"{run} has already finished its {epoch} epochs"
                                    + (" (--epochs N trains it further)"
                                       if cfg.schedule == "constant" else ""))
            rd.truncate_history(t)
            best_val, elapsed_before = meta.get("best_val", -1.0), meta.get("elapsed_s", 0.0)
            carried = meta.get("epoch_sums") if pos else None
            if cfg.to_dict() != meta_run["config"]:  # e.g. more epochs: config.json says so
                rd.write_meta({**meta_run, "config": cfg.to_dict()})
            progress.line(f"resuming {run} at epoch {epoch + 1}, step {pos}/{steps_per_epoch}")
        eval_model = build_model(cfg.model, **cfg.model_options)
        eval_model.bind(runner.params, None, runner.state)

        def checkpoint(ep, p, which="last"):
            # No RNG state is saved because there is none to save: every random choice (the
            # train/val split, each epoch's order, initialisation) is drawn from a generator
            # seeded by (seed, epoch) when needed, so (epoch, position, t) fixes all of them.
            # epoch_sums are the running totals of a half-done epoch, so that its history row
            # after a resume is the one the uninterrupted run writes.
            rd.save(which, saved_arrays(), {
                "epoch": ep, "position": p, "t": t, "best_val": best_val,
                "elapsed_s": elapsed_before + (time.perf_counter() - t_start),
                "epoch_sums": [ep_loss, ep_correct, ep_seen, win_loss, win_n,
                               ep_time_before + time.perf_counter() - ep_t0] if p else None,
                "config": cfg.to_dict(), "model": cfg.model})

        t_start = time.perf_counter()
        images_done = 0
        steps_this_call = 0
        stopped = None
        aug = cfg.augment_spec()
        progress.line(f"training {cfg.model} ({model.layout.size:,} parameters) on "
                      f"{len(train_idx):,} images, {cfg.workers} worker(s), batch {cfg.batch_size}, "
                      f"{cfg.optimizer} lr {cfg.lr:g}"
                      + (f", augmentation: {_describe_augment(aug)}" if aug else "")
                      + (f" (recipe {cfg.recipe})" if cfg.recipe else "") + f"; run folder {run}")
        with stop_at_step_boundary() as flag:
            while epoch < cfg.epochs and stopped is None:
                order = epoch_order(train_idx, cfg.seed, epoch)
                runner.set_order(order, epoch)
                progress.start_epoch(epoch, cfg.epochs, steps_per_epoch, pos)
                ep_t0, ep_loss, ep_correct, ep_seen = time.perf_counter(), 0.0, 0, 0
                win_t0, win_imgs, win_loss, win_n = time.perf_counter(), 0, 0.0, 0
                ep_time_before = 0.0
                if carried:  # resuming mid-epoch: continue the epoch's and the window's sums
                    ep_loss, ep_correct, ep_seen, win_loss, win_n, ep_time_before = carried
                    carried = None
                with threadpool_limits(1 if cfg.workers == 1 else None):
                    while pos < steps_per_epoch:
                        lo, hi = bounds[pos]
                        lr = schedule(t)
                        t += 1
                        loss_sum, correct = runner.step(lo, hi, lr, t)
                        if lookahead is not None:
                            lookahead.after_step(t)
                        n = hi - lo
                        pos += 1
                        images_done += n
                        steps_this_call += 1
                        ep_loss += loss_sum
                        ep_correct += correct
                        ep_seen += n
                        win_imgs += n
                        win_loss += loss_sum
                        win_n += n
                        if pos % cfg.log_every == 0 or pos == steps_per_epoch:
                            now = time.perf_counter()
                            ips = win_imgs / max(now - win_t0, 1e-9)
                            rd.append_history({
                                "kind": "step", "epoch": epoch + 1, "step": t,
                                "loss": win_loss / win_n, "lr": lr, "images_per_s": round(ips, 1)})
                            progress.update(pos, win_loss / win_n, ep_correct / ep_seen, ips)
                            win_t0, win_imgs, win_loss, win_n = now, 0, 0.0, 0
                        if not np.isfinite(loss_sum):
                            raise PartrainError(f"loss became {loss_sum} at step {t}; "
                                                f"try a smaller --lr")
                        if flag["stop"]:
                            stopped = "interrupted"
                            break
                        if max_steps is not None and steps_this_call >= max_steps:
                            stopped = "max_steps"
                            break
                progress.end_epoch()
                if stopped is not None:
                    checkpoint(epoch, pos)
                    break
                val_acc = accuracy(eval_model, data.train_images, data.train_labels, scale, shift,
                                   val_idx)[0] if len(val_idx) else float("nan")
                ep_time = ep_time_before + time.perf_counter() - ep_t0
                train_acc = ep_correct / max(ep_seen, 1)
                rd.append_history({
                    "kind": "epoch", "epoch": epoch + 1, "step": t, "loss": ep_loss / max(ep_seen, 1),
                    "train_acc": train_acc, "val_acc": val_acc, "time_s": round(ep_time, 2),
                    "images_per_s": round(ep_seen / ep_time, 1)})
                progress.line(f"epoch {epoch + 1}/{cfg.epochs}: loss {ep_loss / max(ep_seen, 1):.4f}"
                              f"  train acc {train_acc:.1%}  val acc {val_acc:.1%}  "
                              f"{ep_time:.1f} s  {ep_seen / ep_time:.0f} img/s")
                epoch, pos = epoch + 1, 0
                if val_acc > best_val:
                    best_val = val_acc
                    checkpoint(epoch, pos, "best")
                checkpoint(epoch, pos)

        train_time = time.perf_counter() - t_start
        summary = {"run": str(run), "epochs_done": epoch, "steps": t,
                   "train_time_s": round(train_time, 2),
                   "total_train_time_s": round(elapsed_before + train_time, 2),
                   "images_per_s": round(images_done / max(train_time, 1e-9), 1),
                   "best_val_acc": best_val, "stopped": stopped}
        if stopped == "interrupted":
            raise Interrupted(f"interrupted at epoch {epoch + 1}, step {pos}/{steps_per_epoch}; "
                              f"checkpoint saved — continue with: partrain fit --resume {run}")
        if stopped is None and evaluate_test:
            e0 = time.perf_counter()
            if cfg.tta != "none":
                summary["test_acc"], summary["test_acc_tta"] = tta_accuracy(
                    eval_model, data.test_images, data.test_labels, scale, shift, cfg.tta)
                summary["tta"] = cfg.tta
            else:
                summary["test_acc"] = accuracy(eval_model, data.test_images, data.test_labels,
                                               scale, shift)[0]
            summary["test_time_s"] = round(time.perf_counter() - e0, 2)
        rd.write_summary(summary)
        if stopped is None:
            tested = ""
            if "test_acc" in summary:
                tested = f", test acc {summary['test_acc']:.2%}"
                if "test_acc_tta" in summary:
                    tested += f", with TTA ({cfg.tta}) {summary['test_acc_tta']:.2%}"
                tested += f" (test {format_duration(summary['test_time_s'])})"
            progress.line(
                f"done: {epoch} epochs in {format_duration(elapsed_before + train_time)} "
                f"({summary['images_per_s']:,.0f} img/s), best val acc {best_val:.1%}" + tested
                + f"\nnext: partrain plot {run}; partrain evaluate {run}")
        else:
            progress.line(f"stopped after {steps_this_call} steps (--max-steps) at epoch "
                          f"{epoch + 1}, step {pos}/{steps_per_epoch}; continue with: "
                          f"partrain fit --resume {run}")
        return summary


def _describe_augment(aug) -> str:
    parts = (["alternating flips"] if aug.flip else []) + (
        [f"translate {aug.translate} px"] if aug.translate else [])
    return " + ".join(parts)

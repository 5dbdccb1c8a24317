"""The training loop: epochs, evaluation, history, checkpoints, exact resume.

One loop drives either runner (in-process `LocalRunner`, or the worker pool `ParallelRunner`); the
runner owns the step, this module owns everything around it. Every random choice is a function of
(seed, epoch), so a run interrupted at any step boundary and resumed from its checkpoint ends with
exactly the parameters of the same run uninterrupted.
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import __version__
from .batches import make_batch, normaliser
from .ema import AirbenchLookahead
from .errors import PartrainError
from .interrupt import Interrupted, catch_signals
from .nn.models import MODELS, build_model
from .runner import make_runner

CONFIG_FILE, HISTORY_FILE = "config.json", "history.csv"
CHECKPOINT_FILE, BEST_FILE = "checkpoint.h5", "best.h5"


@dataclass
class TrainConfig:
    """Every setting of a run; saved as config.json and compared on resume."""

    model: str = "three-layer"
    model_options: dict = field(default_factory=dict)
    optimizer: str = "adam"
    lr: float = 1e-3
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float | None = None  # None: the model's own default (course: reg 1e-3)
    schedule: str = "constant"
    warmup_epochs: float = 0.0
    batch_size: int = 50
    epochs: int = 3
    seed: int = 0
    val_size: int = 1000
    workers: int = 1
    reduction: str = "sharded"
    data: str = "data/cifar10.h5"
    log_every: int = 20
    recipe: str | None = None       # the preset (recipes.py) these settings started from
    augment_flip: bool = False      # alternating horizontal flips (augment.py)
    augment_translate: int = 0      # random translation by up to this many pixels, reflect-padded
    freeze_after: dict = field(default_factory=dict)  # parameter (or layer) name -> epochs trained
    tta: str = "none"               # test-time augmentation of the final test accuracy (tta.py)
    lookahead: bool = False         # airbench94's Lookahead on parameters and running statistics

    # Settings that may differ on resume without changing the result (tta: only the final test).
    FREE_ON_RESUME = ("log_every", "data", "tta")

    def check(self) -> None:
        if self.model not in MODELS:
            raise PartrainError(f"unknown model {self.model!r}; choose from {', '.join(MODELS)}")
        if self.batch_size < 1 or self.epochs < 1:
            raise PartrainError("--batch-size and --epochs must be at least 1")
        if self.workers < 1:
            raise PartrainError("--workers must be at least 1")
        if self.workers > self.batch_size:
            raise PartrainError(f"--workers {self.workers} exceeds --batch-size {self.batch_size}")
        if self.reduction not in ("sharded", "parent"):
            raise PartrainError("--reduction must be 'sharded' or 'parent'")
        if self.val_size < 0:
            raise PartrainError("--val-size must be >= 0")
        if int(self.augment_translate) != self.augment_translate or self.augment_translate < 0:
            raise PartrainError(f"--translate must be a whole number of pixels >= 0, got "
                                f"{self.augment_translate}")
        from .tta import MODES
        if self.tta not in MODES:
            raise PartrainError(f"--tta must be one of {', '.join(MODES)}, got {self.tta!r}")
        for k, v in self.freeze_after.items():
            if not isinstance(v, (int, float)) or v < 0:
                raise PartrainError(f"--freeze-after {k}={v!r}: want a number of epochs >= 0")

    def augment_spec(self):
        """The AugmentSpec the runners apply, or None when augmentation is off."""
        from .augment import AugmentSpec
        spec = AugmentSpec(self.seed, bool(self.augment_flip), int(self.augment_translate))
        return spec if spec.active else None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


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


def optimizer_spec(cfg: TrainConfig, model, steps_per_epoch: int = 1) -> tuple[str, dict]:
    """(name, hyper) for `runner.make_optimizer`; freeze_after's epochs become step counts."""
    wd = model.weight_decay if cfg.weight_decay is None else cfg.weight_decay
    hyper = {"lr": cfg.lr, "weight_decay": wd}
    if cfg.freeze_after:
        names = [s.name for s in model.layout.specs]
        for key in cfg.freeze_after:
            if not any(n == key or n.startswith(key + ".") for n in names):
                raise PartrainError(f"--freeze-after {key}: model {cfg.model} has no such "
                                    f"parameter or layer (see partrain fit --dry-run)")
        hyper["freeze"] = {k: int(round(v * steps_per_epoch)) for k, v in cfg.freeze_after.items()}
    if cfg.optimizer == "sgd":
        hyper.update(momentum=cfg.momentum, nesterov=cfg.nesterov)
    elif cfg.optimizer != "adam":
        raise PartrainError(f"unknown optimizer {cfg.optimizer!r}; choose adam or sgd")
    return cfg.optimizer, hyper


def accuracy(model, images, labels, scale, shift, idx=None, batch: int = 1000) -> tuple[float, np.ndarray]:
    """Top-1 accuracy of `model` (eval mode) on images[idx]; also returns the predictions."""
    idx = np.arange(len(labels)) if idx is None else idx
    preds = np.empty(len(idx), np.int64)
    buf = None
    for lo in range(0, len(idx), batch):
        x, _ = make_batch(images, labels, idx[lo:lo + batch], scale, shift, out=buf, dtype=model.dtype)
        buf = x if buf is None else buf
        preds[lo:lo + len(x)] = model.logits(x).argmax(axis=1)
    return float((preds == labels[idx]).mean()) if len(idx) else float("nan"), preds


def tta_accuracy(model, images, labels, scale, shift, mode: str, batch: int = 500,
                 idx=None) -> tuple[float, float]:
    """(plain accuracy, accuracy with test-time augmentation `mode`) of `model` on images[idx].

    The TTA logits are `tta.tta_logits`'s weighted mean over `tta.tta_views`; the first view is the
    image itself, whose logits also give the plain accuracy, so both cost one pass per view.
    """
    from .tta import tta_views
    idx = np.arange(len(labels)) if idx is None else idx
    if not len(idx):
        return float("nan"), float("nan")
    plain = np.empty(len(idx), np.int64)
    tta = np.empty(len(idx), np.int64)
    buf = None
    for lo in range(0, len(idx), batch):
        x, _ = make_batch(images, labels, idx[lo:lo + batch], scale, shift, out=buf,
                          dtype=model.dtype)
        buf = x if buf is None else buf
        acc = None
        for weight, view in tta_views(x, mode):
            z = np.asarray(model.logits(view), np.float64)
            if view is x:
                plain[lo:lo + len(x)] = z.argmax(axis=1)
            acc = z * weight if acc is None else acc + z * weight
        tta[lo:lo + len(x)] = acc.argmax(axis=1)
    y = labels[idx]
    return float((plain == y).mean()), float((tta == y).mean())


# --------------------------------------------------------------------------- run folder
def new_run_dir(root: Path, name: str | None, model: str) -> Path:
    if name is None:
        name = f"{model}-{_dt.datetime.now().strftime('%Y%m%d-%H%M%S')}"
    run = Path(root) / name
    if run.exists() and any(run.iterdir()):
        raise PartrainError(f"run folder {run} already exists; pick another --name or use --resume {run}")
    run.mkdir(parents=True, exist_ok=True)
    return run


def write_json_atomic(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)


def read_run_config(run: Path) -> dict:
    path = Path(run) / CONFIG_FILE
    if not Path(run).is_dir():
        raise PartrainError(f"run folder {run} does not exist")
    try:
        meta = json.loads(path.read_text())
        if not isinstance(meta["config"], dict):
            raise TypeError("config is not an object")
    except FileNotFoundError:
        raise PartrainError(f"{run} is not a partrain run folder (no {CONFIG_FILE})") from None
    except (ValueError, KeyError, TypeError):
        raise PartrainError(f"{path} is corrupt or not written by partrain") from None
    major = str(meta.get("partrain_version", "0")).split(".")[0]
    if major != __version__.split(".")[0]:
        raise PartrainError(f"{run} was written by partrain {meta.get('partrain_version')}, "
                            f"which this version ({__version__}) cannot read")
    return meta


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


def fit(cfg: TrainConfig, run: Path, resume: bool = False, quiet: bool = False,
        evaluate_test: bool = True, max_steps: int | None = None) -> dict:
    """Train (or continue) the run in folder `run`; returns the final summary.

    max_steps stops after that many optimizer steps in this call (for tests and benchmarks), with
    a checkpoint as if interrupted.
    """
    from threadpoolctl import threadpool_limits

    from .checkpoint import load_checkpoint, save_checkpoint
    from .datasets.store import load_store
    from .plots import append_history

    cfg.check()
    run = Path(run)
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
        meta_run = read_run_config(run)
        if meta_run.get("data_sha256") != sha:
            raise PartrainError(f"data file {cfg.data} differs from the one this run was trained on")
        if not (run / CHECKPOINT_FILE).exists():
            raise PartrainError(f"{run} has no checkpoint to resume from")
    else:
        write_json_atomic(run / CONFIG_FILE, {
            "config": cfg.to_dict(), "partrain_version": __version__, "data_sha256": sha,
            "data_source": data.source_name, "class_names": list(data.class_names),
            "created": _dt.datetime.now().isoformat(timespec="seconds"),
            "parameters": model.layout.size})

    progress = Progress(quiet)
    # Ctrl-C is caught from before the workers start: see `interrupt`.
    with catch_signals() as stop, make_runner(cfg, data, model_spec, opt_spec, train_idx,
                                              stop) as runner:
        lookahead = (AirbenchLookahead(runner.params, runner.state, cfg.epochs * steps_per_epoch)
                     if cfg.lookahead else None)
        # The engine copied the images into shared memory: read validation batches from there and
        # let the parent's own copy go (150 MB for CIFAR-10).
        data.train_images = runner.images
        if resume:
            arrays, meta = load_checkpoint(run / CHECKPOINT_FILE)
            _restore(runner, arrays, meta, run)
            if lookahead is not None:
                lookahead.restore(arrays, run)
            epoch, pos, t = meta["epoch"], meta["position"], meta["t"]
            if epoch >= cfg.epochs:
                raise PartrainError(f"{run} has already finished its {epoch} epochs"
                                    + (" (--epochs N trains it further)"
                                       if cfg.schedule == "constant" else ""))
            _truncate_history(run / HISTORY_FILE, t)
            best_val, elapsed_before = meta.get("best_val", -1.0), meta.get("elapsed_s", 0.0)
            carried = meta.get("epoch_sums") if pos else None
            if cfg.to_dict() != meta_run["config"]:  # e.g. more epochs: config.json says so
                write_json_atomic(run / CONFIG_FILE, {**meta_run, "config": cfg.to_dict()})
            progress.line(f"resuming {run} at epoch {epoch + 1}, step {pos}/{steps_per_epoch}")
        eval_model = build_model(cfg.model, **cfg.model_options)
        eval_model.bind(runner.params, None, runner.state)

        def checkpoint(ep, p, path=CHECKPOINT_FILE):
            # No RNG state is saved because there is none to save: every random choice (the
            # train/val split, each epoch's order, initialisation) is drawn from a generator
            # seeded by (seed, epoch) when needed, so (epoch, position, t) fixes all of them.
            # epoch_sums are the running totals of a half-done epoch, so that its history row
            # after a resume is the one the uninterrupted run writes.
            arrays = {"params": runner.params, "state": runner.state}
            arrays.update({f"opt.{k}": v for k, v in runner.opt_state.items()})
            if lookahead is not None:
                arrays.update(lookahead.arrays())
            save_checkpoint(run / path, arrays, {
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
                while pos < steps_per_epoch and not stop.requested:  # also: Ctrl-C at start-up
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
                        append_history(run / HISTORY_FILE, {
                            "kind": "step", "epoch": epoch + 1, "step": t,
                            "loss": win_loss / win_n, "lr": lr, "images_per_s": round(ips, 1)})
                        progress.update(pos, win_loss / win_n, ep_correct / ep_seen, ips)
                        win_t0, win_imgs, win_loss, win_n = now, 0, 0.0, 0
                    if not np.isfinite(loss_sum):
                        raise PartrainError(f"loss became {loss_sum} at step {t}; "
                                            f"try a smaller --lr")
                    if max_steps is not None and steps_this_call >= max_steps:
                        stopped = "max_steps"
                        break
            progress.end_epoch()
            if stop.requested:
                stopped = "interrupted"
            if stopped is not None:
                checkpoint(epoch, pos)
                break
            val_acc = accuracy(eval_model, data.train_images, data.train_labels, scale, shift,
                               val_idx)[0] if len(val_idx) else float("nan")
            ep_time = ep_time_before + time.perf_counter() - ep_t0
            train_acc = ep_correct / max(ep_seen, 1)
            append_history(run / HISTORY_FILE, {
                "kind": "epoch", "epoch": epoch + 1, "step": t, "loss": ep_loss / max(ep_seen, 1),
                "train_acc": train_acc, "val_acc": val_acc, "time_s": round(ep_time, 2),
                "images_per_s": round(ep_seen / ep_time, 1)})
            progress.line(f"epoch {epoch + 1}/{cfg.epochs}: loss {ep_loss / max(ep_seen, 1):.4f}"
                          f"  train acc {train_acc:.1%}  val acc {val_acc:.1%}  "
                          f"{ep_time:.1f} s  {ep_seen / ep_time:.0f} img/s")
            epoch, pos = epoch + 1, 0
            if val_acc > best_val:
                best_val = val_acc
                checkpoint(epoch, pos, BEST_FILE)
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
        write_json_atomic(run / "summary.json", summary)
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


def _truncate_history(path: Path, t: int) -> None:
    """Drop history rows logged after the checkpoint we resume from (a crash can leave some)."""
    import csv
    if not path.exists():
        return
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
        fields = rows and list(rows[0].keys())
    keep = [r for r in rows if r.get("step") and int(float(r["step"])) <= t]
    if len(keep) == len(rows):
        return
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(keep)
    os.replace(tmp, path)


def file_sha256(path) -> str:
    import hashlib
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _restore(runner, arrays: dict, meta: dict, run: Path) -> None:
    """Copy a checkpoint's arrays into the runner's (shared) vectors, checking every shape."""
    targets = {"params": runner.params, "state": runner.state}
    targets.update({f"opt.{k}": v for k, v in runner.opt_state.items()})
    for name, dst in targets.items():
        src = arrays.get(name)
        if src is None or src.shape != dst.shape or src.dtype != dst.dtype:
            raise PartrainError(f"checkpoint in {run} does not match this model ({name})")
        dst[...] = src


def load_params_for_eval(run: Path, which: str = BEST_FILE):
    """(model, config, meta) with the parameters of a run's best (or last) checkpoint bound."""
    from .checkpoint import load_checkpoint
    meta_run = read_run_config(run)
    try:
        cfg = TrainConfig.from_dict(meta_run["config"])
        model = build_model(cfg.model, **cfg.model_options)
    except (TypeError, ValueError, KeyError) as e:
        raise PartrainError(f"{Path(run) / CONFIG_FILE} describes no model this partrain can "
                            f"build ({e})") from None
    path = Path(run) / which
    if not path.exists():
        path = Path(run) / CHECKPOINT_FILE
    if not path.exists():
        raise PartrainError(f"{run} has no checkpoint yet")
    arrays, meta = load_checkpoint(path)
    params = np.zeros(model.layout.size, model.dtype)
    state = np.zeros(model.state_layout.size, model.dtype)
    for name, dst in (("params", params), ("state", state)):
        src = arrays.get(name)
        if src is None or src.shape != dst.shape:
            raise PartrainError(f"checkpoint {path} does not match model {cfg.model}")
        dst[...] = src
    model.bind(params, None, state)
    meta_run["checkpoint"] = {"path": str(path), "epoch": meta.get("epoch"),
                              "position": meta.get("position"), "best_val": meta.get("best_val")}
    return model, cfg, meta_run

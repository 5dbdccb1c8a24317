"""The run folder: the one place that knows its file names and reads or writes them.

A run folder holds config.json (the settings, the data file's sha256, the class names), history.csv
(one row per logged window and per epoch), checkpoint.h5 (the latest state, for an exact resume),
best.h5 (the epoch with the best validation accuracy) and summary.json (the final numbers). The
training loop, `evaluate`, `predict` and `plot` all go through `RunDir`, so the folder's layout and
every check on it live here. Each file is replaced atomically or appended to one row at a time, so
a run killed at any moment leaves a folder that still evaluates, plots and resumes.
"""
from __future__ import annotations

import csv
import datetime as _dt
import hashlib
import json
import math
import os
import secrets
import sys
from pathlib import Path
from typing import Any

import numpy as np

from . import __version__
from .checkpoint import is_stale_temp, load_checkpoint, save_checkpoint
from .config import TrainConfig, resumed, short_repr
from .errors import PartrainError
from .hooks import METRICS, RunEvents
from .run_lock import LOCK, read_lock

CONFIG, HISTORY, SUMMARY = "config.json", "history.csv", "summary.json"
CHECKPOINTS = {"last": "checkpoint.h5", "best": "best.h5"}

# Column order of history.csv. kind is "step" (epoch, step, loss, lr, images_per_s) or "epoch"
# (epoch, step, train_acc, val_acc, time_s, loss = mean training loss of the epoch, val_loss =
# mean cross-entropy of the validation images); columns that do not apply to a row are empty.
# With --clip-norm both kinds also have grad_norm (the mean over the row's steps of the gradient
# norm before clipping) and clipped_frac (the share of those steps that were clipped).
# Accuracies are fractions in [0, 1]; step is 1-based global (optimizer steps). The last columns
# came later: an older file's header is a prefix of these and is widened when a row is added.
HISTORY_FIELDS = ("kind", "epoch", "step", "loss", "lr", "images_per_s", "train_acc", "val_acc",
                  "time_s", "val_loss", "grad_norm", "clipped_frac")
_INT_FIELDS = ("epoch", "step")


def write_json_atomic(path: Path, obj) -> None:
    """Write `obj` as sorted, indented JSON through a temporary file, so readers never see half."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)


def write_atomic(path: Path, data: bytes) -> None:
    """`data` into a temporary file beside `path`, flushed to disk, then renamed over `path`;
    on any failure the temporary file is removed and `path` is as it was. The new file gets the
    permissions of an ordinary new file (0666 less the umask)."""
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}.{secrets.token_hex(4)}")
    try:
        with open(tmp, "xb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def file_sha256(path) -> str:
    """The data file's fingerprint: config.json records it, resume and evaluate compare it."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


class RunDir:
    """One run folder. `RunDir(path)` only names it; `create` and `open` check it."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._meta: dict | None = None
        self.events = RunEvents(self.path)  # metrics.jsonl and the API's hooks (hooks.py)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    @classmethod
    def create(cls, root: str | os.PathLike, name: str | None, model: str) -> "RunDir":
        """A new, empty folder ROOT/NAME (default name: MODEL-DATE-TIME); refuses a used one."""
        if name is None:
            name = f"{model}-{_dt.datetime.now().strftime('%Y%m%d-%H%M%S')}"
        if not name or name in (".", "..") or "/" in name or "\0" in name:
            raise PartrainError(f"--name {name!r} must be a plain folder name (no '/', not "
                                f"'..'): runs go into --runs-dir {root}")
        run = Path(root) / name
        if run.exists() and any(run.iterdir()) and not _reuse_unsaved(run):
            raise PartrainError(f"run folder {run} already exists; pick another --name or use "
                                f"--resume {run}")
        try:
            run.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise PartrainError(f"cannot create run folder {run}: "
                                f"{(e.strerror or str(e)).lower()}") from None
        return cls(run)

    @classmethod
    def open(cls, path: str | os.PathLike) -> "RunDir":
        """An existing run folder whose config.json this partrain can read."""
        rd = cls(path)
        rd._meta = rd._read_meta()
        return rd

    # -- config.json -----------------------------------------------------------------------
    @property
    def meta(self) -> dict:
        """config.json: {"config": the settings, "partrain_version", "data_sha256", ...}."""
        if self._meta is None:
            self._meta = self._read_meta()
        return self._meta

    def write_meta(self, meta: dict) -> None:
        write_json_atomic(self.path / CONFIG, meta)
        self._meta = meta

    def resume_config(self, given: dict) -> TrainConfig:
        """The settings to continue this run with: config.json's, with `given` (settings from
        the command line) on top where they keep the result exact (`config.resumed`)."""
        cfg = resumed(self.config(), given)
        self._check_fits(cfg.build_model(), "last")
        return cfg

    def config(self) -> TrainConfig:
        """config.json's settings, checked as the command line's are (`TrainConfig.from_saved`)."""
        return TrainConfig.from_saved(self.meta["config"], self.path / CONFIG)

    def _read_meta(self) -> dict:
        path = self.path / CONFIG
        if not self.path.is_dir():
            raise PartrainError(f"run folder {self.path} does not exist")
        try:
            meta = json.loads(path.read_text())
            if not isinstance(meta["config"], dict):
                raise TypeError("config is not an object")
            names = meta.get("class_names", [])
            if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
                raise TypeError("class_names is not a list of names")
        except FileNotFoundError:
            raise PartrainError(f"{self.path} is not a partrain run folder (no {CONFIG})") from None
        except OSError as e:
            raise PartrainError(f"cannot read {path}: {(e.strerror or str(e)).lower()}") from None
        except (ValueError, KeyError, TypeError, RecursionError):  # UnicodeDecodeError too
            raise PartrainError(f"{path} is corrupt or not written by partrain") from None
        major = str(meta.get("partrain_version", "0")).split(".")[0]
        if major != __version__.split(".")[0]:
            raise PartrainError(f"{self.path} was written by partrain {meta.get('partrain_version')}"
                                f", which this version ({__version__}) cannot read")
        return meta

    # -- history.csv -----------------------------------------------------------------------
    def append_history(self, row: dict[str, Any]) -> None:
        """Append one row (a dict of some HISTORY_FIELDS, `kind` required); the header first."""
        path = self.path / HISTORY
        unknown = set(row) - set(HISTORY_FIELDS)
        if unknown:
            raise ValueError(f"unknown history columns {sorted(unknown)}; known: {HISTORY_FIELDS}")
        if row.get("kind") not in ("step", "epoch"):
            raise ValueError(f"history row kind must be 'step' or 'epoch', "
                             f"got {row.get('kind')!r}")
        new = not path.exists() or path.stat().st_size == 0
        if not new:
            with open(path, newline="") as f:
                header = next(csv.reader(f), [])
            if tuple(header) != HISTORY_FIELDS[:len(header)] or len(header) < 9:
                raise PartrainError(f"{path} has columns {header}, not partrain's history columns")
            if len(header) < len(HISTORY_FIELDS):  # a run of an older partrain, resumed
                self._widen_history(path)
        with open(path, "a", newline="") as f:
            writer = csv.writer(f)
            if new:
                writer.writerow(HISTORY_FIELDS)
            writer.writerow([_format(row.get(k)) for k in HISTORY_FIELDS])
        self.events.row(row)

    def _widen_history(self, path: Path) -> None:
        """Rewrite an older history.csv (fewer columns) with today's header, atomically."""
        with open(path, newline="") as f:
            rows = list(csv.reader(f))[1:]
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(HISTORY_FIELDS)
            writer.writerows(r + [""] * (len(HISTORY_FIELDS) - len(r)) for r in rows)
        os.replace(tmp, path)

    def truncate_history(self, t: int) -> None:
        """Drop rows logged after step t, the checkpoint we resume from (a crash can leave some),
        from history.csv and metrics.jsonl."""
        self.events.truncate(t)
        path = self.path / HISTORY
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

    def read_history(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """(step_rows, epoch_rows) as dicts holding only the filled columns, as int or float."""
        path = self.path / HISTORY
        if not path.is_file():
            raise PartrainError(f"{self.path} has no {HISTORY} yet (no step logged)")
        steps: list[dict[str, Any]] = []
        epochs: list[dict[str, Any]] = []
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            if reader.fieldnames is None or "kind" not in reader.fieldnames:
                raise PartrainError(f"{path} is not a history file (no 'kind' column)")
            for line, raw in enumerate(reader, start=2):
                kind = raw.pop("kind")
                if kind not in ("step", "epoch"):
                    raise PartrainError(f"{path} line {line}: kind must be step or epoch, "
                                        f"not {kind!r}")
                try:
                    row = {k: (int(float(v)) if k in _INT_FIELDS else float(v))
                           for k, v in raw.items() if k is not None and v not in ("", None)}
                except ValueError as e:
                    raise PartrainError(f"{path} line {line}: {e}") from None
                (steps if kind == "step" else epochs).append(row)
        return steps, epochs

    # -- checkpoint.h5 and best.h5 ---------------------------------------------------------
    def checkpoint_path(self, which: str = "last") -> Path:
        if which not in CHECKPOINTS:
            raise PartrainError(f"checkpoint must be one of {', '.join(CHECKPOINTS)}")
        return self.path / CHECKPOINTS[which]

    def has_checkpoint(self, which: str = "last") -> bool:
        return self.checkpoint_path(which).exists()

    def save(self, which: str, arrays: dict[str, np.ndarray], meta: dict) -> None:
        """Write checkpoint `which` ("last" or "best") atomically (checkpoint.save_checkpoint)."""
        save_checkpoint(self.checkpoint_path(which), arrays, meta)
        self.events.checkpoint(self.checkpoint_path(which), which, meta)

    def restore(self, targets: dict[str, np.ndarray], which: str = "last") -> dict:
        """Copy the checkpoint's arrays into the preallocated `targets` (same names, shapes and
        dtypes, or PartrainError before anything is copied); returns the checkpoint's meta."""
        path = self.checkpoint_path(which)
        arrays, meta = load_checkpoint(path)
        for name, dst in targets.items():
            src = arrays.get(name)
            if src is None or src.shape != dst.shape or src.dtype != dst.dtype:
                raise PartrainError(f"checkpoint {path} does not match this run ({name})")
            if src.dtype.kind in "fc" and not np.isfinite(src).all():
                # a diverged run stops before it saves; NaNs here would only resurface as
                # "loss became nan" after the run folder had been changed for the resume
                raise PartrainError(f"checkpoint {path} is damaged: {name} holds NaN or "
                                    f"infinite values")
        check_progress(meta, path)
        for name, dst in targets.items():
            dst[...] = arrays[name]
        return meta

    def load_for_eval(self, which: str = "best"):
        """(model, config dict, meta) with the parameters of checkpoint `which` bound; "best"
        falls back to the last checkpoint when no epoch has finished. meta is config.json's,
        plus "checkpoint": the file, its epoch, position and best validation accuracy."""
        meta_run = dict(self.meta)
        cfg = self.config()
        config, model = cfg.to_dict(), cfg.build_model()
        if not self.has_checkpoint(which):
            which = "last"
        if not self.has_checkpoint(which):
            raise PartrainError(f"{self.path} has no checkpoint yet")
        self._check_fits(model, which)
        params = np.zeros(model.layout.size, model.dtype)
        state = np.zeros(model.state_layout.size, model.dtype)
        meta = self.restore({"params": params, "state": state}, which)
        model.bind(params, None, state)
        meta_run["checkpoint"] = {"path": str(self.checkpoint_path(which)),
                                  "epoch": meta.get("epoch"), "position": meta.get("position"),
                                  "best_val": meta.get("best_val")}
        return model, config, meta_run

    def _check_fits(self, model, which: str) -> None:
        """Refuse a config.json whose model is larger than checkpoint `which` (which stores its
        arrays uncompressed) before anything is allocated for it: num_filters=10^9 in an
        edited config.json asked for terabytes."""
        path = self.checkpoint_path(which)
        need = (model.layout.size + model.state_layout.size) * np.dtype(model.dtype).itemsize
        if path.is_file() and need > path.stat().st_size:
            raise PartrainError(f"{self.path / CONFIG} describes a model of "
                                f"{model.layout.size:,} parameters, more than {path} holds: "
                                f"the two are not from one run")

    # -- summary.json ----------------------------------------------------------------------
    def write_summary(self, summary: dict) -> None:
        write_json_atomic(self.path / SUMMARY, summary)


def check_progress(meta: dict, path) -> None:
    """PartrainError unless a checkpoint's meta says where its run is as `train.RunState` writes
    it: whole numbers epoch, position, t with t = epoch * steps per epoch + position (so a
    position past its epoch's end, which would skip the epoch silently, is refused); best_val
    and elapsed_s numbers; the half-epoch's sums numbers; best_epoch a whole number <= epoch,
    best_val_loss a number >= 0 (or null), early_stop a line of text (or null)."""
    def damaged(why: str) -> PartrainError:
        return PartrainError(f"checkpoint {path} is damaged: {why}")

    e, p, t = (meta.get(k) for k in ("epoch", "position", "t"))
    for key, v in (("epoch", e), ("position", p), ("t", t)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise damaged(f"{key} must be a whole number >= 0, got {short_repr(v)}")
    if (t != p if e == 0 else t - p < e * p or (t - p) % e):  # position == spe: stopped at
        # the epoch's last step, before its end (--max-steps, a signal during that step)
        raise damaged(f"epoch {e}, position {p} and t {t} do not fit together "
                      f"(t = epoch x steps per epoch + position, position <= steps per epoch)")
    for key, low, high in (("best_val", -1.0, 1.0), ("elapsed_s", 0.0, float("inf"))):
        v = meta.get(key, low)
        if not _finite_number(v) or not low <= v <= high:
            raise damaged(f"{key} must be a number in [{low:g}, {high:g}], "
                          f"got {short_repr(v)}")
    for key, kind in (("epoch_meter", dict), ("window_meter", dict), ("epoch_sums", list)):
        s = meta.get(key)
        if s is not None and not (isinstance(s, kind) and all(
                _finite_number(v) and v >= 0 for v in (s.values() if kind is dict else s))):
            raise damaged(f"the half-done epoch's sums must be numbers >= 0, "
                          f"got {key} {short_repr(s)}")
    if meta.get("epoch_sums") is not None and len(meta["epoch_sums"]) != 6:
        raise damaged(f"epoch_sums must hold 6 numbers, "
                      f"got {short_repr(meta['epoch_sums'])}")
    b = meta.get("best_epoch", 0)
    if isinstance(b, bool) or not isinstance(b, int) or not 0 <= b <= e:
        raise damaged(f"best_epoch must be a whole number in [0, {e}], got {short_repr(b)}")
    loss = meta.get("best_val_loss")
    if loss is not None and not (_finite_number(loss) and loss >= 0):
        raise damaged(f"best_val_loss must be a number >= 0, got {short_repr(loss)}")
    if not isinstance(meta.get("early_stop") or "", str):
        raise damaged(f"early_stop must be text, got {short_repr(meta.get('early_stop'))}")


def _finite_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


UNSAVED = {CONFIG, HISTORY, METRICS, "logs", LOCK}  # what a run killed before its first
                                                  # checkpoint leaves


def _reuse_unsaved(run: Path) -> bool:
    """Empty a folder that a run left before its first checkpoint (config.json, history rows and
    worker logs only, and the temporary of a save it was killed in: nothing to resume, nothing
    else lost), so that its name works again; with one line on stderr. False (and nothing
    touched) for any other folder."""
    try:
        entries = {p.name for p in run.iterdir()}
    except OSError:
        return False
    temps = {name for name in entries
             if name == CONFIG + ".tmp" or is_stale_temp(run / name)}
    if not entries - temps <= UNSAVED or not run.is_dir():
        return False
    if read_lock(run).state == "running":  # a live fit in its first epoch: not to be emptied
        return False
    for name in (CONFIG, HISTORY, METRICS, LOCK, *temps):
        (run / name).unlink(missing_ok=True)
    print(f"note: reusing run folder {run}: the run there stopped before its first checkpoint",
          file=sys.stderr)
    return True


def _format(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, (int, np.integer)) or isinstance(v, str):
        return str(v)
    return f"{float(v):.7g}"


class MutedRunDir(RunDir):
    """The run folder as the other ranks of an MPI job see it: rank 0 alone writes it (its disk
    may be the only one that has it), so every write here is a no-op."""

    def write_meta(self, meta: dict) -> None:
        self._meta = meta

    def append_history(self, row: dict[str, Any]) -> None:
        pass

    def truncate_history(self, t: int) -> None:
        pass

    def save(self, which: str, arrays: dict[str, np.ndarray], meta: dict) -> None:
        pass

    def write_summary(self, summary: dict) -> None:
        pass

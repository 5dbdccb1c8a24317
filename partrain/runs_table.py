"""`partrain runs`: every run folder of a runs folder in one table, each with where it stands.

A run's status comes from its files, read and never changed (rundir.py names them):
- running: a live `fit` holds its run.lock (run_lock.py);
- finished: its last checkpoint is past the planned epochs (summary.json adds the test accuracy;
  without one, the final test pass did not end: `partrain evaluate` measures it);
- interrupted at epoch e step s: its last checkpoint is earlier; that is where
  `partrain fit --resume` continues (after Ctrl-C, SIGTERM, --max-steps, or a kill: run.lock left
  unlocked and without an outcome says which);
- failed: its last fit raised after it changed the folder (run.lock records the error), or it
  stopped before its first checkpoint (config.json and history rows only: nothing to resume);
- unreadable: config.json, summary.json or checkpoint.h5 is damaged or foreign (the reason is
  given).
summary.json counts only if it is the current one (its steps equal the checkpoint's): one left by
an earlier `--max-steps` call of a run resumed since is not. Files an older partrain did not write
are left out of the row, not an error.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import shlex
from pathlib import Path

from .checkpoint import load_checkpoint
from .errors import PartrainError
from .progress import format_duration
from .rundir import CHECKPOINTS, CONFIG, HISTORY, SUMMARY, RunDir, check_progress
from .run_lock import LOCK, read_lock

EVALUATION = "evaluation.json"
RUN_FILES = (CONFIG, HISTORY, SUMMARY, LOCK, *CHECKPOINTS.values())  # any one: a run folder
KEYS = ("name", "path", "status", "state", "reason", "resume", "model", "recipe", "epochs_done",
        "epochs", "epoch", "step", "steps_per_epoch", "best_val_acc", "test_acc", "test_acc_tta",
        "tta", "train_time_s", "images_per_s", "workers", "ranks", "created", "pid", "host")
SORTS = ("time", "name", "best", "test")


# -- the rows ------------------------------------------------------------------------------------

def list_runs(root: str | os.PathLike, sort: str = "time") -> list[dict]:
    """One row (`describe_run`) per run folder in `root`, or of `root` itself if it is one;
    PartrainError if root is not a folder."""
    root = Path(root)
    if not root.is_dir():
        raise PartrainError(f"{root} is not a folder of runs" + (
            "" if root.exists() else " (it does not exist; partrain fit makes runs/NAME)"))
    if is_run_folder(root):
        folders = [root]
    else:
        folders = [p for p in root.iterdir()
                   if not p.name.startswith(".") and p.is_dir() and is_run_folder(p)]
    return sort_rows([describe_run(p) for p in folders], sort)


def is_run_folder(path: Path) -> bool:
    """A folder holding any file a run writes (not, say, the compare/ folder of `partrain plot`)."""
    return any((path / name).exists() for name in RUN_FILES)


def sort_rows(rows: list[dict], sort: str) -> list[dict]:
    """time: oldest start first; name; best, test: highest accuracy first (none last)."""
    if sort not in SORTS:
        raise PartrainError(f"--sort must be one of {', '.join(SORTS)}")
    if sort == "name":
        return sorted(rows, key=lambda r: r["name"])
    if sort == "time":  # config.json's start time; else (an older partrain) the folder's
        return sorted(rows, key=lambda r: (r["created"] or _mtime(r["path"]), r["name"]))
    key = "best_val_acc" if sort == "best" else "test"

    def accuracy(r):
        value = r[key] if key != "test" else _best_test(r)
        return (value is None, -(value or 0.0), r["name"])
    return sorted(rows, key=accuracy)


def describe_run(path: str | os.PathLike) -> dict:
    """The row of one run folder: every key of KEYS (None where unknown); a folder that cannot
    be read is status "unreadable" with the reason, never an exception."""
    path = Path(path)
    row = dict.fromkeys(KEYS)
    row.update(name=path.name, path=str(path))
    try:
        _fill(row, path)
    except Exception as e:  # noqa: BLE001 - one damaged folder must not end the listing
        keep = {k: row[k] for k in ("name", "path", "model", "recipe", "epochs", "workers",
                                    "created")}
        row = {**dict.fromkeys(KEYS), **keep, "status": "unreadable", "state": "unreadable",
               "reason": _short(str(e) if isinstance(e, (PartrainError, OSError))
                                else f"{type(e).__name__}: {e}")}
    return row


def _fill(row: dict, path: Path) -> None:
    lock = read_lock(path)
    if lock.state == "running":
        row.update(status="running", pid=lock.info.get("pid"), host=lock.info.get("host"),
                   ranks=lock.info.get("ranks"))
        if not (path / CONFIG).exists():  # fit holds the lock from before it writes config.json
            row.update(state="running: starting", created=lock.info.get("started"))
            return
    meta = RunDir.open(path).meta
    cfg = meta["config"]
    row.update(model=_text(cfg.get("model")), recipe=_text(cfg.get("recipe")),
               epochs=_count(cfg.get("epochs")), workers=_count(cfg.get("workers")),
               created=_text(meta.get("created")) or lock.info.get("started"))
    steps, epochs = _history(RunDir(path))
    ck = _checkpoint(path)
    summary = json_object(path / SUMMARY)
    current = summary if ck is not None and summary.get("steps") == ck["t"] else {}
    row["steps_per_epoch"] = _steps_per_epoch(ck, epochs) or _steps_from_store(cfg)
    _numbers(row, ck, current, steps, epochs, json_object(path / EVALUATION))
    if row["status"] == "running":
        _running(row, lock, ck, steps)
    else:
        _stopped(row, path, lock, ck, current)


def _stopped(row: dict, path: Path, lock, ck: dict | None, summary: dict) -> None:
    """Status, state, reason and resume command of a run no process trains."""
    resume = f"partrain fit --resume {shlex.quote(str(path))}"
    if ck is None:
        why = "stopped before its first checkpoint" + (" (killed)" if lock.killed else "")
        if lock.failed:
            why = lock.info.get("error") or why
        if (path / "logs").is_dir():
            why += f"; see {path / 'logs'}"
        row.update(status="failed", state="failed", reason=why + "; nothing to resume: start it "
                   "again with the same --name")
        return
    e, p = ck["epoch"], ck["position"]
    spe = row["steps_per_epoch"]
    where = f"epoch {e + 1} step {p}" + (f"/{spe}" if spe else "")
    row.update(epoch=e + 1, step=p)
    if lock.failed:
        row.update(status="failed", state="failed", resume=resume,
                   reason=f"{lock.info.get('error') or 'an error'}; it resumes at {where}")
    elif ck.get("early_stop"):  # --early-stop ended it: finished, nothing to resume
        row.update(status="finished", state="finished", epoch=None, step=None,
                   reason=ck["early_stop"])
    elif row["epochs"] is not None and e >= row["epochs"] and p == 0:
        row.update(status="finished", state="finished", epoch=None, step=None)
        if row["test_acc"] is None:
            row["reason"] = (f"no test accuracy (the final test pass did not end): partrain "
                             f"evaluate {shlex.quote(str(path))}")
    else:
        row.update(status="interrupted", state=f"interrupted at {where}", resume=resume)
        if lock.killed:
            row["reason"] = "killed: no clean stop; it resumes at its last checkpoint"
        elif summary.get("stopped") == "max_steps":
            row["reason"] = "stopped by --max-steps"


def _running(row: dict, lock, ck: dict | None, steps: list[dict]) -> None:
    """The state of a run being trained: the last step it logged."""
    spe, last = row["steps_per_epoch"], (steps[-1] if steps else None)
    if last is not None and "epoch" in last and "step" in last:
        pos = last["step"] - (last["epoch"] - 1) * spe if spe else None
        row.update(epoch=last["epoch"], step=pos)
        where = f"epoch {last['epoch']}" + (f"/{row['epochs']}" if row["epochs"] else "")
        where += f" step {pos}/{spe}" if pos is not None else f" (step {last['step']} in all)"
    elif ck is not None:
        row.update(epoch=ck["epoch"] + 1, step=ck["position"])
        where = f"epoch {ck['epoch'] + 1} step {ck['position']}"
    else:
        where = "first steps"
    row["state"] = f"running: {where}"
    started = str(lock.info.get("started") or "").replace("T", " ")
    who = " ".join(x for x in (f"pid {lock.info['pid']}" if "pid" in lock.info else "",
                               f"on {lock.info['host']}" if lock.info.get("host") else "",
                               f"since {started}" if started else "") if x)
    row["reason"] = who or None


def _numbers(row: dict, ck, summary: dict, steps, epochs, evaluation: dict) -> None:
    """Epochs done, accuracies, training time and images/s: summary.json's where it is the
    current one, else what the checkpoint and history.csv hold."""
    # Not NaN: a run without a validation split (--val-size 0) logs NaN and shows "-".
    vals = [v for v in (_fraction(r.get("val_acc")) for r in epochs) if v is not None]
    best = summary.get("best_val_acc", ck["best_val"] if ck else None)
    row["best_val_acc"] = _fraction(best) if _fraction(best) is not None and best >= 0 else (
        max(vals) if vals else None)
    row["epochs_done"] = ck["epoch"] if ck else max((r.get("epoch", 0) for r in epochs), default=0)
    row["train_time_s"] = _number(summary.get("total_train_time_s", ck and ck.get("elapsed_s")))
    rates = [r["images_per_s"] for r in (epochs or steps) if "images_per_s" in r]
    row["images_per_s"] = _number(summary.get("images_per_s", rates[-1] if rates else None))
    row["ranks"] = row["ranks"] or _count(summary.get("ranks"))
    if summary.get("test_acc") is not None:
        row.update(test_acc=_fraction(summary.get("test_acc")),
                   test_acc_tta=_fraction(summary.get("test_acc_tta")),
                   tta=_text(summary.get("tta")))
    elif evaluation.get("test_accuracy") is not None:  # `partrain evaluate` measured it
        row.update(test_acc=_fraction(evaluation.get("test_accuracy")),
                   test_acc_tta=_fraction(evaluation.get("test_accuracy_tta")),
                   tta=_text(evaluation.get("tta")))


# -- the files -----------------------------------------------------------------------------------

def _mtime(path: str) -> str:
    try:
        return _dt.datetime.fromtimestamp(os.stat(path).st_mtime).isoformat(timespec="seconds")
    except OSError:
        return ""


def _checkpoint(path: Path) -> dict | None:
    """The last checkpoint's position (epoch, position, t, best_val, elapsed_s), checked as a
    resume checks it; None if there is none."""
    file = path / CHECKPOINTS["last"]
    if not file.exists():
        return None
    meta = load_checkpoint(file)[1]
    check_progress(meta, file)
    return {"epoch": meta["epoch"], "position": meta["position"], "t": meta["t"],
            "best_val": meta.get("best_val", -1.0), "elapsed_s": meta.get("elapsed_s"),
            "early_stop": meta.get("early_stop")}


def _history(rd: RunDir) -> tuple[list[dict], list[dict]]:
    """history.csv's rows, or none if it is missing or damaged (it only adds numbers here)."""
    try:
        return rd.read_history()
    except (PartrainError, OSError, UnicodeDecodeError):
        return [], []


def json_object(path: Path) -> dict:
    """A JSON object file of a run folder (summary.json, evaluation.json); {} if missing,
    PartrainError if damaged."""
    try:
        obj = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise PartrainError(f"{path} is damaged (not JSON)") from None
    if not isinstance(obj, dict):
        raise PartrainError(f"{path} is damaged (not a JSON object)")
    return obj


def _steps_from_store(cfg: dict) -> int | None:
    """Steps per epoch from the size of the store the run trains on (in its first epoch neither
    the checkpoint nor history.csv says it); None if that store is not there or not readable."""
    from .datasets.store import inspect_store
    try:
        n = len(inspect_store(cfg["data"]).train_labels) - int(cfg["val_size"])
        batch = int(cfg["batch_size"])
    except (PartrainError, OSError, KeyError, TypeError, ValueError):
        return None
    return -(-n // batch) if n > 0 and batch > 0 else None


def _steps_per_epoch(ck: dict | None, epochs: list[dict]) -> int | None:
    """From the checkpoint (t = epoch x steps per epoch + position) or the first epoch row."""
    if ck and ck["epoch"] > 0:
        return (ck["t"] - ck["position"]) // ck["epoch"]
    first = next((r for r in epochs if r.get("epoch") and r.get("step")), None)
    return first["step"] // first["epoch"] if first else None


# -- the table -----------------------------------------------------------------------------------

COLUMNS = ("name", "model/recipe", "status", "epochs", "best val", "test", "time", "img/s",
           "workers", "next / why")
NOTE_WIDTH = 90  # the last column's text is cut here in the table (--json has all of it)


def format_table(rows: list[dict]) -> list[str]:
    """The lines `partrain runs` prints: a header and one line per row, in columns."""
    cells = [COLUMNS] + [_cells(r) for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(COLUMNS) - 1)]
    right = {"epochs", "best val", "time", "img/s", "workers"}
    lines = []
    for c in cells:
        parts = [(c[i].rjust(w) if COLUMNS[i] in right else c[i].ljust(w))
                 for i, w in enumerate(widths)]
        lines.append("  ".join(parts + [c[-1]]).rstrip())
    return lines


def _cells(r: dict) -> tuple[str, ...]:
    model = r["model"] or "-"
    if r["recipe"]:
        model += f"/{r['recipe']}"
    epochs = "-" if r["epochs"] is None else f"{r['epochs_done'] or 0}/{r['epochs']}"
    test = _pct(r["test_acc"])
    if r["test_acc_tta"] is not None:
        test += f" (TTA {_pct(r['test_acc_tta'])})"
    workers = "-" if r["workers"] is None else str(r["workers"])
    if r["ranks"] and r["ranks"] > 1:
        workers = f"{r['ranks']}x{workers}"
    return (r["name"], model, r["state"], epochs, _pct(r["best_val_acc"]), test,
            "-" if r["train_time_s"] is None else format_duration(r["train_time_s"]),
            "-" if r["images_per_s"] is None else f"{r['images_per_s']:,.0f}", workers,
            _note(r))


def _note(r: dict) -> str:
    """The last column: the reason, short (--json has it whole), then the command to continue
    the run, whole (it is what to type)."""
    why = r["reason"] or ""
    if r["status"] == "interrupted" and why.startswith("killed"):
        why = "killed"
    elif r["status"] == "failed" and r["resume"]:
        why = why.split("; it resumes at")[0]
    if not r["resume"]:
        return _short(why, NOTE_WIDTH)
    return "; ".join(x for x in (_short(why, max(NOTE_WIDTH - len(r["resume"]) - 2, 12)),
                                 r["resume"]) if x)


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _best_test(r: dict):
    values = [v for v in (r["test_acc"], r["test_acc_tta"]) if v is not None]
    return max(values) if values else None


# -- values from files written by hand or by older versions --------------------------------------

def _number(v):
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and v == v else None


def _fraction(v):
    v = _number(v)
    return v if v is not None and -1.0 <= v <= 1.0 else None


def _count(v):
    return v if isinstance(v, int) and not isinstance(v, bool) and v >= 0 else None


def _text(v):
    return v if isinstance(v, str) else None


def _short(text: str, width: int = 200) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= width else text[:max(width - 3, 0)] + "..."

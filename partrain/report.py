"""`partrain report`: one static HTML page of a run, or of several compared (report_html.py has
the markup).

A run's page: where it stands and its key numbers (runs_table.describe_run, summary.json), the
loss and accuracy curves (plots.plot_runs, the figures of `partrain plot`), the confusion matrix
and accuracy per class, the first-layer filters (plots_filters.plot_filters) and every setting,
those that differ from the defaults marked. The confusion matrix comes from evaluation.json when
`partrain evaluate` wrote one for the run's current checkpoint; else, with evaluate=True, it is
computed now (evaluate.evaluate_run, into a temporary folder: the run folder gains nothing but
the page); else the page says how to add it. Several runs: the curves overlaid, a table of their
numbers and one of the settings that differ. Figures are drawn into a temporary folder and
inlined; the page is written atomically. `fit` calls `write_report` at the end of a run.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import re
import sys
import shutil
from pathlib import Path

import numpy as np

from . import __version__
from . import report_html as H
from .config import TrainConfig
from .errors import PartrainError
from .checkpoint import pid_alive
from .evaluate import EVALUATION_FILE, per_class_accuracy
from .progress import format_duration
from .rundir import RunDir, write_atomic
from .runs_table import describe_run, json_object

REPORT_FILE, COMPARE_FILE = "report.html", "compare.html"
FIGURE_SCALE = 1.3  # plots.py draws at 130 DPI: shown at matplotlib's 100-DPI size


def write_report(run_dir: str | os.PathLike, out: str | os.PathLike | None = None,
                 evaluate: bool = True, warn=None) -> Path:
    """RUN/report.html (or OUT/report.html) of one run folder; returns its path. evaluate: a
    test pass for the confusion matrix when no current evaluation.json has one (fit passes
    False: it has just done its own). warn: where notes of the test pass go (stderr)."""
    run = Path(run_dir)
    rd = RunDir.open(run)
    row = describe_run(run)
    with _scratch(Path(out) if out is not None else run) as tmp:
        sections = [("summary", "Summary", _summary(row, rd, run)),
                    ("curves", "Training curves", _curves([run], Path(tmp))),
                    ("test", "Test set", _test_set(run, Path(tmp), evaluate, warn)),
                    ("filters", "First-layer filters", _filters(run, Path(tmp))),
                    ("settings", "Settings", _settings(rd.meta))]
    subtitle = (f"{H.status(row['state'], row['status'])} · {H.esc(_model(row))} · "
                f"started {H.esc(_when(row['created']))} · {H.code(str(run))}")
    text = H.page(f"partrain run {run.resolve().name}", subtitle, sections, _footer([run]))
    return _write(Path(out) if out is not None else run, REPORT_FILE, text)


def write_comparison(run_dirs, out: str | os.PathLike | None = None) -> Path:
    """compare.html beside the first run (or OUT/report.html): the runs' curves overlaid, their
    numbers side by side and the settings in which they differ; returns its path."""
    runs = [Path(r) for r in run_dirs]
    if len(runs) < 2:
        raise PartrainError("a comparison needs at least two runs")
    metas = [RunDir.open(r).meta for r in runs]  # every run readable before anything is drawn
    rows = [describe_run(r) for r in runs]
    target = Path(out) / REPORT_FILE if out is not None else runs[0].parent / COMPARE_FILE
    with _scratch(target.parent) as tmp:
        sections = [("runs", "Runs", _runs_table(rows, runs, target.parent)),
                    ("curves", "Training curves", _curves(runs, Path(tmp))),
                    ("settings", "Settings that differ", _differences(runs, metas))]
    text = H.page(f"partrain: {len(runs)} runs compared",
                  " · ".join(H.esc(r.resolve().name) for r in runs), sections, _footer(runs))
    return _write(target.parent, target.name, text)


# -- sections ------------------------------------------------------------------------------------

def _summary(row: dict, rd: RunDir, run: Path) -> str:
    summary = json_object(run / "summary.json")
    items = [("status", H.status(row["state"], row["status"])),
             ("best validation accuracy", _pct(row["best_val_acc"])),
             ("test accuracy", _pct(row["test_acc"]))]
    if row["test_acc_tta"] is not None:
        items.append((f"with TTA ({row['tta']})", _pct(row["test_acc_tta"])))
    ranks = f"{row['ranks']} ranks × " if (row["ranks"] or 1) > 1 else ""
    items += [("epochs", f"{row['epochs_done'] or 0} / {row['epochs'] if row['epochs'] else '?'}"),
              ("training time", "–" if row["train_time_s"] is None
               else format_duration(row["train_time_s"])),
              ("images / s", "–" if row["images_per_s"] is None
               else f"{row['images_per_s']:,.0f}"),
              ("workers", f"{ranks}{row['workers'] if row['workers'] is not None else '?'}")]
    if isinstance(rd.meta.get("parameters"), int):
        items.append(("parameters", f"{rd.meta['parameters']:,}"))
    memory = summary.get("memory") if isinstance(summary.get("memory"), dict) else {}
    if isinstance(memory.get("total_pss_mib"), (int, float)):
        items.append(("memory (PSS)", f"{memory['total_pss_mib'] / 1024:.2f} GiB"))
    restarts = summary.get("worker_restarts")
    if isinstance(restarts, list) and restarts:
        items.append(("worker restarts", str(len(restarts))))
    out = H.cards([(k, H.esc(v) if k != "status" else v) for k, v in items])
    if row["reason"]:
        out += H.note(H.esc(row["reason"]))
    if row["resume"]:
        out += H.note("Continue it with " + H.code(row["resume"]))
    return out


def _curves(runs: list[Path], tmp: Path) -> str:
    from .plots import plot_runs  # matplotlib: imported only when a figure is drawn
    try:
        paths = plot_runs(runs, tmp / "curves")
    except PartrainError as e:
        return H.note(f"No curves: {H.esc(e)}")
    loss, acc = (p.read_bytes() for p in paths)
    return ('<div class="figs">'
            + H.figure(loss, "training loss per iteration", "Training loss per iteration "
                       "(faint: each logged window; bold: moving average).", scale=FIGURE_SCALE)
            + H.figure(acc, "accuracy per epoch", "Accuracy per epoch: training (dashed, on "
                       "the augmented batches as trained) and validation (solid).",
                       scale=FIGURE_SCALE)
            + "</div>")


def _test_set(run: Path, tmp: Path, evaluate: bool, warn) -> str:
    """Confusion matrix and accuracy per class, from evaluation.json or computed now."""
    from .plots import plot_confusion
    result, why = _saved_evaluation(run)
    source = f"from {EVALUATION_FILE} (written by {H.code('partrain evaluate')})"
    if result is None and evaluate:
        from .evaluate import evaluate_run
        try:
            done = evaluate_run(run, out_dir=tmp / "evaluate",
                                warn=warn or (lambda t: print(t, file=sys.stderr)))
            result = {"matrix": np.asarray(done["confusion"], np.int64), "figure": done["figure"],
                      "class_names": done["class_names"], "checkpoint": done["checkpoint"],
                      "epoch": done["epoch"]}
            source = "computed for this report on the test images of " + H.code(done["data"])
        except PartrainError as e:
            why = f"{why}; and it cannot be computed now: {e}" if why else str(e)
    if result is None:
        return H.note(f"No confusion matrix: {H.esc(why)}. {H.code(f'partrain evaluate {run}')} "
                      f"then {H.code(f'partrain report {run}')} adds it.")
    matrix, names = result["matrix"], result["class_names"]
    png = Path(result.get("figure") or plot_confusion(matrix, names, tmp / "confusion.png"))
    png = png.read_bytes()
    per_class = per_class_accuracy(matrix, names)
    rows = [[H.esc(n), _pct(c["accuracy"]), f"{c['correct']:,} / {c['total']:,}",
             H.bar(c["accuracy"])] for n, c in per_class.items()]
    total = int(matrix.sum())
    head = (f"Test accuracy {_pct(np.trace(matrix) / total if total else None)} of "
            f"{total:,} test images with {H.esc(Path(str(result['checkpoint'])).name)}"
            + (f" (after epoch {H.esc(result['epoch'])})" if result.get("epoch") is not None
               else "") + f", {source}.")
    return (f"<p>{head}</p>" + '<div class="figs">'
            + H.figure(png, "confusion matrix", "Rows: true class; columns: predicted.",
                       scale=FIGURE_SCALE)
            + "<div><h3>Accuracy per class</h3>"
            + H.table(["class", "accuracy", "correct / total", ""], rows, numeric={1, 2})
            + "</div></div>")


def _saved_evaluation(run: Path) -> tuple[dict | None, str]:
    """(matrix, class names, checkpoint, epoch) of RUN/evaluation.json if it is readable and
    not older than the checkpoint it evaluated; else (None, why not)."""
    path = run / EVALUATION_FILE
    if not path.exists():
        return None, f"no {EVALUATION_FILE} in the run folder"
    try:
        saved = json_object(path)
        names = saved["class_names"]
        matrix = np.asarray(saved["confusion"], dtype=np.int64)
        if (not isinstance(names, list) or not all(isinstance(n, str) for n in names)
                or matrix.shape != (len(names), len(names)) or (matrix < 0).any()):
            raise ValueError("its matrix and class names do not fit")
        checkpoint = run / Path(str(saved["checkpoint"])).name
    except (PartrainError, KeyError, TypeError, ValueError, OverflowError) as e:
        return None, f"{EVALUATION_FILE} is damaged ({e})"
    if checkpoint.exists() and checkpoint.stat().st_mtime_ns > path.stat().st_mtime_ns:
        return None, f"{EVALUATION_FILE} is older than {checkpoint.name}"
    return {"matrix": matrix, "class_names": names, "checkpoint": checkpoint,
            "epoch": saved.get("epoch")}, ""


def _filters(run: Path, tmp: Path) -> str:
    from .plots_filters import plot_filters
    try:
        png = plot_filters(run, tmp / "filters")[0].read_bytes()
    except PartrainError as e:
        return H.note(f"No filters: {H.esc(e)}")
    return H.figure(png, "first-layer filters", "The convolution that reads the image, each "
                    "filter scaled over its own range.", wide=True, scale=FIGURE_SCALE)


def _settings(meta: dict) -> str:
    """Every setting of config.json, those that differ from the defaults marked, then the data."""
    config, defaults = meta["config"], TrainConfig().to_dict()
    rows, classes = [], []
    for key in sorted(config):
        value, default = config[key], defaults.get(key, "(none)")
        changed = key in defaults and value != default and key != "data"
        rows.append([H.code(key), H.esc(_value(value)),
                     H.esc(_value(default)) if changed else ""])
        classes.append("changed" if changed else "")
    data = [("data file", meta["config"].get("data")), ("data source", meta.get("data_source")),
            ("data sha256", meta.get("data_sha256")), ("classes", ", ".join(
                meta.get("class_names", [])) or None),
            ("written by partrain", meta.get("partrain_version")),
            ("started", meta.get("created") and _when(meta["created"]))]
    info = [[H.esc(k), H.code(v) if k != "classes" else H.esc(v)] for k, v in data if v]
    return (H.table(["setting", "value", "default (where it differs)"], rows,
                    row_classes=classes)
            + "<h3>Data and provenance</h3>" + H.table(None, info))


def _runs_table(rows: list[dict], runs: list[Path], here: Path) -> str:
    cells = []
    for r, run in zip(rows, runs):
        name = H.esc(r["name"])
        page = run / REPORT_FILE
        if page.exists():
            name = f'<a href="{H.esc(os.path.relpath(page, here))}">{name}</a>'
        test = _pct(r["test_acc"]) + (f" (TTA {_pct(r['test_acc_tta'])})"
                                      if r["test_acc_tta"] is not None else "")
        cells.append([name, H.esc(_model(r)), H.status(r["state"], r["status"]),
                      f"{r['epochs_done'] or 0} / {r['epochs'] or '?'}", _pct(r["best_val_acc"]),
                      test, "–" if r["train_time_s"] is None
                      else format_duration(r["train_time_s"]),
                      "–" if r["images_per_s"] is None else f"{r['images_per_s']:,.0f}"])
    return H.table(["run", "model/recipe", "status", "epochs", "best val", "test", "time",
                    "img/s"], cells, numeric={3, 4, 5, 6, 7})


def _differences(runs: list[Path], metas: list[dict]) -> str:
    """The settings (and data files) in which the runs differ; then the ones they share."""
    def keyed(meta):
        return {**meta["config"], "data_sha256": str(meta.get("data_sha256", ""))[:12] + "…"}
    configs = [keyed(m) for m in metas]
    keys = sorted(set().union(*configs))
    differ = [k for k in keys if len({json.dumps(c.get(k), sort_keys=True, default=str)
                                      for c in configs}) > 1]
    same = [k for k in keys if k not in differ]
    names = [r.resolve().name for r in runs]
    out = (H.table(["setting", *names],
                   [[H.code(k), *(H.esc(_value(c.get(k, "(none)"))) for c in configs)]
                    for k in differ])
           if differ else H.note("The runs have the same settings."))
    if same:
        out += ("<h3>Settings they share</h3>"
                + H.table(["setting", "value"],
                          [[H.code(k), H.esc(_value(configs[0].get(k)))] for k in same]))
    return out


# -- helpers -------------------------------------------------------------------------------------

def _footer(runs: list[Path]) -> str:
    when = _dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    return (f"Written by partrain {H.esc(__version__)} on {H.esc(when)} from "
            + ", ".join(H.code(str(r)) for r in runs)
            + ". A static page: no server, no script, nothing fetched; "
            + H.code("partrain report") + " draws it again.")


SCRATCH = ".report-scratch."  # + pid: the figures' files while a page is drawn


@contextlib.contextmanager
def _scratch(folder: Path):
    """A folder for the figures' files while a page is drawn, in the page's own folder (not in
    /tmp, where a report killed by SIGKILL, e.g. fit's at the end of a run, would leave it for
    good); the scratch folders of dead processes are removed first."""
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob(SCRATCH + "*"):
        pid = old.name[len(SCRATCH):]
        if pid.isdigit() and not pid_alive(int(pid)):
            shutil.rmtree(old, ignore_errors=True)
    tmp = folder / f"{SCRATCH}{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _write(folder: Path, name: str, text: str) -> Path:
    """folder/name, written through a temporary beside it (never half a page)."""
    folder.mkdir(parents=True, exist_ok=True)
    write_atomic(folder / name, text.encode("utf-8"))
    return folder / name


def _when(iso) -> str:
    """'2026-12-01 20:29' from config.json's ISO time (anything else as it is)."""
    if not isinstance(iso, str):
        return "unknown"
    return iso.replace("T", " ")[:16] if re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d.*", iso) else iso


def _model(row: dict) -> str:
    return (row["model"] or "?") + (f"/{row['recipe']}" if row["recipe"] else "")


def _pct(x) -> str:
    return "–" if x is None or x != x else f"{100 * x:.2f}%"


def _value(v) -> str:
    return json.dumps(v) if isinstance(v, (dict, list, bool)) or v is None else str(v)

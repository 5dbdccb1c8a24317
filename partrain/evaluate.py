"""`partrain evaluate RUN`: test accuracy, accuracy per class and a confusion matrix of a run.

The parameters come from the run's best.h5 (the epoch with the best validation accuracy) or, with
checkpoint="last", from checkpoint.h5. The test set and the normalisation statistics come from the
store the run was trained on (its path is in config.json; `data_dir` points elsewhere).
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from .errors import PartrainError

CHECKPOINTS = {"best": "best.h5", "last": "checkpoint.h5"}
CONFUSION_FILE, EVALUATION_FILE = "confusion.png", "evaluation.json"


def data_path(cfg, data_dir: str | Path | None) -> Path:
    """The store to read: DATA_DIR/cifar10.h5 if given, else the one the run was trained on."""
    from .datasets.store import FILENAME
    path = Path(data_dir) / FILENAME if data_dir is not None else Path(cfg.data)
    if not path.exists():
        raise PartrainError(f"{path} not found (the data this run was trained on); "
                            "point --data-dir at the folder holding cifar10.h5")
    return path


def load_run(run: str | Path, checkpoint: str = "best"):
    """(model, cfg, meta_run) of a run with the chosen checkpoint's parameters bound."""
    from .train import load_params_for_eval
    if checkpoint not in CHECKPOINTS:
        raise PartrainError(f"checkpoint must be one of {', '.join(CHECKPOINTS)}")
    return load_params_for_eval(Path(run), CHECKPOINTS[checkpoint])


def confusion_matrix(labels: np.ndarray, preds: np.ndarray, k: int) -> np.ndarray:
    """counts[i, j] = number of samples of true class i predicted as class j."""
    m = np.zeros((k, k), np.int64)
    np.add.at(m, (np.asarray(labels, np.int64), np.asarray(preds, np.int64)), 1)
    return m


def evaluate_run(run: str | Path, data_dir: str | Path | None = None, checkpoint: str = "best",
                 out_dir: str | Path | None = None, warn=None, tta: str = "none") -> dict:
    """Evaluate a run on the test set; writes confusion.png and evaluation.json into out_dir
    (default: the run folder) and returns the numbers (see `format_report`).

    tta: a `tta.MODES` name; unless "none", also the accuracy with test-time augmentation
    ("test_accuracy_tta"); the per-class numbers and the confusion matrix stay without it.
    """
    from .batches import normaliser
    from .datasets.store import load_store
    from .plots import plot_confusion
    from .train import accuracy, file_sha256, tta_accuracy, write_json_atomic
    from .tta import MODES

    warn = warn or (lambda text: print(text, file=sys.stderr))
    if tta not in MODES:
        raise PartrainError(f"--tta must be one of {', '.join(MODES)}")
    run = Path(run)
    model, cfg, meta_run = load_run(run, checkpoint)
    path = data_path(cfg, data_dir)
    data = load_store(path, splits=("test",))
    if file_sha256(path) != meta_run.get("data_sha256"):
        warn(f"warning: {path} is not the file this run was trained on (its sha256 differs)")
    if list(data.class_names) != list(meta_run.get("class_names", data.class_names)):
        raise PartrainError(f"{path} has other class names than the run {run} was trained with")
    scale, shift = normaliser(data.mean, data.std)
    acc, preds = accuracy(model, data.test_images, data.test_labels, scale, shift)
    acc_tta = (tta_accuracy(model, data.test_images, data.test_labels, scale, shift, tta)[1]
               if tta != "none" else None)
    k = len(data.class_names)
    matrix = confusion_matrix(data.test_labels, preds, k)
    totals = matrix.sum(axis=1)
    per_class = {name: {"correct": int(matrix[i, i]), "total": int(totals[i]),
                        "accuracy": float(matrix[i, i] / totals[i]) if totals[i] else float("nan")}
                 for i, name in enumerate(data.class_names)}
    out = Path(out_dir) if out_dir is not None else run
    out.mkdir(parents=True, exist_ok=True)
    figure = plot_confusion(matrix, data.class_names, out / CONFUSION_FILE)
    ck = meta_run["checkpoint"]
    result = {"run": str(run), "checkpoint": ck["path"], "epoch": ck["epoch"],
              "data": str(path), "test_accuracy": acc, "n_test": int(len(preds)),
              "n_correct": int(np.trace(matrix)), "per_class": per_class,
              "confusion": matrix.tolist(), "class_names": list(data.class_names),
              "figure": str(figure)}
    if acc_tta is not None:
        result.update(tta=tta, test_accuracy_tta=acc_tta)
    write_json_atomic(out / EVALUATION_FILE, result)
    result["json"] = str(out / EVALUATION_FILE)
    return result


def format_report(r: dict) -> list[str]:
    """The lines `partrain evaluate` prints."""
    lines = [f"{r['run']}: {Path(r['checkpoint']).name} (after epoch {r['epoch']}) on the "
             f"{r['n_test']:,} test images of {r['data']}",
             f"test accuracy {r['test_accuracy']:.2%} ({r['n_correct']:,} / {r['n_test']:,})"
             + (f"; with TTA ({r['tta']}) {r['test_accuracy_tta']:.2%}"
                if "test_accuracy_tta" in r else ""),
             "",
             f"{'class':<12} {'accuracy':>8}  {'correct':>7} / total"]
    for name, c in r["per_class"].items():
        lines.append(f"{name:<12} {c['accuracy']:>8.1%}  {c['correct']:>7,} / {c['total']:,}")
    m = np.array(r["confusion"])
    off = m.copy()
    np.fill_diagonal(off, 0)
    worst = [divmod(int(i), len(m)) for i in np.argsort(off, axis=None)[::-1][:3]]
    pairs = [f"{r['class_names'][i]} as {r['class_names'][j]} ({off[i, j]})"
             for i, j in worst if off[i, j]]
    if pairs:
        lines += ["", "most confused: " + ", ".join(pairs)]
    lines += ["", f"wrote {r['figure']} and {r['json']}"]
    return lines

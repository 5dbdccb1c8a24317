"""`partrain evaluate RUN`: test accuracy, accuracy per class and a confusion matrix of a run.

The parameters come from the run's best.h5 (the epoch with the best validation accuracy) or, with
checkpoint="last", from checkpoint.h5. The test set and the normalisation statistics come from the
store the run was trained on (its path is in config.json; `data_dir` points elsewhere).
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from .batches import make_batch, normaliser, run_normaliser
from .datasets.store import FILENAME, load_store
from .errors import PartrainError
from .rundir import CHECKPOINTS, RunDir, file_sha256, write_json_atomic
from .progress import Phase
from .tta import MODES, describe, tta_logits

CONFUSION_FILE, EVALUATION_FILE = "confusion.png", "evaluation.json"


def batched_logits(model, images, idx, scale, shift, tta: str = "none", batch: int = 500,
                   phase=None):
    """Yield (lo, logits, tta_logits) for images[idx[lo:lo + batch]], batch after batch: the
    model's evaluation-mode logits and their weighted mean over the TTA views of `tta` (the same
    array when tta is "none"), both float64. The one inference loop: every accuracy, TTA accuracy
    and confusion matrix is an argmax of it. The first TTA view is the image itself, so the plain
    logits come with the TTA ones at no extra pass; one batch buffer is reused throughout.
    phase: a `progress.Phase` told of every batch's images (what the user sees meanwhile).
    """
    labels = np.zeros(len(images), np.uint8)  # make_batch's labels; inference needs none
    buf = None
    for lo in range(0, len(idx), batch):
        x, _ = make_batch(images, labels, idx[lo:lo + batch], scale, shift, out=buf,
                          dtype=model.dtype)
        buf = x if buf is None else buf
        plain = np.asarray(model.logits(x), np.float64)
        mixed = plain if tta == "none" else tta_logits(model, x, tta, logits=plain)
        if phase is not None:
            phase.update(len(plain))
        yield lo, plain, mixed


def predictions(model, images, idx, scale, shift, tta: str = "none",
                batch: int = 500, phase=None) -> tuple[np.ndarray, np.ndarray]:
    """(plain, with TTA) predicted classes of images[idx]: argmaxes of `batched_logits`."""
    plain = np.empty(len(idx), np.int64)
    mixed = np.empty(len(idx), np.int64)
    for lo, z, z_tta in batched_logits(model, images, idx, scale, shift, tta, batch, phase):
        plain[lo:lo + len(z)] = z.argmax(axis=1)
        mixed[lo:lo + len(z)] = z_tta.argmax(axis=1)
    return plain, mixed


def accuracy(model, images, labels, scale, shift, idx=None,
             batch: int = 1000, phase=None) -> tuple[float, np.ndarray]:
    """Top-1 accuracy of `model` (eval mode) on images[idx]; also returns the predictions."""
    idx = np.arange(len(labels)) if idx is None else idx
    preds = predictions(model, images, idx, scale, shift, batch=batch, phase=phase)[0]
    return _fraction_right(preds, labels[idx]), preds


def tta_accuracy(model, images, labels, scale, shift, mode: str, batch: int = 500,
                 idx=None, phase=None) -> tuple[float, float]:
    """(plain accuracy, accuracy with test-time augmentation `mode`) on images[idx], from one
    pass per view."""
    idx = np.arange(len(labels)) if idx is None else idx
    plain, mixed = predictions(model, images, idx, scale, shift, mode, batch, phase)
    return _fraction_right(plain, labels[idx]), _fraction_right(mixed, labels[idx])


def _fraction_right(preds: np.ndarray, labels: np.ndarray) -> float:
    return float((preds == labels).mean()) if len(labels) else float("nan")


def data_path(config: dict, data_dir: str | Path | None) -> Path:
    """The store to read: DATA_DIR/cifar10.h5 if given, else the one the run was trained on."""
    path = Path(data_dir) / FILENAME if data_dir is not None else Path(config.get("data", FILENAME))
    if not path.exists():
        raise PartrainError(f"{path} not found (the data this run was trained on); "
                            "point --data-dir at the folder holding cifar10.h5")
    return path


def check_store_fits(data, meta_run: dict, model, path, run) -> None:
    """PartrainError unless store `data` (at `path`) is one run `run` can read: the class names
    it was trained with, and images of its model's input size."""
    if list(data.class_names) != list(meta_run.get("class_names", data.class_names)):
        raise PartrainError(f"{path} has other class names than the run {run} was trained with")
    if tuple(data.image_shape) != tuple(model.input_shape):
        _, h, w = data.image_shape
        raise PartrainError(f"{path} holds {h}x{w} images; the model of run {run} takes "
                            f"{'x'.join(map(str, model.input_shape[1:]))}")


def load_run(run: str | Path, checkpoint: str = "best"):
    """(model, config dict, meta_run) of a run with the chosen checkpoint's parameters bound."""
    if checkpoint not in CHECKPOINTS:
        raise PartrainError(f"checkpoint must be one of {', '.join(CHECKPOINTS)}")
    return RunDir.open(run).load_for_eval(checkpoint)


def run_scale_shift(config: dict, path, data) -> tuple[np.ndarray, np.ndarray]:
    """The normaliser a run trained with (`batches.normalization`): the statistics in `data`
    (a store of that file, any splits), or with --normalize mean-image the mean of the run's
    training images, read from the store at `path`."""
    from .config import TrainConfig
    cfg = TrainConfig.from_dict(config)
    if cfg.normalize == "channel":
        return normaliser(data.mean, data.std)
    return run_normaliser(cfg, load_store(path, splits=("train",)))


def per_class_accuracy(matrix: np.ndarray, class_names) -> dict:
    """{name: {"correct", "total", "accuracy"}} from a confusion matrix (rows: true class)."""
    totals = matrix.sum(axis=1)
    return {name: {"correct": int(matrix[i, i]), "total": int(totals[i]),
                   "accuracy": float(matrix[i, i] / totals[i]) if totals[i] else float("nan")}
            for i, name in enumerate(class_names)}


def confusion_matrix(labels: np.ndarray, preds: np.ndarray, k: int) -> np.ndarray:
    """counts[i, j] = number of samples of true class i predicted as class j."""
    m = np.zeros((k, k), np.int64)
    np.add.at(m, (np.asarray(labels, np.int64), np.asarray(preds, np.int64)), 1)
    return m


def evaluate_run(run: str | Path, data_dir: str | Path | None = None, checkpoint: str = "best",
                 out_dir: str | Path | None = None, warn=None, tta: str = "none",
                 quiet: bool = True) -> dict:
    """Evaluate a run on the test set; writes confusion.png and evaluation.json into out_dir
    (default: the run folder) and returns the numbers (see `format_report`).

    tta: a `tta.MODES` name; unless "none", also the accuracy with test-time augmentation
    ("test_accuracy_tta"); the per-class numbers and the confusion matrix stay without it.
    quiet: no progress bar (or plain lines, off a terminal) during the test pass.
    """
    from .plots import plot_confusion  # matplotlib: imported only when a figure is made

    warn = warn or (lambda text: print(text, file=sys.stderr))
    if tta not in MODES:
        raise PartrainError(f"--tta must be one of {', '.join(MODES)}")
    run = Path(run)
    model, config, meta_run = load_run(run, checkpoint)
    path = data_path(config, data_dir)
    data = load_store(path, splits=("test",))
    if file_sha256(path) != meta_run.get("data_sha256"):
        warn(f"warning: {path} is not the file this run was trained on (its sha256 differs)")
    check_store_fits(data, meta_run, model, path, run)
    scale, shift = run_scale_shift(config, path, data)
    n = len(data.test_labels)
    with Phase(describe("test set", n, tta), n, "image", quiet) as phase:  # one pass, TTA or not
        preds, preds_tta = predictions(model, data.test_images, np.arange(n), scale, shift, tta,
                                       phase=phase)
    acc = _fraction_right(preds, data.test_labels)
    acc_tta = _fraction_right(preds_tta, data.test_labels) if tta != "none" else None
    matrix = confusion_matrix(data.test_labels, preds, len(data.class_names))
    per_class = per_class_accuracy(matrix, data.class_names)
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

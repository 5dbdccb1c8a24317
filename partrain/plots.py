"""The figures: training loss and accuracy of runs (from history.csv), confusion, scaling.

Figures use matplotlib's object API (`Figure` + `savefig`), never pyplot: no GUI backend, no global
state, safe on a headless machine or in a worker. matplotlib is imported inside the functions, so
importing partrain stays fast.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from .errors import PartrainError
from .rundir import RunDir

DPI = 130          # 7 x 4 inches -> 910 x 520 px: sharp when a README shrinks it to ~700 px
FIGSIZE = (7, 4)


# -- figures -----------------------------------------------------------------------------------

def plot_runs(run_dirs: Sequence[str | os.PathLike], out_dir: str | os.PathLike,
              pdf: bool = False) -> list[Path]:
    """loss.png (per iteration, raw and smoothed) and accuracy.png (per epoch) for one or more runs.

    Each run folder's history is read before anything is drawn; its folder name labels it.
    """
    if not run_dirs:
        raise PartrainError("no runs to plot")
    runs = [(Path(d).resolve().name, *RunDir(d).read_history()) for d in run_dirs]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    colors = _colors(len(runs))

    loss_fig, ax = _figure()
    for (name, steps, _), color in zip(runs, colors):
        pts = [(r["step"], r["loss"]) for r in steps if "step" in r and "loss" in r]
        if not pts:
            continue
        x, y = np.array(pts, dtype=float).T
        ax.plot(x, y, color=color, alpha=0.2, linewidth=0.7)
        ax.plot(x, _ema(y), color=color, linewidth=1.8, label=name)
    ax.set(title="Training loss", xlabel="iteration", ylabel="training loss")
    from matplotlib.lines import Line2D
    styles = [Line2D([], [], color="0.3", alpha=0.3, linewidth=0.7, label="per iteration"),
              Line2D([], [], color="0.3", linewidth=1.8, label="moving average")]
    _finish(ax, "no step rows yet", extra_handles=styles)

    acc_fig, ax = _figure()
    for (name, _, epochs), color in zip(runs, colors):
        rows = [r for r in epochs if "epoch" in r]
        for key, style in (("train_acc", "--"), ("val_acc", "-")):
            pts = [(r["epoch"], r[key]) for r in rows if key in r]
            if pts:
                x, y = np.array(pts, dtype=float).T
                y = _percent(y)
                label = f"{name} (last val {y[-1]:.1f}%)" if key == "val_acc" else None
                ax.plot(x, y, style, color=color, marker="o", markersize=3, label=label)
    ax.set(title="Accuracy per epoch", xlabel="epoch", ylabel="accuracy (%)")
    styles = [Line2D([], [], color="0.3", linestyle="--", label="train"),
              Line2D([], [], color="0.3", linestyle="-", label="validation")]
    _finish(ax, "no epoch rows yet", extra_handles=styles)

    paths = []
    for fig, stem in ((loss_fig, "loss"), (acc_fig, "accuracy")):
        paths += _save(fig, out_dir / f"{stem}.png", pdf)
    return paths


ANNOTATE_UP_TO, LABEL_UP_TO = 20, 40  # classes: cells get their counts, ticks every name


def plot_confusion(matrix: np.ndarray, class_names: Sequence[str],
                   out_path: str | os.PathLike) -> Path:
    """Heatmap of counts (rows: true class, columns: predicted). Up to ANNOTATE_UP_TO classes
    each cell shows its count; up to LABEL_UP_TO every class is named; beyond (CIFAR-100), every
    k-th name so that the labels stay legible."""
    m = np.asarray(matrix)
    k = len(class_names)
    if m.shape != (k, k):
        raise ValueError(f"confusion matrix has shape {m.shape}, expected ({k}, {k})")
    from matplotlib.figure import Figure
    side = 6.4 if k <= ANNOTATE_UP_TO else 8.0
    fig = Figure(figsize=(side, side - 0.8), dpi=DPI, layout="constrained")
    ax = fig.subplots()
    image = ax.imshow(m, cmap="Blues", interpolation="nearest")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.03, label="samples")
    threshold = m.max() / 2 if m.size else 0
    if k <= ANNOTATE_UP_TO:
        for i in range(k):
            for j in range(k):
                ax.text(j, i, f"{m[i, j]:g}", ha="center", va="center",
                        fontsize=7 if k > 10 else 8,
                        color="white" if m[i, j] > threshold else "black")
    every = 1 if k <= LABEL_UP_TO else -(-k // LABEL_UP_TO)
    ticks = list(range(0, k, every))
    names = [class_names[i] for i in ticks]
    size = 8 if k <= ANNOTATE_UP_TO else 6
    ax.set_xticks(ticks, names, rotation=45 if k <= ANNOTATE_UP_TO else 90, ha="right",
                  rotation_mode="anchor", fontsize=size)
    ax.set_yticks(ticks, names, fontsize=size)
    total = m.sum()
    acc = f" (accuracy {100 * np.trace(m) / total:.1f}%)" if total else ""
    shown = "" if every == 1 else f"; one class name in {every} shown"
    ax.set(title=f"Confusion matrix{acc}{shown}", xlabel="predicted", ylabel="true")
    return _save(fig, Path(out_path), pdf=False)[0]


def plot_scaling(rows: Iterable[dict[str, Any]], out_path: str | os.PathLike) -> Path:
    """Throughput and parallel efficiency against worker count, one line per (reduction, batch).

    rows: dicts with workers, batch, reduction, images_per_s, efficiency (a fraction; 1 = ideal).
    """
    groups: dict[tuple[str, int], list[tuple[int, float, float]]] = {}
    for r in rows:
        try:
            key = (str(r["reduction"]), int(r["batch"]))
            groups.setdefault(key, []).append(
                (int(r["workers"]), float(r["images_per_s"]), float(r["efficiency"])))
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"bad scaling row {r!r}: {e}") from None
    if not groups:
        raise PartrainError("no scaling results to plot")
    from matplotlib.figure import Figure
    fig = Figure(figsize=(9, 4), dpi=DPI, layout="constrained")
    left, right = fig.subplots(1, 2)
    workers_all = sorted({w for pts in groups.values() for w, _, _ in pts})
    for (reduction, batch), color in zip(sorted(groups), _colors(len(groups))):
        w, ips, eff = np.array(sorted(groups[reduction, batch]), dtype=float).T
        label = f"{reduction}, batch {batch}"
        left.plot(w, ips, "-o", color=color, markersize=4, label=label)
        left.plot(w, ips[0] * w / w[0], ":", color=color, linewidth=1)   # ideal: linear
        right.plot(w, _percent(eff, cutoff=3.0), "-o", color=color, markersize=4, label=label)
    right.axhline(100, color="0.3", linestyle="--", linewidth=1, label="ideal")
    left.plot([], [], ":", color="0.3", label="ideal (linear)")
    left.set(title="Throughput", xlabel="workers", ylabel="images / s")
    right.set(title="Parallel efficiency", xlabel="workers", ylabel="efficiency (%)")
    right.set_ylim(bottom=0, top=max(110, right.get_ylim()[1]))
    left.set_ylim(bottom=0)
    for ax in (left, right):
        ax.set_xticks(workers_all)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return _save(fig, Path(out_path), pdf=False)[0]


# -- helpers -----------------------------------------------------------------------------------

def _figure():
    from matplotlib.figure import Figure
    fig = Figure(figsize=FIGSIZE, dpi=DPI, layout="constrained")
    return fig, fig.subplots()


def _finish(ax, empty_text: str, extra_handles: list | None = None) -> None:
    """Legend (runs, then style keys), grid, whole-number x ticks, x range at least 2 wide."""
    from matplotlib.ticker import MaxNLocator
    lo, hi = ax.get_xlim()
    if hi - lo < 2:
        ax.set_xlim((lo + hi) / 2 - 1, (lo + hi) / 2 + 1)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, steps=[1, 2, 2.5, 5, 10]))
    handles, _ = ax.get_legend_handles_labels()
    if not handles:
        ax.text(0.5, 0.5, empty_text, transform=ax.transAxes, ha="center", color="0.4")
    else:
        ax.legend(handles=handles + (extra_handles or []), fontsize=8, loc="best")
    ax.grid(alpha=0.3)


def _save(fig, png: Path, pdf: bool) -> list[Path]:
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png)
    paths = [png]
    if pdf:
        fig.savefig(png.with_suffix(".pdf"))
        paths.append(png.with_suffix(".pdf"))
    return paths


def _colors(n: int) -> list:
    from matplotlib import colormaps
    cmap = colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]


def _ema(y: np.ndarray) -> np.ndarray:
    """Bias-corrected exponential moving average with a time constant of ~4% of the points."""
    window = min(200, max(1, len(y) // 25))
    beta = 1.0 - 1.0 / window
    out = np.empty_like(y)
    acc = 0.0
    for i, v in enumerate(y):
        acc = beta * acc + (1 - beta) * v
        out[i] = acc / (1 - beta ** (i + 1)) if beta > 0 else v
    return out


def _percent(y: np.ndarray, cutoff: float = 1.0) -> np.ndarray:
    """Fractions to percent; values already in percent (max above cutoff) pass through."""
    y = np.asarray(y, dtype=float)
    finite = y[np.isfinite(y)]  # none at all: a run without a validation split (--val-size 0)
    return y if finite.size and finite.max() > cutoff else 100.0 * y

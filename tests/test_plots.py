"""The figures: files exist, are real PNGs of the expected size (history.csv: test_rundir.py)."""
from __future__ import annotations

import numpy as np
import pytest
from matplotlib.image import imread

from partrain.errors import PartrainError
from partrain.plots import plot_confusion, plot_runs, plot_scaling
from partrain.rundir import RunDir

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
           "truck"]


def write_run(run_dir, seed=0, epochs=6, steps_per_epoch=100, final_acc=0.55):
    """A plausible synthetic run: noisy decaying loss, rising accuracies."""
    rng = np.random.default_rng(seed)
    run_dir.mkdir(parents=True, exist_ok=True)
    run = RunDir(run_dir)
    step = 0
    for epoch in range(1, epochs + 1):
        losses = []
        for _ in range(steps_per_epoch):
            step += 1
            loss = 2.3 * np.exp(-step / (150 + 50 * seed)) + 0.9 + 0.15 * rng.standard_normal()
            losses.append(loss)
            run.append_history({"kind": "step", "epoch": epoch, "step": step, "loss": loss,
                                "lr": 1e-3 * 0.95 ** epoch, "images_per_s": 900 + rng.uniform()})
        val = final_acc * (1 - np.exp(-epoch / 2.0))
        run.append_history({"kind": "epoch", "epoch": epoch, "step": step,
                            "train_acc": min(1.0, val * 1.15), "val_acc": val,
                            "time_s": 10.0 * epoch, "loss": float(np.mean(losses))})
    return run


def assert_png(path, min_width=700):
    assert path.is_file() and path.stat().st_size > 10_000
    image = imread(path)
    assert image.ndim == 3 and image.shape[2] in (3, 4) and image.shape[1] >= min_width
    assert image.std() > 0.01  # not blank
    return image


def test_plot_runs_overlays_several_runs(tmp_path):
    runs = [tmp_path / "adam-lr1e-3", tmp_path / "sgd-momentum"]
    write_run(runs[0], seed=0)
    write_run(runs[1], seed=1, final_acc=0.48)
    paths = plot_runs(runs, tmp_path / "fig", pdf=True)
    assert [p.name for p in paths] == ["loss.png", "loss.pdf", "accuracy.png", "accuracy.pdf"]
    for p in paths:
        if p.suffix == ".png":
            assert_png(p)
        else:
            assert p.read_bytes()[:5] == b"%PDF-"


def test_plot_runs_single_run_and_missing(tmp_path):
    write_run(tmp_path / "one", epochs=1, steps_per_epoch=5)
    paths = plot_runs([tmp_path / "one"], tmp_path / "fig")
    assert [p.name for p in paths] == ["loss.png", "accuracy.png"]
    for p in paths:
        assert_png(p)
    with pytest.raises(PartrainError, match="no history.csv yet"):
        plot_runs([tmp_path / "nothing"], tmp_path / "fig")


def test_plot_confusion(tmp_path):
    rng = np.random.default_rng(0)
    m = rng.integers(0, 40, (10, 10)) + np.diag(rng.integers(400, 900, 10))
    out = plot_confusion(m, CLASSES, tmp_path / "confusion.png")
    assert_png(out, min_width=600)
    with pytest.raises(ValueError, match="shape"):
        plot_confusion(m[:9], CLASSES, tmp_path / "bad.png")


def test_plot_scaling(tmp_path):
    rows = []
    for reduction, serial in (("parent", 0.25), ("sharded", 0.05)):
        for batch in (50, 200):
            base = 800.0 if batch == 50 else 950.0
            for w in (1, 2, 4, 8):
                speedup = 1 / (serial + (1 - serial) / w)
                rows.append({"workers": w, "batch": batch, "reduction": reduction,
                             "images_per_s": base * speedup, "efficiency": speedup / w})
    out = plot_scaling(rows, tmp_path / "scaling.png")
    assert_png(out, min_width=1000)
    with pytest.raises(ValueError, match="bad scaling row"):
        plot_scaling([{"workers": 1}], tmp_path / "bad.png")

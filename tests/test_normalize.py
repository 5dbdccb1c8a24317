"""--normalize mean-image: the cs231n course's preprocessing (subtract the mean training image,
divide by nothing), the same in fit, evaluate and predict (issue 14)."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from partrain.batches import make_batch, mean_image, normalization, normaliser, split_train_val
from partrain.config import TrainConfig
from partrain.datasets.store import load_store
from partrain.evaluate import run_scale_shift
from synthetic import make_tiny_store


def test_per_pixel_normaliser_subtracts_the_mean_image_and_divides_by_nothing():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (20, 3, 4, 5), dtype=np.uint8)
    mean = mean_image(images, np.arange(20), chunk=7)
    np.testing.assert_allclose(mean, images.mean(axis=0, dtype=np.float64), rtol=1e-12)
    scale, shift = normaliser(mean, np.ones(3))
    assert scale.shape == (3, 1, 1) and shift.shape == (3, 4, 5)
    x, _ = make_batch(images, np.zeros(20, np.uint8), np.arange(20), scale, shift)
    np.testing.assert_allclose(x, images - mean.astype(np.float32), atol=1e-4)
    assert abs(float(x.mean())) < 1e-4  # every pixel centred over the set


def test_mean_image_is_over_the_runs_training_images_only(tmp_path):
    store = make_tiny_store(tmp_path / "cifar10.h5")
    data = load_store(store)
    cfg = TrainConfig(normalize="mean-image", val_size=100, seed=3)
    mean, std = normalization(cfg, data)
    train_idx, _ = split_train_val(len(data.train_labels), 100, 3)
    np.testing.assert_allclose(mean, data.train_images[train_idx].mean(0, dtype=np.float64))
    assert std.tolist() == [1.0, 1.0, 1.0]
    # evaluate/predict rebuild exactly what fit used, from the config and the store
    scale, shift = run_scale_shift(cfg.to_dict(), store, load_store(store, splits=("test",)))
    np.testing.assert_array_equal(shift, normaliser(mean, std)[1])
    channel = TrainConfig()
    assert [a.tolist() for a in normalization(channel, data)] == [
        np.asarray(data.mean, np.float64).tolist(), np.asarray(data.std, np.float64).tolist()]


@pytest.mark.slow
def test_fit_evaluate_and_predict_with_mean_image_normalisation(tmp_path):
    store = make_tiny_store(tmp_path / "data" / "cifar10.h5")
    cli = [sys.executable, "-m", "partrain.cli"]
    fit = subprocess.run([*cli, "fit", "--model", "three-layer", "--model-option", "num_filters=8",
                          "--model-option", "hidden_dim=32", "--epochs", "3", "--val-size", "100",
                          "--normalize", "mean-image", "--workers", "2", "--quiet",
                          "--data-dir", str(store.parent), "--runs-dir", str(tmp_path / "runs"),
                          "--name", "r"], capture_output=True, text=True, timeout=300)
    assert fit.returncode == 0, fit.stderr
    run = tmp_path / "runs" / "r"
    assert json.loads((run / "config.json").read_text())["config"]["normalize"] == "mean-image"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["test_acc"] > 0.3  # 10 classes: chance is 0.1; the tiny store is learnable
    ev = subprocess.run([*cli, "evaluate", str(run), "--checkpoint", "last"],
                        capture_output=True, text=True, timeout=300)
    assert ev.returncode == 0, ev.stderr
    pred = subprocess.run([*cli, "predict", str(run), "--test-index", "0", "1", "2"],
                          capture_output=True, text=True, timeout=300)
    assert pred.returncode == 0, pred.stderr
    bad = subprocess.run([*cli, "fit", "--normalize", "per-pixel", "--data-dir", str(store.parent)],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "per-pixel" in bad.stderr and "Traceback" not in bad.stderr

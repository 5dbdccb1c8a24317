"""`partrain lr-find`, the learning-rate range test (partrain/lr_find.py, cli_lrfind.py).

The toy problem: softmax regression (`linear`) with SGD (momentum 0.9, batch 50) on 1 000 small
synthetic images whose labels are half random (`noisy_store`; without the noise the model fits
every batch exactly, the loss reaches 0 and no learning rate can make it rise). Its good range
is measured here (`test_the_toy_problem_has_a_known_good_range`), by training from scratch at
constant learning rates: 1e-3 to 3e-2 train (the loss falls below half of ln 10 in 100 steps;
1e-2 and 3e-2 best), 1e-5 hardly moves, 0.3 and more explode at once (the first steps' loss is
over 4 x ln 10, the loss of a uniform guess). Measured while writing this: the loss after 100
steps (mean of the last 20) is 2.04, 1.70, 1.08, 0.47, 0.07, 0.22, 2.08, 5.3, 12, 49, 124 for
lr 1e-5, 1e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1, 3, 10. The sweep's suggestion must fall in
[1e-3, 3e-2].
"""
from __future__ import annotations

import csv
import json
import math
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from partrain.config import TrainConfig
from partrain.datasets.store import load_store, write_store
from partrain.errors import PartrainError
from partrain.interrupt import catch_signals
from partrain.lr_find import Curve, Smoother, Sweep, run_sweep, suggest, write_outputs
from partrain.train import Plan, epoch_order
from procs import assert_quiet, shm_leftovers
from synthetic import CLASS_NAMES, learnable_split

GOOD = (1e-3, 3e-2)     # the toy's measured good range (module doc)
LN10 = math.log(10)     # the loss of a uniform guess over 10 classes
TOY = ["--model", "linear", "--optimizer", "sgd", "--workers", "1", "--val-size", "50"]


def noisy_store(path: Path, n: int = 1000, label_noise: float = 0.5, seed: int = 0) -> Path:
    """A valid cifar10.h5 of `learnable_split` images, a `label_noise` share of whose labels
    are drawn at random: a problem that no step can solve exactly."""
    rng = np.random.default_rng(seed)
    images, labels = learnable_split(n, rng)
    noisy = rng.random(n) < label_noise
    labels[noisy] = rng.integers(0, 10, int(noisy.sum()))
    test_images, test_labels = learnable_split(20, rng)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_store(path, images, labels, test_images, test_labels, CLASS_NAMES,
                source_name="noisy", source_sha256="0" * 64)
    return path


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> Path:
    """The data folder of the toy problem."""
    return noisy_store(tmp_path_factory.mktemp("toy") / "data" / "cifar10.h5").parent


def toy_config(data_dir: Path, **kw) -> TrainConfig:
    return TrainConfig(model="linear", optimizer="sgd", workers=1, val_size=50,
                       data=str(data_dir / "cifar10.h5"), **kw)


def cli(*args, cwd, timeout=120):
    return subprocess.run([sys.executable, "-m", "partrain.cli", "lr-find", *map(str, args)],
                          cwd=cwd, capture_output=True, text=True, timeout=timeout)


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == ["step", "lr", "loss", "smoothed"]
        return [{k: float(v) for k, v in row.items()} for row in reader]


# ----------------------------------------------------------------------------- the toy problem
def constant_lr_losses(cfg: TrainConfig, lr: float, steps: int) -> np.ndarray:
    """The loss of each of `steps` steps of fit's loop at a constant lr, from scratch."""
    plan = Plan.of(cfg, load_store(cfg.data, splits=("train",)))
    losses = []
    with np.errstate(all="ignore"), catch_signals() as stop, plan.make_runner(stop) as runner:
        for epoch in range(steps // len(plan.bounds) + 1):
            runner.set_order(epoch_order(plan.train_idx, cfg.seed, epoch), epoch)
            for lo, hi in plan.bounds:
                if len(losses) == steps:
                    return np.array(losses)
                losses.append(runner.step(lo, hi, lr, len(losses) + 1)[0] / (hi - lo))
    return np.array(losses)


@pytest.mark.slow
def test_the_toy_problem_has_a_known_good_range(toy):
    cfg = toy_config(toy)
    for lr in (GOOD[0], 1e-2, GOOD[1]):
        final = constant_lr_losses(cfg, lr, 100)[-20:].mean()
        assert final < LN10 / 2, (lr, final)
    assert constant_lr_losses(cfg, 1e-5, 100)[-20:].mean() > 0.8 * LN10  # too small to learn
    for lr in (0.3, 10.0):
        assert constant_lr_losses(cfg, lr, 5).mean() > 4 * LN10, lr  # explodes at once


def test_the_sweep_goes_down_then_up_and_suggests_a_good_lr(toy):
    curve = run_sweep(toy_config(toy), Sweep(end_lr=100.0))
    lr, smoothed = curve.column("lr"), curve.column("smoothed")
    low = int(np.argmin(smoothed))
    assert 0 < low < len(smoothed) - 1
    assert smoothed[0] > LN10 * 0.95 and smoothed[low] < 0.7 * smoothed[0]  # down ...
    assert smoothed[-1] > 4 * smoothed[low]                                  # ... then up
    assert curve.stopped.startswith("smoothed loss") and "exceeded 4x its minimum" in curve.stopped
    assert len(curve.rows) < 200 and lr[-1] < 1.0  # stopped early, long before lr 100
    s = curve.suggestion
    assert GOOD[0] <= s["lr"] <= GOOD[1], s
    assert s["lr"] < s["lr_min_smoothed"] and s["slope_per_decade"] < 0
    np.testing.assert_allclose(np.diff(np.log(lr)), math.log(1e9) / 199, rtol=1e-9)  # exponential


def test_a_loss_that_is_not_finite_stops_the_sweep(toy):
    """With the smoothed-loss stop out of the way (diverge 1e300), the first NaN ends it; no
    non-finite row is kept."""
    curve = run_sweep(toy_config(toy), Sweep(end_lr=1e200, diverge=1e300))
    assert curve.stopped.startswith("loss became nan"), curve.stopped
    assert 10 < len(curve.rows) < 200
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["smoothed"]) for r in curve.rows)


# ---------------------------------------------------------------------------- pieces
def test_sweep_lr_runs_from_start_to_end_geometrically():
    s = Sweep(1e-4, 1.0, 5)
    np.testing.assert_allclose([s.lr(i) for i in range(5)], [1e-4, 1e-3, 1e-2, 1e-1, 1.0])


def test_the_smoother_is_bias_corrected():
    sm = Smoother(0.9)
    assert [round(sm.add(3.0), 12) for _ in range(4)] == [3.0] * 4  # no pull towards 0
    assert Smoother(0.0).add(5.0) == 5.0


def curve_of(y, steps=None) -> Curve:
    lr = np.logspace(-6, 1, len(y))
    c = Curve(Sweep(1e-6, 10.0, steps or len(y)))
    c.rows = [{"step": i + 1, "lr": float(a), "loss": float(b), "smoothed": float(b)}
              for i, (a, b) in enumerate(zip(lr, y))]
    return c


def test_suggest_finds_the_steepest_descent_before_the_minimum():
    x = np.linspace(-6, 1, 200)
    y = 2.3 - 1.5 / (1 + np.exp(-3 * (x + 3)))  # falls fastest at lr 1e-3
    y = np.where(x > -0.5, y + 20 * (x + 0.5) ** 2, y)  # then rises steeply (ignored)
    s = suggest(curve_of(y))
    assert abs(math.log10(s["lr"]) + 3) < 0.05, s
    assert suggest(curve_of(np.full(200, 2.3))) is None   # flat: no suggestion
    assert suggest(curve_of(np.linspace(1, 5, 200))) is None  # only rising
    assert suggest(curve_of([2.3, 2.2])) is None


def test_outputs_are_written_whole(tmp_path):
    c = curve_of(2.3 - np.linspace(0, 1, 50))
    c.suggestion = suggest(c)
    paths = write_outputs(c, {"model": "linear", "optimizer": "sgd", "batch_size": 50},
                          tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "lr_find.csv", "lr_find.json", "lr_find.png"]
    assert [r["step"] for r in read_csv(paths[0])] == list(range(1, 51))
    assert json.loads(paths[1].read_text())["rows"] == c.rows


@pytest.mark.parametrize("kw, message", [
    (dict(start_lr=1.0, end_lr=1.0), "--start-lr 1 must be below --end-lr 1"),
    (dict(steps=1), "--steps must be at least 2"),
    (dict(start_lr=0.0), "--start-lr must be more than 0"),
    (dict(end_lr=float("inf")), "--end-lr must be a finite number"),
    (dict(beta=1.0), "--beta must be in [0, 1)"),
    (dict(diverge=1.0), "--diverge must be more than 1"),
])
def test_sweep_check_names_the_bad_option(kw, message):
    with pytest.raises(PartrainError, match=re.escape(message)):
        Sweep(**kw).check()


# ----------------------------------------------------------------------- real processes
def test_the_command_writes_a_curve_a_plot_and_no_run_folder(toy, tmp_path):
    p = cli(*TOY, "--data-dir", toy, "--end-lr", 100, cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert_quiet(p.stderr)
    assert os.listdir(tmp_path) == ["lr-find"]  # no runs/, no checkpoint, no temp file
    out = tmp_path / "lr-find"
    assert sorted(os.listdir(out)) == ["lr_find.csv", "lr_find.json", "lr_find.png"]
    rows = read_csv(out / "lr_find.csv")
    doc = json.loads((out / "lr_find.json").read_text())
    assert [r["step"] for r in rows] == list(range(1, len(rows) + 1)) and 50 < len(rows) < 200
    assert rows == [{k: float(v) for k, v in r.items()} for r in doc["rows"]]
    assert np.all(np.diff([r["lr"] for r in rows]) > 0) and rows[0]["lr"] == 1e-7
    assert doc["sweep"] == {"start_lr": 1e-7, "end_lr": 100.0, "steps": 200, "beta": 0.9,
                            "diverge": 4.0}
    assert doc["settings"]["model"] == "linear" and "lr" not in doc["settings"]
    lr = doc["suggestion"]["lr"]
    assert GOOD[0] <= lr <= GOOD[1]
    assert f"suggested lr: {lr:.3g} (steepest descent" in p.stdout
    assert "stopped early: smoothed loss" in p.stdout
    import matplotlib.image
    png = matplotlib.image.imread(out / "lr_find.png")
    assert png.shape[:2] == (520, 910) and png.std() > 0.05  # drawn, not blank
    assert (out / "lr_find.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_workers_see_the_same_curve(toy, tmp_path):
    """With micro-batches the engine's steps have the bits of one process: the curve of two
    workers is the curve of one, and the pool leaves nothing behind."""
    common = [*TOY[:4], "--val-size", "50", "--micro-batch", "10", "--data-dir", toy,
              "--steps", 60, "--end-lr", 1.0]
    one = cli(*common, "--workers", 1, "--out", "one", cwd=tmp_path)
    two = subprocess.Popen([sys.executable, "-m", "partrain.cli", "lr-find", *map(str, common),
                            "--workers", "2", "--out", "two"], cwd=tmp_path, text=True,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = two.communicate(timeout=120)
    assert one.returncode == 0 and two.returncode == 0, (one.stderr, err)
    assert "2 worker(s)" in out
    assert (tmp_path / "one/lr_find.csv").read_bytes() == (tmp_path / "two/lr_find.csv").read_bytes()
    assert shm_leftovers(two.pid) == []


def test_ctrl_c_stops_after_a_step_and_keeps_the_curve_so_far(toy, tmp_path):
    proc = subprocess.Popen([sys.executable, "-m", "partrain.cli", "lr-find", *TOY,
                             "--data-dir", str(toy), "--steps", "5000", "--end-lr", "1e-6"],
                            cwd=tmp_path, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    try:
        for line in proc.stdout:  # the first progress line: the sweep is under way
            if line.startswith("step 500/5000"):
                break
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    assert "interrupted after" in err and "the curve so far is written" in err
    assert_quiet(err)
    rows = read_csv(tmp_path / "lr-find" / "lr_find.csv")
    assert 500 <= len(rows) < 5000
    assert json.loads((tmp_path / "lr-find" / "lr_find.json").read_text())["stopped"] == "interrupted"


@pytest.mark.parametrize("args, message", [
    (["--start-lr", "1", "--end-lr", "0.1"], "Error: --start-lr 1 must be below --end-lr 0.1"),
    (["--start-lr", "1", "--end-lr", "1"], "Error: --start-lr 1 must be below --end-lr 1"),
    (["--steps", "1"], "Error: --steps must be at least 2, got 1"),
    (["--start-lr", "nan"], "Error: --start-lr must be a finite number, got nan"),
    (["--data-dir", "nowhere"], "Error: no dataset at nowhere/cifar10.h5; run `partrain prepare`"),
    (["--model", "nope"], "Error: unknown model 'nope'"),
    (["--workers", "100", "--batch-size", "50"], "Error: --workers 100 exceeds --batch-size 50"),
    (["--out", "a-file"], "Error: --out a-file is a file, not a folder"),
])
def test_bad_input_is_one_error_line(toy, tmp_path, args, message):
    data = [] if "--data-dir" in args else ["--data-dir", str(toy)]
    if "--out" in args:
        (tmp_path / "a-file").write_text("")
    p = cli(*TOY[:4], "--val-size", "50", *data, *args, cwd=tmp_path)
    assert p.returncode == 1, (p.stdout, p.stderr)
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(message), p.stderr
    assert os.listdir(tmp_path) == (["a-file"] if "--out" in args else [])  # no output folder

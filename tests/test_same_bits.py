"""The same bits whatever the worker count (issue 13), with real `partrain fit` processes.

With --micro-batch M every micro-batch of M samples gets its own gradient row, and the rows are
summed in one order by whoever reduces (`step.micro_gradients`): 1, 2 and 3 workers must then
give sha256-identical parameters, batch-norm state and history (apart from its timings), and a
run may resume on another worker count. Without it the sum is over the workers' shards and the
bits move with N (the check that these tests can fail). Two ranks: tests/test_mpi.py.
"""
from __future__ import annotations

import subprocess
import sys

import pytest

from procs import ctrl_c_after_a_step, fit_quietly as fit, resume_matches, untimed_history
from synthetic import make_tiny_store
from test_digests import digest  # sha256 of a checkpoint's parameters, then its BN state

RUNS = {
    "three-layer": ["--model", "three-layer", "--model-option", "num_filters=8",
                    "--model-option", "hidden_dim=32", "--batch-size", "50", "--epochs", "2",
                    "--micro-batch", "10"],
    "vgg": ["--model", "vgg", "--model-option", "widths=[8,16]", "--model-option",
            "ghost_batch=8", "--optimizer", "sgd", "--lr", "0.05", "--batch-size", "32",
            "--epochs", "1", "--flip", "--translate", "2", "--micro-batch", "8", "--log-every", "3"],
}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bits-data")
    make_tiny_store(folder / "cifar10.h5")
    return folder


@pytest.mark.parametrize("run", list(RUNS))
def test_one_two_and_three_workers_give_the_same_bits(tmp_path, data, run):
    runs = tmp_path / "runs"
    for n in (1, 2, 3):
        fit(data, runs, f"w{n}", *RUNS[run], "--workers", n)
    for which in ("checkpoint", "best"):
        assert len({digest(runs / f"w{n}" / f"{which}.h5") for n in (1, 2, 3)}) == 1, which
    hist = [untimed_history(runs / f"w{n}") for n in (1, 2, 3)]
    assert len(hist[0]) > 3 and hist[0] == hist[1] == hist[2]


def test_without_micro_batches_the_bits_move_with_the_worker_count(tmp_path, data):
    """What the rows are for: shards of 25 and 50 samples sum their gradients in other orders
    (the default for the course model, which the rows slow down)."""
    runs = tmp_path / "runs"
    args = [a for a in RUNS["three-layer"] if a not in ("--micro-batch", "10")]
    for n in (1, 2):
        fit(data, runs, f"w{n}", *args, "--workers", n)
    assert digest(runs / "w1" / "checkpoint.h5") != digest(runs / "w2" / "checkpoint.h5")


@pytest.mark.parametrize("first, then", [(2, 1), (1, 3)])
def test_resume_on_another_worker_count_is_the_uninterrupted_run(tmp_path, data, first, then):
    runs = tmp_path / "runs"
    fit(data, runs, "whole", *RUNS["vgg"], "--workers", then)
    fit(data, runs, "cut", *RUNS["vgg"], "--workers", first, "--max-steps", 3)
    resume_matches(runs, "--workers", then)


def test_resume_on_another_worker_count_without_micro_batches_says_why_not(tmp_path, data):
    runs = tmp_path / "runs"
    args = [a for a in RUNS["three-layer"] if a not in ("--micro-batch", "10")]
    fit(data, runs, "cut", *args, "--workers", 2, "--max-steps", 2)
    p = subprocess.run([sys.executable, "-m", "partrain.cli", "fit", "--resume",
                        str(runs / "cut"), "--workers", "1", "--quiet"],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 1
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: cannot resume exactly"), p.stderr
    assert "workers (2 -> 1)" in lines[0] and "without --micro-batch" in lines[0]


def test_a_micro_batch_that_splits_a_batch_norm_group_is_one_clear_line(tmp_path, data):
    args = [a for a in RUNS["vgg"] if a not in ("--micro-batch", "8")]
    p = fit(data, tmp_path / "runs", "bad", *args, "--micro-batch", 12, check=False)
    assert p.returncode == 1 and not (tmp_path / "runs" / "bad").exists()
    assert p.stderr.strip() == ("Error: --micro-batch 12 is not a multiple of model vgg's "
                                "batch-norm group of 8"), p.stderr


def test_ctrl_c_at_two_workers_then_resume_on_one_is_the_uninterrupted_run(tmp_path, data):
    """The issue's case with a real SIGINT mid-run (not --max-steps): interrupted at
    --workers 2, resumed with --workers 1, equal to the uninterrupted --workers 1 run."""
    runs = tmp_path / "runs"
    args = [*RUNS["three-layer"][:-3], "20", "--micro-batch", "10", "--log-every", "3"]
    assert RUNS["three-layer"][-4:-2] == ["--epochs", "2"]
    fit(data, runs, "whole", *args, "--workers", 1)
    ctrl_c_after_a_step(["fit", *args, "--workers", "2", "--val-size", "100", "--data-dir",
                         data, "--runs-dir", runs, "--name", "cut"], runs / "cut")
    resume_matches(runs, "--workers", 1, files=("checkpoint", "best"))

"""--early-stop PATIENCE with --early-stop-on val_acc|val_loss, and what best.h5 holds.

The runs freeze every parameter after FROZEN epochs (--freeze-after NAME=3 for each: a learning
rate of exactly 0 from then on), so from epoch FROZEN + 1 on the validation accuracy and loss
repeat exactly and never improve: the run must stop PATIENCE epochs after its best epoch (which
the test reads from history.csv by the rule: strictly better than every earlier epoch), with
best.h5 that epoch's checkpoint: the bits of a run of just that many epochs. Also: the summary
and the final line say why, a resume of the finished run is refused, a run cut mid-way and
resumed stops at the same epoch with the same files, no validation set is one clear line.
"""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from partrain.checkpoint import load_checkpoint
from partrain.runs_table import describe_run
from partrain.config import TrainConfig
from partrain.rundir import RunDir
from partrain.train import fit
from procs import untimed_history
from test_digests import digest

SMALL = {"num_filters": 4, "hidden_dim": 16, "weight_scale": 0.01}
FROZEN, PATIENCE, EPOCHS = 3, 2, 12
FREEZE = {name: FROZEN for name in ("conv1", "conv1_bias", "fc1", "fc2")}  # every parameter


def config(store, **kw):
    base = dict(model="three-layer", model_options=SMALL, batch_size=25, epochs=EPOCHS,
                val_size=50, data=str(store), log_every=5, lr=3e-3, freeze_after=FREEZE,
                early_stop=PATIENCE)
    base.update(kw)
    return TrainConfig(**base)


def train(store, tmp_path, name, **kw):
    run = tmp_path / name
    run.mkdir()
    return run, fit(config(store, **kw), run, quiet=True)


def expected_stop(values, lower_is_better=False):
    """(best epoch, stop epoch) by the rule, from the epochs' values (1-based epochs)."""
    best, best_epoch = None, 0
    for epoch, v in enumerate(values, start=1):
        if best is None or (v < best if lower_is_better else v > best):
            best, best_epoch = v, epoch
        if epoch - best_epoch >= PATIENCE:
            return best_epoch, epoch
    return best_epoch, None


@pytest.mark.parametrize("monitor", ["val_acc", "val_loss"])
def test_stops_patience_epochs_after_the_best_and_keeps_its_checkpoint(tiny_store, tmp_path,
                                                                       monitor):
    run, summary = train(tiny_store, tmp_path, "early", early_stop_on=monitor)
    epochs = RunDir(run).read_history()[1]
    values = [r[monitor] for r in epochs]
    assert values[FROZEN:] == [values[FROZEN - 1]] * (len(values) - FROZEN)  # frozen: repeats
    best_epoch, stop = expected_stop(values, lower_is_better=monitor == "val_loss")
    assert stop is not None and stop <= FROZEN + PATIENCE < EPOCHS
    assert len(epochs) == stop and summary["epochs_done"] == stop
    assert summary["stopped"] == "early_stop" and summary["best_epoch"] == best_epoch
    assert "test_acc" in summary  # a finished run: tested
    best = (f"{100 * max(values):.1f} %" if monitor == "val_acc" else f"{min(values):.4f}")
    assert summary["early_stop"] == (f"stopped early: {monitor} has not improved for "
                                     f"{PATIENCE} epochs since epoch {best_epoch} (best {best})")
    assert load_checkpoint(run / "best.h5")[1]["epoch"] == best_epoch
    assert load_checkpoint(run / "checkpoint.h5")[1]["early_stop"] == summary["early_stop"]
    listed = describe_run(run)  # partrain runs: finished, with the reason, no resume command
    assert (listed["status"], listed["reason"], listed["resume"]) == (
        "finished", summary["early_stop"], None)
    # best.h5 is the state after best_epoch epochs: the bits of a run of that many epochs
    short, _ = train(tiny_store, tmp_path, "short", early_stop_on=monitor, epochs=best_epoch,
                     early_stop=None)
    assert digest(run / "best.h5") == digest(short / "checkpoint.h5")
    assert summary["best_val_acc"] == max(r["val_acc"] for r in epochs)
    assert summary["best_val_loss"] == pytest.approx(min(r["val_loss"] for r in epochs), rel=1e-6)


def test_without_early_stop_every_epoch_runs_and_best_is_by_val_acc(tiny_store, tmp_path):
    run, summary = train(tiny_store, tmp_path, "all", early_stop=None, epochs=FROZEN + 3)
    epochs = RunDir(run).read_history()[1]
    assert len(epochs) == FROZEN + 3 and summary["stopped"] is None
    acc = [r["val_acc"] for r in epochs]
    assert load_checkpoint(run / "best.h5")[1]["epoch"] == acc.index(max(acc)) + 1
    assert all(r["val_loss"] > 0 for r in epochs)


def test_a_run_cut_and_resumed_stops_at_the_same_epoch(tiny_store, tmp_path):
    whole, s_whole = train(tiny_store, tmp_path, "whole")
    cut = tmp_path / "cut"
    cut.mkdir()
    fit(config(tiny_store), cut, quiet=True, max_steps=2 * 18 + 5)  # mid-epoch 3 (18 steps an epoch)
    s_cut = fit(config(tiny_store), cut, resume=True, quiet=True)
    for which in ("checkpoint", "best"):
        assert digest(cut / f"{which}.h5") == digest(whole / f"{which}.h5"), which
    assert untimed_history(cut) == untimed_history(whole)
    for key in ("stopped", "best_epoch", "early_stop", "epochs_done", "best_val_loss"):
        assert s_cut[key] == s_whole[key], key


def cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "partrain.cli", *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=120)


def test_the_final_line_says_why_and_a_resume_says_it_is_finished(tiny_store, tmp_path):
    freeze = [a for k in FREEZE for a in ("--freeze-after", f"{k}={FROZEN}")]
    p = cli("fit", "--model-option", "num_filters=4", "--model-option", "hidden_dim=16",
            "--batch-size", 25, "--epochs", EPOCHS, "--val-size", 50, "--lr", "3e-3",
            "--workers", 1, *freeze, "--early-stop", PATIENCE, "--data-dir", tiny_store.parent,
            "--runs-dir", tmp_path / "runs", "--name", "r", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    summary = json.loads((tmp_path / "runs" / "r" / "summary.json").read_text())
    lines = p.stdout.strip().splitlines()
    assert lines[-2].startswith(f"next: open {tmp_path / 'runs' / 'r' / 'report.html'}")
    assert lines[-1] == summary["early_stop"] and lines[-1].startswith("stopped early: val_acc")
    assert f"done: {summary['epochs_done']} of {EPOCHS} epochs" in p.stdout
    before = (tmp_path / "runs" / "r" / "checkpoint.h5").read_bytes()
    for extra in ([], ["--epochs", EPOCHS + 5]):
        p = cli("fit", "--resume", tmp_path / "runs" / "r", *extra, cwd=tmp_path)
        assert p.returncode == 1 and p.stderr.count("\n") == 1, p.stderr
        assert p.stderr.startswith(f"Error: {tmp_path / 'runs' / 'r'} is finished: stopped "
                                   f"early: val_acc has not improved"), p.stderr
    assert (tmp_path / "runs" / "r" / "checkpoint.h5").read_bytes() == before


def test_early_stop_needs_a_validation_set(tiny_store, tmp_path):
    p = cli("fit", "--early-stop", 3, "--val-size", 0, "--data-dir", tiny_store.parent,
            "--runs-dir", tmp_path / "runs", "--name", "r", cwd=tmp_path)
    assert p.returncode == 1 and p.stderr.strip() == (
        "Error: --early-stop needs a validation set: --val-size must be more than 0")
    p = cli("fit", "--early-stop-on", "val_top5", "--data-dir", tiny_store.parent, cwd=tmp_path)
    assert p.returncode == 2 and "val_acc" in p.stderr and "val_loss" in p.stderr

"""The training loop in one process: learning, run folder contents, exact resume, bad resumes."""
import json

import numpy as np
import pytest

from partrain.checkpoint import load_checkpoint
from partrain.config import TrainConfig, resumed
from partrain.errors import PartrainError
from partrain.train import batch_bounds, epoch_order, fit, split_train_val

SMALL = {"num_filters": 4, "hidden_dim": 16, "weight_scale": 0.01}


def config(store, **kw):
    base = dict(model="three-layer", model_options=SMALL, batch_size=20, epochs=2, val_size=50,
                data=str(store), log_every=5, lr=3e-3)
    base.update(kw)
    return TrainConfig(**base)


def test_split_and_order_are_seeded_and_disjoint():
    tr, va = split_train_val(100, 10, seed=3)
    assert len(tr) == 90 and len(va) == 10 and not set(tr) & set(va)
    np.testing.assert_array_equal(split_train_val(100, 10, 3)[1], va)
    o1, o2 = epoch_order(tr, 3, 0), epoch_order(tr, 3, 1)
    assert sorted(o1) == sorted(tr) and not np.array_equal(o1, o2)
    np.testing.assert_array_equal(o1, epoch_order(tr, 3, 0))
    assert batch_bounds(45, 20) == [(0, 20), (20, 40), (40, 45)]


def test_fit_learns_and_writes_run_folder(tiny_store, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    s = fit(config(tiny_store, epochs=3), run, quiet=True)
    assert s["test_acc"] > 0.5  # ten classes: chance is 0.1
    assert s["memory"]["total_pss_mib"] > 1 and s["memory"]["worker_peak_rss_mib"] is None
    for f in ("config.json", "history.csv", "checkpoint.h5", "best.h5", "summary.json"):
        assert (run / f).exists(), f
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["config"]["model"] == "three-layer" and len(cfg["data_sha256"]) == 64
    lines = (run / "history.csv").read_text().splitlines()
    assert sum(1 for line in lines if line.startswith("epoch")) == 3
    arrays, meta = load_checkpoint(run / "checkpoint.h5")
    assert meta["epoch"] == 3 and meta["position"] == 0


@pytest.mark.parametrize("stop_after", [7, 23])  # mid-epoch, and just after an epoch boundary
def test_resume_is_bit_identical(tiny_store, tmp_path, stop_after):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    fit(config(tiny_store), a, quiet=True)
    s = fit(config(tiny_store), b, quiet=True, max_steps=stop_after)
    assert s["stopped"] == "max_steps"
    fit(config(tiny_store), b, resume=True, quiet=True)
    pa, _ = load_checkpoint(a / "checkpoint.h5")
    pb, _ = load_checkpoint(b / "checkpoint.h5")
    for k in pa:
        np.testing.assert_array_equal(pa[k], pb[k], err_msg=k)


def test_resume_conflicts_are_named():
    saved = TrainConfig(lr=1e-3, epochs=3)
    with pytest.raises(PartrainError, match=r"changed settings: lr \(0.001 -> 0.01\)$"):
        resumed(saved, {"lr": 1e-2})
    # constant schedule: extending is exact; log_every only changes the log
    assert resumed(saved, {"epochs": 5, "log_every": 7}) == TrainConfig(lr=1e-3, epochs=5,
                                                                       log_every=7)
    with pytest.raises(PartrainError, match="epochs"):
        resumed(TrainConfig(schedule="cosine", epochs=3), {"epochs": 5})
    with pytest.raises(PartrainError, match="workers"):
        resumed(saved, {"workers": 2})


def test_bad_settings(tiny_store, tmp_path):
    with pytest.raises(PartrainError, match="val-size"):
        fit(config(tiny_store, val_size=10_000), tmp_path, quiet=True)
    with pytest.raises(PartrainError, match="unknown model"):
        fit(config(tiny_store, model="nope"), tmp_path, quiet=True)


def test_fit_without_a_validation_split(tiny_store, tmp_path):
    """--val-size 0 (train on every training image, as airbench94 does): no NaN and no
    warning anywhere a user looks — the epoch lines, the closing line, the runs table, the plots."""
    import warnings

    from click.testing import CliRunner

    from partrain.cli import main
    runs = tmp_path / "runs"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a RuntimeWarning (all-NaN curves) fails the run
        res = CliRunner().invoke(main, ["fit", "--workers", "1", "--model-option", "num_filters=2",
                                        "--model-option", "hidden_dim=4", "--batch-size", "50",
                                        "--epochs", "2", "--val-size", "0", "--data-dir",
                                        str(tiny_store.parent), "--runs-dir", str(runs),
                                        "--name", "all"])
        assert res.exit_code == 0, res.output
        table = CliRunner().invoke(main, ["runs", str(runs)])
    assert table.exit_code == 0, table.output
    epoch_lines = [l for l in res.output.splitlines() if l.startswith("epoch 2/2:")]
    assert epoch_lines and "val acc" not in epoch_lines[0]
    done = next(l for l in res.output.splitlines() if l.startswith("done:"))
    assert "best val" not in done and "test acc" in done
    assert "nan" not in (res.output + table.output).lower()
    assert (runs / "all" / "report.html").exists()

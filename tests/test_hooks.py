"""The API's hooks and metrics.jsonl (issue 15): called in order, with history.csv's rows, as
checkpoints are written; a hook that raises stops the run resumably; a resume drops the lines
logged after its checkpoint, as history.csv does."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from partrain import api
from partrain.errors import PartrainError
from partrain.rundir import RunDir
from procs import untimed_history

SMALL = dict(model_options={"num_filters": 4, "hidden_dim": 8}, val_size=100, batch_size=50,
             workers=1, log_every=4)


def test_hooks_in_order_with_the_rows_of_history(tmp_path, tiny_store):
    calls = []
    result = api.fit(epochs=2, data_dir=tiny_store.parent, runs_dir=tmp_path, name="h",
                     on_log_row=lambda row: calls.append(("row", row["kind"], row["step"])),
                     on_epoch_end=lambda row: calls.append(("epoch", row["epoch"],
                                                            row["val_acc"])),
                     on_checkpoint=lambda path, which, meta: calls.append(
                         ("checkpoint", which, meta["epoch"], path.name, path.exists())),
                     **SMALL)
    steps, epochs = RunDir(result.run).read_history()
    per_epoch = 8  # 400 training images, batch 50
    expected = []
    best = -1.0
    for e, row in enumerate(epochs, start=1):
        expected += [("row", "step", t) for t in range((e - 1) * per_epoch + 4, e * per_epoch + 1,
                                                       4)]
        expected += [("row", "epoch", e * per_epoch), ("checkpoint", "last", e, "checkpoint.h5",
                                                       True)]
        if row["val_acc"] > best:
            best = row["val_acc"]
            expected.append(("checkpoint", "best", e, "best.h5", True))
        expected.append(("epoch", e, row["val_acc"]))
    assert calls == expected
    lines = [json.loads(x) for x in (result.run / "metrics.jsonl").read_text().splitlines()]
    rows = [{k: v for k, v in x.items() if k not in ("time", "kind")} for x in lines]
    written = _in_written_order(steps, epochs)  # history.csv keeps 7 significant digits
    assert [sorted(r) for r in rows] == [sorted(r) for r in written]
    assert all(r[k] == pytest.approx(w[k], rel=1e-6) for r, w in zip(rows, written) for k in w)
    assert [x["kind"] for x in lines] == [("epoch" if "val_acc" in w else "step") for w in written]
    assert all(isinstance(x["time"], float) for x in lines)


def _in_written_order(steps, epochs):
    out = []
    for e in epochs:
        out += [s for s in steps if e["step"] - 8 < s["step"] <= e["step"]]
        out.append(e)
    return out


def test_a_hook_that_raises_stops_the_run_resumably(tmp_path, tiny_store):
    def boom(row):
        if row["epoch"] == 1:
            raise RuntimeError("the user's hook failed")
    with pytest.raises(RuntimeError, match="the user's hook failed"):
        api.fit(epochs=2, data_dir=tiny_store.parent, runs_dir=tmp_path, name="b",
                on_epoch_end=boom, **SMALL)
    resumed = api.fit(resume=tmp_path / "b")
    assert resumed.summary["epochs_done"] == 2
    api.fit(epochs=2, data_dir=tiny_store.parent, runs_dir=tmp_path, name="w", **SMALL)
    strip = lambda rows: [{k: v for k, v in r.items() if k not in ("time", "images_per_s",  # noqa
                                                                   "time_s")} for r in rows]
    a = [json.loads(x) for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    b = [json.loads(x) for x in (tmp_path / "w" / "metrics.jsonl").read_text().splitlines()]
    assert strip(a) == strip(b)
    with pytest.raises(PartrainError, match="on_log_row must be a function"):
        api.fit(epochs=1, data_dir=tiny_store.parent, runs_dir=tmp_path, on_log_row=3, **SMALL)


def test_a_resume_drops_the_lines_after_its_checkpoint(tmp_path, tiny_store):
    """SIGINT mid-epoch: checkpoint at step s; lines of steps after s (none here, but a kill can
    leave some) are dropped, so metrics.jsonl of the resumed run is the uninterrupted one's."""
    args = [sys.executable, "-m", "partrain.cli", "fit", "--model-option", "num_filters=4",
            "--model-option", "hidden_dim=8", "--val-size", "100", "--epochs", "2",
            "--workers", "1", "--log-every", "2", "--data-dir", str(tiny_store.parent),
            "--runs-dir", str(tmp_path), "--quiet"]
    subprocess.run([*args, "--name", "whole"], check=True, capture_output=True, timeout=300)
    run = tmp_path / "cut"
    subprocess.run([*args, "--name", "cut", "--max-steps", "5"], check=True,
                   capture_output=True, timeout=300)
    with open(run / "metrics.jsonl", "a") as f:  # as if killed after logging past step 5
        f.write(json.dumps({"kind": "step", "epoch": 1, "step": 6, "loss": 9.0}) + "\n")
        f.write('{"kind": "step", "ep')  # and cut mid-line
    with open(run / "history.csv", "a") as f:  # history.csv alike (its resume kept step 6's row:
        f.write("step,1,6,9.0,0.001,1000,,,,,,\n")  # it truncated at the first resumed step)
    subprocess.run([*args, "--resume", str(run)], check=True, capture_output=True, timeout=300)
    strip = lambda p: [{k: v for k, v in json.loads(x).items()  # noqa: E731
                        if k not in ("time", "images_per_s", "time_s")}
                       for x in p.read_text().splitlines()]
    assert strip(run / "metrics.jsonl") == strip(tmp_path / "whole" / "metrics.jsonl")
    assert untimed_history(run) == untimed_history(tmp_path / "whole")

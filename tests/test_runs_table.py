"""`partrain runs`: run folders in every state, each made by a real `partrain fit` process.

- finished (a tiny fit to its end), interrupted by SIGINT (the state must be the one the run
  printed when it stopped), killed by SIGKILL mid-epoch (it resumes at its last checkpoint),
  failed (a worker SIGKILLed: the run ends with an error after its first checkpoint), running (a
  long fit, listed while it trains, then killed), plus folders a real run never makes but a disk
  or an older partrain can: a damaged config.json or checkpoint, an older run's files, a folder
  killed before its first checkpoint, and a folder that is no run at all (not listed).
- The table and --json (the same keys for every run, in one order), the sorts, one `Error:` line
  for a RUNS_DIR that is not a folder; run.lock's own rules, in this process.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import pytest

from partrain.checkpoint import load_checkpoint
from partrain.errors import PartrainError
from partrain.run_lock import LOCK, RunLock, read_lock
from partrain.runs_table import KEYS, describe_run
from procs import Proc, alive, descendants
from synthetic import make_tiny_store

TINY = ["--workers", "1", "--model-option", "num_filters=4", "--model-option", "hidden_dim=16",
        "--batch-size", "10", "--val-size", "50", "--seed", "1"]
SPE = 45  # steps per epoch: 450 training images in batches of 10


def fit_argv(store: Path, runs: Path, name: str, *extra) -> list[str]:
    return [sys.executable, "-m", "partrain.cli", "fit", *TINY, "--data-dir", str(store.parent),
            "--runs-dir", str(runs), "--name", name, *map(str, extra)]


def runs_cli(*args, cwd, rc=0) -> subprocess.CompletedProcess:
    p = subprocess.run([sys.executable, "-m", "partrain.cli", "runs", *map(str, args)], cwd=cwd,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == rc, (p.stdout, p.stderr)
    assert "Traceback" not in p.stderr
    return p


def by_name(rows: list[dict]) -> dict[str, dict]:
    return {r["name"]: r for r in rows}


def wait_until(condition, what: str, proc: Proc, timeout: float = 120.0):
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        if proc.proc.poll() is not None or time.monotonic() > deadline:
            proc.proc.kill()
            pytest.fail(f"never saw {what}: rc={proc.proc.poll()}\n{proc.err}")
        time.sleep(0.01)
    return value


def logged(run: Path, epoch: int, kind: str = "step") -> bool:
    """Whether history.csv has a row of `kind` for epoch `epoch` (1-based)."""
    try:
        text = (run / "history.csv").read_text()
    except FileNotFoundError:
        return False
    return any(line.startswith(f"{kind},{epoch},") for line in text.splitlines())


def workers_of(pid: int) -> list[int]:
    """The worker processes of a fit: what its forkserver forked."""
    for p in descendants(pid):
        try:
            with open(f"/proc/{p}/cmdline", "rb") as f:
                if b"from multiprocessing.forkserver import main" in f.read():
                    return [w for w in descendants(p) if alive(w)]
        except OSError:
            pass
    return []


def checkpoint_where(run: Path) -> str:
    _, meta = load_checkpoint(run / "checkpoint.h5")
    return f"epoch {meta['epoch'] + 1} step {meta['position']}/{SPE}"


# -------------------------------------------------------------------------- the run folders
@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A runs folder of real runs: done, sigint, failed; then copies of done, damaged or made
    older; and a folder that is not a run. Returns (cwd, runs, {name: detail})."""
    cwd = tmp_path_factory.mktemp("runs-table")
    store = make_tiny_store(cwd / "data" / "cifar10.h5")
    runs = cwd / "runs"
    detail = {}
    # Started together (the machine has two cores): each is then brought to its state.
    done = Proc(fit_argv(store, runs, "done", "--epochs", 2), cwd=cwd)
    sigint = Proc(fit_argv(store, runs, "sigint", "--epochs", 1000), cwd=cwd)
    failed = Proc(fit_argv(store, runs, "failed", "--epochs", 1000, "--workers", 2), cwd=cwd)
    wait_until(lambda: logged(runs / "sigint", 2), "a step of epoch 2", sigint)
    sigint.proc.send_signal(signal.SIGINT)
    rc, err = sigint.finish()
    assert rc == 130, err
    detail["sigint"] = re.search(r"interrupted at epoch (\d+), step (\d+/\d+)", err).groups()
    wait_until(lambda: logged(runs / "failed", 1, "epoch") and len(workers_of(failed.pid)) == 2,
               "epoch 1 and two workers", failed)
    os.kill(workers_of(failed.pid)[1], signal.SIGKILL)
    rc, err = failed.finish()
    assert rc == 1 and "died" in err, err
    detail["failed"] = err
    rc, err = done.finish()
    assert rc == 0, err
    _copies(runs)
    (runs / "compare").mkdir()  # what `partrain plot A B` leaves beside runs: no run
    (runs / "compare" / "loss.png").write_bytes(b"\x89PNG")
    (runs / "compare.html").write_text("<html></html>")
    return cwd, runs, detail


def _copies(runs: Path) -> None:
    """Folders a real run does not leave, from copies of the finished one."""
    for name in ("bad-config", "bad-checkpoint", "old", "no-summary", "unsaved"):
        shutil.copytree(runs / "done", runs / name)
    (runs / "bad-config" / "config.json").write_text('{"config": ')
    ck = runs / "bad-checkpoint" / "checkpoint.h5"
    data = bytearray(ck.read_bytes())
    data[len(data) // 2] ^= 0xFF
    ck.write_bytes(bytes(data))
    # an older partrain: fewer keys in config.json and summary.json, no best.h5
    meta = json.loads((runs / "old" / "config.json").read_text())
    for key in ("created", "parameters", "data_source"):
        meta.pop(key)
    for key in ("lookahead", "tta", "micro_batch", "freeze_after"):
        meta["config"].pop(key)
    (runs / "old" / "config.json").write_text(json.dumps(meta))
    summary = json.loads((runs / "old" / "summary.json").read_text())
    for key in ("memory", "worker_restarts", "test_time_s", "total_train_time_s"):
        summary.pop(key)
    (runs / "old" / "summary.json").write_text(json.dumps(summary))
    (runs / "old" / "best.h5").unlink()
    (runs / "no-summary" / "summary.json").unlink()  # killed in the final test pass
    for name in ("checkpoint.h5", "best.h5", "summary.json"):  # killed in its first epoch
        (runs / "unsaved" / name).unlink()


@pytest.mark.slow
def test_every_state_in_json(folder):
    cwd, runs, detail = folder
    rows = json.loads(runs_cli("--json", cwd=cwd).stdout)
    assert all(list(r) == list(KEYS) for r in rows)  # stable keys, in one order
    got = by_name(rows)
    assert set(got) == {"done", "sigint", "failed", "bad-config", "bad-checkpoint", "old",
                        "no-summary", "unsaved"}  # not compare/, not compare.html
    done = got["done"]
    summary = json.loads((runs / "done" / "summary.json").read_text())
    assert (done["status"], done["state"], done["resume"]) == ("finished", "finished", None)
    assert (done["epochs_done"], done["epochs"], done["workers"]) == (2, 2, 1)
    assert done["test_acc"] == summary["test_acc"] and done["model"] == "three-layer"
    assert done["best_val_acc"] == summary["best_val_acc"]
    assert done["images_per_s"] == summary["images_per_s"]
    assert done["train_time_s"] == summary["total_train_time_s"]
    epoch, step = detail["sigint"]  # what the run printed when it stopped
    sigint = got["sigint"]
    assert sigint["status"] == "interrupted" and sigint["reason"] is None
    assert sigint["state"] == f"interrupted at epoch {epoch} step {step}"
    assert sigint["resume"] == "partrain fit --resume runs/sigint"  # as listed: runs/ here
    failed = got["failed"]
    assert failed["status"] == "failed" and "died" in failed["reason"], failed
    assert failed["reason"].split(";")[0] in detail["failed"]  # the run's own error line
    assert f"it resumes at {checkpoint_where(runs / 'failed')}" in failed["reason"]
    assert failed["resume"] == "partrain fit --resume runs/failed"
    assert got["bad-config"]["status"] == "unreadable"
    assert "config.json is corrupt" in got["bad-config"]["reason"]
    assert got["bad-checkpoint"]["status"] == "unreadable"
    assert "checkpoint.h5 is damaged" in got["bad-checkpoint"]["reason"]
    old = got["old"]
    assert (old["status"], old["test_acc"]) == ("finished", done["test_acc"])
    elapsed = load_checkpoint(runs / "old" / "checkpoint.h5")[1]["elapsed_s"]
    assert old["train_time_s"] == elapsed  # no total in summary.json: the checkpoint's
    assert old["created"] is None
    assert got["no-summary"]["status"] == "finished" and got["no-summary"]["test_acc"] is None
    assert "partrain evaluate" in got["no-summary"]["reason"]
    unsaved = got["unsaved"]
    assert unsaved["status"] == "failed" and unsaved["resume"] is None
    assert "before its first checkpoint" in unsaved["reason"]


@pytest.mark.slow
def test_the_table_and_its_sorts(folder):
    cwd, runs, detail = folder
    lines = runs_cli(cwd=cwd).stdout.splitlines()
    assert lines[0].split()[:3] == ["name", "model/recipe", "status"]
    rows = {line.split()[0]: line for line in lines[1:]}
    assert len(rows) == 8 and len(lines) == 9
    epoch, step = detail["sigint"]
    assert f"interrupted at epoch {epoch} step {step}" in rows["sigint"]
    assert rows["sigint"].endswith("partrain fit --resume runs/sigint")
    assert re.search(r"three-layer\s+finished\s+2/2\s+\d+\.\d%\s+\d+\.\d%", rows["done"])
    assert "unreadable" in rows["bad-config"] and "corrupt" in rows["bad-config"]
    assert rows["failed"].endswith("partrain fit --resume runs/failed")
    # --sort name; the default sorts by start time (oldest first); best: highest first
    names = [line.split()[0] for line in runs_cli("--sort", "name", cwd=cwd).stdout.splitlines()]
    assert names[1:] == sorted(names[1:])
    rows = json.loads(runs_cli("--json", cwd=cwd).stdout)
    started = [r["created"] or datetime.fromtimestamp((cwd / r["path"]).stat().st_mtime)
               .isoformat(timespec="seconds") for r in rows]  # no config.json time: the folder's
    assert started == sorted(started)
    best = [r["best_val_acc"] for r in json.loads(runs_cli("--json", "--sort", "best",
                                                           cwd=cwd).stdout)]
    known = [b for b in best if b is not None]
    assert known == sorted(known, reverse=True) and best[:len(known)] == known
    one = json.loads(runs_cli(runs / "done", "--json", cwd=cwd).stdout)  # a run folder itself
    assert [r["name"] for r in one] == ["done"]


def test_bad_runs_dir_is_one_line(tmp_path):
    p = runs_cli(tmp_path / "nope", cwd=tmp_path, rc=1)
    assert p.stderr.startswith("Error: ") and "does not exist" in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1
    (tmp_path / "empty").mkdir()
    assert runs_cli(tmp_path / "empty", cwd=tmp_path).stdout == f"no runs in {tmp_path / 'empty'}\n"
    assert runs_cli(tmp_path / "empty", "--json", cwd=tmp_path).stdout.strip() == "[]"
    p = runs_cli("--sort", "speed", cwd=tmp_path, rc=2)
    assert "Invalid value for '--sort'" in p.stderr


# ------------------------------------------------------------------------------- running
@pytest.mark.slow
def test_a_running_run_then_killed_mid_epoch(tmp_path):
    store = make_tiny_store(tmp_path / "data" / "cifar10.h5")
    run = tmp_path / "runs" / "live"
    fit = Proc(fit_argv(store, tmp_path / "runs", "live", "--epochs", 1000), cwd=tmp_path)
    try:
        wait_until(lambda: (run / LOCK).exists() and logged(run, 1), "run.lock and a step", fit)
        row = by_name(json.loads(runs_cli(tmp_path / "runs", "--json", cwd=tmp_path).stdout))["live"]
        assert (row["status"], row["pid"], row["resume"]) == ("running", fit.pid, None)
        assert row["state"].startswith("running: epoch ") and "/1000 step " in row["state"]
        assert f"pid {fit.pid} on " in row["reason"]
        table = runs_cli(tmp_path / "runs", cwd=tmp_path).stdout
        assert re.search(r"live\s+three-layer\s+running: epoch \d+/1000 step \d+/45", table)
        # a second fit on it is refused: it would write the same files
        again = subprocess.run([sys.executable, "-m", "partrain.cli", "fit", "--resume", str(run)],
                               capture_output=True, text=True, timeout=120, cwd=tmp_path)
        assert again.returncode == 1 and f"is being trained by another process (pid {fit.pid}" \
            in again.stderr, again.stderr
        # then killed mid-epoch, after its first checkpoint
        wait_until(lambda: logged(run, 2), "a step of epoch 2", fit)
        os.killpg(fit.pid, signal.SIGKILL)
        fit.finish()
    finally:
        fit.proc.kill()
    assert read_lock(run).state == "left" and read_lock(run).killed  # stale: no process holds it
    row = by_name(json.loads(runs_cli(tmp_path / "runs", "--json", cwd=tmp_path).stdout))["live"]
    assert row["status"] == "interrupted" and row["pid"] is None
    assert row["state"] == f"interrupted at {checkpoint_where(run)}"
    assert "killed" in row["reason"] and row["resume"] == f"partrain fit --resume {run}"
    resumed = subprocess.run([*fit_argv(store, tmp_path / "runs", "x")[:3], "fit", "--resume",
                              str(run), "--max-steps", "3", "--quiet"],
                             capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr  # the lock it left is no obstacle
    assert not (run / LOCK).exists()
    assert describe_run(run)["reason"] == "stopped by --max-steps"


# ------------------------------------------------------------------------ run.lock itself
def test_lock_held_released_and_failure_recorded(tmp_path):
    run = tmp_path / "r"
    run.mkdir()
    assert read_lock(run).state == "absent"
    lock = RunLock.take(run, ranks=2)
    state = read_lock(run)
    assert state.state == "running" and state.info["pid"] == os.getpid()
    assert state.info["ranks"] == 2
    with pytest.raises(PartrainError, match=f"being trained by another process \\(pid {os.getpid()}"):
        RunLock.take(run)
    lock.release()
    assert read_lock(run).state == "absent" and not (run / LOCK).exists()
    # an error before the folder changed leaves it as it was: no file, or the last record
    RunLock.take(run).release(PartrainError("data file differs"))
    assert not (run / LOCK).exists()
    # an error after a checkpoint was written: recorded, not running
    lock = RunLock.take(run)
    (run / "checkpoint.h5").write_bytes(b"new")
    lock.release(PartrainError("worker 1 died"))
    state = read_lock(run)
    assert state.state == "left" and state.failed and state.info["error"] == "worker 1 died"
    before = (run / LOCK).read_bytes()
    RunLock.take(run).release(PartrainError("data file differs"))  # changed nothing
    assert (run / LOCK).read_bytes() == before
    # a stop by a signal is no failure: the checkpoint tells where it is
    lock = RunLock.take(run)
    (run / "checkpoint.h5").write_bytes(b"newer")
    lock.release(KeyboardInterrupt())
    assert read_lock(run).state == "absent"

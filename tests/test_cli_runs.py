"""The training experience end to end, through real `partrain` processes.

- Ctrl-C (SIGINT) mid-run, then `fit --resume`: exit code 130 and the "continue with" hint, then
  checkpoints bit-identical to the same run uninterrupted (history rows too, except timings).
- What a user sees: plain lines when the output is not a terminal, a tqdm bar when it is, only
  the summary with --quiet.
- Bad input to fit --resume / evaluate / predict / plot: one `Error:` line on stderr, exit 1, no
  traceback, and every file of the run folder and the data folder left exactly as it was.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from partrain.checkpoint import load_checkpoint
from partrain.config import TrainConfig
from partrain.progress import Progress
from partrain.train import fit
from synthetic import make_tiny_store

TINY = ["--workers", "1", "--model-option", "num_filters=4", "--model-option", "hidden_dim=16",
        "--batch-size", "10", "--val-size", "50", "--seed", "1"]


def cli(*args, cwd, check_rc=None, **kw):
    """Run `python -m partrain.cli ARGS` in `cwd`; returns the CompletedProcess (text)."""
    p = subprocess.run([sys.executable, "-m", "partrain.cli", *map(str, args)], cwd=cwd,
                       capture_output=True, text=True, timeout=120, **kw)
    if check_rc is not None:
        assert p.returncode == check_rc, (p.returncode, p.stdout, p.stderr)
    return p


def snapshot(*folders) -> dict:
    """{path: (size, mtime_ns, sha256)} of every file under the folders."""
    out = {}
    for folder in folders:
        for f in sorted(Path(folder).rglob("*")):
            if f.is_file():
                st = f.stat()
                out[str(f)] = (st.st_size, st.st_mtime_ns, hashlib.sha256(f.read_bytes()).hexdigest())
    return out


def history_rows(run: Path) -> list[dict]:
    """history.csv rows without the timing columns (which differ between runs by nature)."""
    with open(run / "history.csv", newline="") as f:
        return [{k: v for k, v in r.items() if k not in ("images_per_s", "time_s")}
                for r in csv.DictReader(f)]


# ------------------------------------------------------------------------------ Ctrl-C + resume
@pytest.mark.slow
def test_ctrl_c_during_the_final_test_pass_stops_at_once(tmp_path):
    """After the last checkpoint there is no step boundary to wait for: the first Ctrl-C ends the
    test pass at once (exit 130), or skips it if it came just before, and says where the trained
    parameters are."""
    store = make_tiny_store(tmp_path / "data" / "cifar10.h5", n_train=200, n_test=20000)
    proc = subprocess.Popen([sys.executable, "-m", "partrain.cli", "fit", "--workers", "1",
                             "--epochs", "1", "--val-size", "50", "--tta", "flip_translate",
                             "--data-dir", str(store.parent), "--runs-dir", str(tmp_path / "runs"),
                             "--name", "r"], cwd=tmp_path, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    try:
        for line in proc.stdout:  # the epoch line comes just before the test pass starts
            if line.startswith("epoch 1/1:"):
                break
        time.sleep(1.0)  # mostly lands in the pass; just before it is handled (and asserted) too
        proc.send_signal(signal.SIGINT)
        t0 = time.monotonic()
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    # 20 000 test images x 5 views take far longer than this on 2 cores, even idle; the margin
    # is for a loaded machine, where the handler runs between two numpy calls of the pass.
    assert time.monotonic() - t0 < 20, (out, err)
    assert proc.returncode == 130, (out, err)
    assert ("interrupted during the final test pass" in err
            or "interrupted after the last epoch, before the test pass" in err), err
    assert "checkpoint.h5 holds the trained parameters; partrain evaluate" in err
    assert "Traceback" not in err and "done:" not in out
    assert (tmp_path / "runs" / "r" / "checkpoint.h5").exists()



@pytest.mark.slow
def test_sigint_then_resume_is_bit_identical_to_uninterrupted(tmp_path):
    store = make_tiny_store(tmp_path / "data" / "cifar10.h5")
    common = [*TINY, "--epochs", "8", "--log-every", "3", "--data-dir", store.parent,
              "--runs-dir", tmp_path / "runs"]
    # The uninterrupted run goes alongside (two cores); --quiet: it prints only the summary.
    ref = subprocess.Popen([sys.executable, "-m", "partrain.cli", "fit", *map(str, common),
                            "--name", "ref", "--quiet"], cwd=tmp_path, text=True,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    cut = subprocess.Popen([sys.executable, "-m", "partrain.cli", "fit", *map(str, common),
                            "--name", "cut"], cwd=tmp_path, text=True,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    history = tmp_path / "runs" / "cut" / "history.csv"
    deadline = time.monotonic() + 60
    while not (history.exists() and "\nstep," in history.read_text()):
        assert cut.poll() is None and time.monotonic() < deadline, cut.communicate()
        time.sleep(0.005)
    cut.send_signal(signal.SIGINT)  # a few steps are done: the handler is installed
    out, err = cut.communicate(timeout=60)
    assert cut.returncode == 130, (out, err)
    assert "continue with: partrain fit --resume" in err and "Traceback" not in err
    _, meta = load_checkpoint(tmp_path / "runs" / "cut" / "checkpoint.h5")
    assert 0 < meta["t"] < 8 * 45, meta  # stopped mid-run, at a step boundary
    assert "\r" not in out  # not a terminal: plain lines only, no bar

    resumed = cli("fit", "--resume", tmp_path / "runs" / "cut", cwd=tmp_path, check_rc=0)
    assert "resuming" in resumed.stdout and "done: 8 epochs" in resumed.stdout
    assert "epoch 8/8:" in resumed.stdout and "\r" not in resumed.stdout + resumed.stderr

    ref_out, ref_err = ref.communicate(timeout=120)
    assert ref.returncode == 0, (ref_out, ref_err)
    assert ref_err == "" and len(ref_out.splitlines()) == 1 and "test_acc=" in ref_out

    for name in ("checkpoint.h5", "best.h5"):
        a, ma = load_checkpoint(tmp_path / "runs" / "ref" / name)
        b, mb = load_checkpoint(tmp_path / "runs" / "cut" / name)
        assert a.keys() == b.keys() and {"params", "state", "opt.m", "opt.v"} <= set(a)
        for k in a:
            assert a[k].dtype == b[k].dtype and a[k].tobytes() == b[k].tobytes(), (name, k)
        assert (ma["epoch"], ma["position"], ma["t"]) == (mb["epoch"], mb["position"], mb["t"])
    assert history_rows(tmp_path / "runs" / "ref") == history_rows(tmp_path / "runs" / "cut")
    s_ref = json.loads((tmp_path / "runs" / "ref" / "summary.json").read_text())
    s_cut = json.loads((tmp_path / "runs" / "cut" / "summary.json").read_text())
    assert s_ref["test_acc"] == s_cut["test_acc"] and s_ref["best_val_acc"] == s_cut["best_val_acc"]


# --------------------------------------------------------------------------------- progress

def test_progress_bar_on_a_terminal(capsys):
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    term = Terminal()
    p = Progress(quiet=False, stream=term)
    p.start_epoch(0, 3, total=100, done=0)
    for pos in range(10, 60, 10):
        p.update(pos, loss=1.2345, acc=0.4321, ips=1234.0)
    p.bar.refresh()  # tqdm redraws at most every 0.1 s; this loop took less
    p.line("a summary line")
    p.end_epoch()
    bar = term.getvalue()
    assert "epoch 1/3" in bar and "50/100" in bar and "<" in bar  # steps and elapsed<ETA
    assert "loss 1.234" in bar and "acc 43.2%" in bar and "1,234 img/s" in bar
    assert "a summary line" in capsys.readouterr().out


def test_progress_plain_lines_and_quiet(capsys):
    p = Progress(quiet=False, stream=io.StringIO(), plain_every=0)
    p.start_epoch(1, 3, total=100, done=40)  # resumed at step 40 of epoch 2
    for pos in range(45, 101, 5):
        p.update(pos, loss=0.5, acc=0.75, ips=900.0)
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert 4 <= len(lines) <= 6 and "\r" not in out  # about every tenth of an epoch
    assert lines[0].startswith("epoch 2/3 step 50/100: loss 0.5000  acc 75.0%  900 img/s  ETA")
    assert not any("step 100/100" in line for line in lines)  # the epoch summary says that

    q = Progress(quiet=True, stream=io.StringIO())
    q.start_epoch(0, 1, total=10, done=0)
    q.update(5, 1.0, 0.5, 100.0)
    q.line("hidden")
    q.end_epoch()
    assert capsys.readouterr() == ("", "")


# ------------------------------------------------------------------------------ bad input

@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A finished tiny run (in-process, fast) and its store; tests copy it before changing it."""
    root = tmp_path_factory.mktemp("trained")
    store = make_tiny_store(root / "data" / "cifar10.h5")
    run = root / "runs" / "tiny"
    run.mkdir(parents=True)
    fit(TrainConfig(model_options={"num_filters": 4, "hidden_dim": 16}, batch_size=25, epochs=2,
                    val_size=50, data=str(store), log_every=3), run, quiet=True)
    return run, store


@pytest.fixture
def work(trained, tmp_path):
    """A private copy of the trained run: (run folder, data folder, cwd)."""
    run, store = trained
    copy = tmp_path / "runs" / "tiny"
    shutil.copytree(run, copy)
    return copy, store.parent, tmp_path


def _set_version(run: Path, version: str) -> None:
    meta = json.loads((run / "config.json").read_text())
    meta["partrain_version"] = version
    (run / "config.json").write_text(json.dumps(meta))


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _not_an_image(run: Path) -> list:
    bad = run.parent.parent / "photo.png"
    bad.write_text("this is text, not a PNG\n")
    return ["predict", run, bad]


BAD = {
    # name: (prepare the run folder -> args, words the error line must contain)
    "resume-missing-run": (lambda run: ["fit", "--resume", run.parent / "nope"], "does not exist"),
    "evaluate-missing-run": (lambda run: ["evaluate", run.parent / "nope"], "does not exist"),
    "predict-missing-run": (lambda run: ["predict", run.parent / "nope", "--test-index", "0"],
                            "does not exist"),
    "plot-missing-run": (lambda run: ["plot", run.parent / "nope"], "does not exist"),
    "resume-new-version": (lambda run: _set_version(run, "9.0.0") or ["fit", "--resume", run],
                           "partrain 9.0.0"),
    "evaluate-new-version": (lambda run: _set_version(run, "9.0.0") or ["evaluate", run],
                             "partrain 9.0.0"),
    "plot-new-version": (lambda run: _set_version(run, "9.0.0") or ["plot", run],
                         "partrain 9.0.0"),
    "evaluate-truncated-best": (lambda run: _truncate(run / "best.h5") or ["evaluate", run],
                                "truncated"),
    "resume-truncated-checkpoint": (
        lambda run: _truncate(run / "checkpoint.h5") or ["fit", "--resume", run, "--epochs", "3"],
        "truncated"),
    "predict-not-an-image": (_not_an_image, "not an image"),
    "predict-index-out-of-range": (lambda run: ["predict", run, "--test-index", "0", "100"],
                                   "out of range"),
    "resume-changed-lr": (lambda run: ["fit", "--resume", run, "--lr", "0.01"],
                          "lr (0.001 -> 0.01)"),
    "resume-finished-run": (lambda run: ["fit", "--resume", run], "already finished"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_one_line_and_changes_nothing(work, case):
    run, data_dir, cwd = work
    prepare, words = BAD[case]
    args = prepare(run)
    before = snapshot(run, data_dir)
    p = cli(*args, cwd=cwd)
    assert p.returncode == 1, (p.returncode, p.stdout, p.stderr)
    assert "Traceback" not in p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), p.stderr
    assert words in lines[0], lines[0]
    assert snapshot(run, data_dir) == before

"""Faults as a user meets them, each in a real `partrain fit` process (issue 11's defects D1-D4,
D6, D7, D11-D13): a killed or stopped forkserver or worker, SIGTERM, a SIGKILL of the whole
process group, a signal during the imports, a read-only or full /dev/shm, a huge loss.

Each test checks the exit code, the one line, that no process is left, and what stays in /dev/shm
and in the temp folder (TMPDIR points into the test's own folder, so that is observable).
Waits are for conditions; the time bounds (20-30 s) are far above what each reaction takes on a
loaded machine and far below "never".
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from procs import Proc, alive, assert_quiet, descendants, group, shm_leftovers

pytestmark = pytest.mark.slow


def fit_argv(store: Path, runs: Path, name: str = "r", *extra) -> list[str]:
    return [sys.executable, "-m", "partrain", "fit", "--model", "linear", "--epochs", "50",
            "--val-size", "50", "--batch-size", "20", "--workers", "2",
            "--data-dir", str(store.parent), "--runs-dir", str(runs), "--name", name,
            *map(str, extra)]


@pytest.fixture(autouse=True)
def own_tmp(tmp_path):
    """A temp folder of the test's own (short: the forkserver's socket lives in it, and AF_UNIX
    paths are limited to ~107 bytes; see scratch.base_dir)."""
    tmp = Path(tempfile.mkdtemp(prefix="pt-", dir="/tmp"))
    (tmp_path / "tmp").symlink_to(tmp)
    yield tmp
    shutil.rmtree(tmp, ignore_errors=True)


def env_with_tmp(tmp_path: Path) -> dict:
    return {**os.environ, "TMPDIR": str((tmp_path / "tmp").resolve()), "PYTHONFAULTHANDLER": "1"}


def temp_entries(tmp_path: Path) -> list[str]:
    return sorted(os.listdir((tmp_path / "tmp").resolve()))


def wait_until(condition, what: str, proc: Proc, timeout: float = 120.0):
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if proc.proc.poll() is not None or time.monotonic() > deadline:
            proc.proc.kill()
            pytest.fail(f"never saw {what}: rc={proc.proc.poll()}\n{proc.finish()[1]}")
        time.sleep(0.002)


def forkserver_of(pid: int) -> int | None:
    """The forkserver among pid's descendants, by its own command line (`-c 'from
    multiprocessing.forkserver import main; ...'`). Not any command line with "forkserver" in
    it: these tests' folders are named after them, and a child forked but not yet exec'd still
    shows the parent's arguments; stopping that one hung the parent inside vfork."""
    for p in descendants(pid):
        try:
            with open(f"/proc/{p}/cmdline", "rb") as f:
                if b"from multiprocessing.forkserver import main" in f.read():
                    return p
        except OSError:
            pass
    return None


def workers_of(pid: int) -> list[int]:
    fs = forkserver_of(pid)
    return [] if fs is None else [p for p in descendants(fs) if alive(p)]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """4 000 training images: an epoch of the small CNN below takes a few seconds, so a fault
    sent when both workers are up lands in the first epoch."""
    from synthetic import make_tiny_store
    return make_tiny_store(tmp_path_factory.mktemp("faults") / "cifar10.h5", 4000, 200)


CNN = ("--model", "three-layer", "--model-option", "num_filters=8", "--model-option",
       "hidden_dim=32", "--batch-size", "50")


def started(tmp_path, store, *extra) -> Proc:
    """A fit of the small CNN with both workers up (training, or about to)."""
    fit = Proc(fit_argv(store, tmp_path / "runs", "r", *CNN, *extra), cwd=tmp_path,
               env=env_with_tmp(tmp_path))
    wait_until(lambda: len(workers_of(fit.pid)) == 2, "two workers", fit)
    return fit


# -------------------------------------------------------------------------- start-up (D1, D4)
def _fault_the_forkserver(tmp_path, store, sig, attempts: int = 10):
    """Send `sig` to the forkserver as soon as it exists. When that lands after both workers
    were forked, the run is unaffected and must end normally (rc 0, clean); the test retries
    until one lands in the start-up, and returns that run's (rc, stderr, seconds to exit)."""
    for attempt in range(attempts):
        runs = tmp_path / f"runs{attempt}"
        fit = Proc(fit_argv(store, runs), cwd=tmp_path, env=env_with_tmp(tmp_path))
        fs = wait_until(lambda: forkserver_of(fit.pid), "the forkserver", fit)
        os.kill(fs, sig)
        t0 = time.monotonic()
        rc, err = fit.finish(120)
        seconds = time.monotonic() - t0
        fit.assert_clean()
        assert_quiet(err)
        if rc == 0:
            continue
        assert not (runs / "r").exists()  # D6: no dead-end folder
        return rc, err, seconds
    pytest.skip(f"the signal never landed in the start-up in {attempts} attempts")


def test_killed_forkserver_at_start_is_one_line(tmp_path, tiny_store):
    rc, err, _ = _fault_the_forkserver(tmp_path, tiny_store, signal.SIGKILL)
    assert rc == 1, err
    lines = [x for x in err.splitlines() if x.startswith("Error:")]
    assert lines and ("could not be started" in lines[0] or "died" in lines[0]), err


def test_stopped_forkserver_at_start_ends_the_run(tmp_path, tiny_store):
    rc, err, seconds = _fault_the_forkserver(tmp_path, tiny_store, signal.SIGSTOP)
    assert rc == 1, err
    assert "Error: worker" in err and "stopped" in err, err
    assert seconds < 30.0  # pool.STOPPED_S, then clean-up


def test_stopped_worker_ends_the_run_in_seconds(tmp_path, store):
    fit = started(tmp_path, store)
    victim = workers_of(fit.pid)[1]
    os.kill(victim, signal.SIGSTOP)
    t0 = time.monotonic()
    rc, err = fit.finish(120)
    assert rc == 1, err
    assert f"(pid {victim}) has been stopped (SIGSTOP or Ctrl-Z)" in err
    assert time.monotonic() - t0 < 30.0
    assert_quiet(err)
    fit.assert_clean()


# ------------------------------------------------------------------------------ SIGTERM (D7)
def test_sigterm_saves_a_checkpoint_then_resume_continues_there(tmp_path, store):
    fit = started(tmp_path, store, "--epochs", 2)
    wait_until(lambda: (tmp_path / "runs" / "r" / "history.csv").exists(), "a step", fit)
    os.kill(fit.pid, signal.SIGTERM)  # what `timeout`, docker stop, systemd and Slurm send
    rc, err = fit.finish()
    assert rc == 143, err
    assert "stopping after this step" in err and "checkpoint saved" in err, err
    assert_quiet(err)
    fit.assert_clean()
    run = tmp_path / "runs" / "r"
    from partrain.checkpoint import load_checkpoint
    _, meta = load_checkpoint(run / "checkpoint.h5")
    assert meta["t"] > 0
    resumed = subprocess.run([sys.executable, "-m", "partrain", "fit", "--resume", str(run)],
                             capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert f"step {meta['position']}/" in resumed.stdout + resumed.stderr


# ------------------------------------------------------------------ SIGKILL of the group (D3)
def test_group_sigkill_leaves_blocks_that_the_next_run_removes(tmp_path, store, tiny_store):
    fit = started(tmp_path, store)
    blocks = shm_leftovers(fit.pid)
    assert blocks
    os.killpg(fit.pid, signal.SIGKILL)  # the resource tracker dies too: nobody unlinks
    fit.finish()
    deadline = time.monotonic() + 20
    while group(fit.pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not group(fit.pid)
    assert shm_leftovers(fit.pid) == blocks  # the leak this test is about
    assert not [n for n in temp_entries(tmp_path) if n.startswith("pymp-")]  # D13
    again = subprocess.run(fit_argv(tiny_store, tmp_path / "runs", "again", "--epochs", 1),
                           capture_output=True, text=True, timeout=300, cwd=tmp_path,
                           env=env_with_tmp(tmp_path))
    assert again.returncode == 0, again.stderr
    assert shm_leftovers(fit.pid) == []
    assert "shared-memory block(s)" in again.stderr and "left in /dev/shm by a killed run" \
        in again.stderr
    assert temp_entries(tmp_path) == []  # the killed run's private folder went too


def test_sweep_leaves_the_blocks_of_a_live_run_alone(tmp_path, store):
    fit = started(tmp_path, store)
    try:
        blocks = shm_leftovers(fit.pid)
        from partrain.parallel import scratch
        assert scratch.sweep_blocks() == (0, 0)
        assert shm_leftovers(fit.pid) == blocks
    finally:
        os.killpg(fit.pid, signal.SIGINT)
        fit.finish()
    fit.assert_clean()


# --------------------------------------------------------------------- Ctrl-C by phase (D12)
# A non-interactive shell starts background jobs with SIGINT ignored, and Python keeps it so;
# a terminal does not. The scripts restore Python's own handler first, as in a terminal.
IMPORT_THEN_SIGNAL = """
import builtins, os, signal, sys
signal.signal(signal.SIGINT, signal.default_int_handler)
from partrain.entry import main
real, sig = builtins.__import__, int(sys.argv[1])
def hook(name, *args, **kwargs):
    if name == "numpy":
        builtins.__import__ = real
        os.kill(os.getpid(), sig)
    return real(name, *args, **kwargs)
builtins.__import__ = hook
sys.argv = ["partrain", "--version"]
sys.exit(main())
"""


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_during_the_imports_is_one_line(tmp_path, sig, code):
    """The signal lands while the CLI imports numpy (the first ~0.15 s of every command)."""
    out = subprocess.run([sys.executable, "-c", IMPORT_THEN_SIGNAL, str(int(sig))],
                         capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert out.returncode == code, out.stderr
    assert out.stderr.strip().startswith("interrupted") and "Traceback" not in out.stderr


def test_importing_partrain_leaves_ctrl_c_alone():
    """Only the forkserver may ignore SIGINT (parallel/calm.py); the parent imported it once,
    and then a Ctrl-C before the training loop was silently ignored."""
    code = ("import signal, partrain.cli, partrain.parallel.pool, partrain.parallel.mpi\n"
            "assert signal.getsignal(signal.SIGINT) is signal.default_int_handler\n")
    # SIGINT at its default in the child even when this suite runs as a background job (`&` in
    # a script starts it ignored, and Python then keeps it ignored: found running .ci/run so).
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    assert out.returncode == 0, out.stderr


def test_ctrl_c_while_reading_the_store_is_one_line_and_130(tmp_path, tiny_store):
    """Before the training loop's handlers: not click's 'Aborted!' and exit 1."""
    code = ("import os, signal, sys\n"
            "signal.signal(signal.SIGINT, signal.default_int_handler)\n"
            "from partrain.datasets import store\n"
            "real = store.load_store\n"
            "def load(*a, **k):\n"
            "    os.kill(os.getpid(), signal.SIGINT)\n"
            "    return real(*a, **k)\n"
            "store.load_store = load\n"
            "import partrain.train as t; t.load_store = load\n"
            "from partrain.entry import main\n"
            f"sys.argv = {['partrain'] + fit_argv(tiny_store, tmp_path / 'runs')[3:]!r}\n"
            "sys.exit(main())\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, cwd=tmp_path)
    assert out.returncode == 130, out.stderr
    assert "interrupted" in out.stderr and "Aborted!" not in out.stderr
    assert "Traceback" not in out.stderr
    assert not (tmp_path / "runs" / "r").exists()


# A Ctrl-C that lands while Python runs a finaliser (`__del__`: matplotlib makes and drops many
# while report.html is drawn) cannot propagate: Python printed "Exception ignored in ...
# KeyboardInterrupt" and the command went on to exit 0 (scripts/faults.py caught it in CI). The
# scripts below drop an object whose __del__ sends the signal and waits for its handler there.
LOST_IN_A_FINALISER = """
import os, signal, sys, time
signal.signal(signal.SIGINT, signal.default_int_handler)
class Finaliser:
    def __del__(self):
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(1)  # the handler runs in here; its KeyboardInterrupt cannot leave __del__
def dropping(real):
    def call(*args, **kwargs):
        Finaliser()
        return real(*args, **kwargs)
    return call
import {module} as where
where.{name} = dropping(where.{name})
from partrain.entry import main
sys.argv = {argv!r}
sys.exit(main())
"""


def _lost_ctrl_c(tmp_path, module: str, name: str, argv: list[str]):
    code = LOST_IN_A_FINALISER.format(module=module, name=name, argv=argv)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300, cwd=tmp_path)


@pytest.mark.parametrize("module, name, line", [
    ("partrain.report", "write_report",
     "interrupted while drawing report.html; the run is finished and saved"),
    ("partrain.session", "Session.test", "interrupted during the final test pass;")])
def test_ctrl_c_lost_in_a_finaliser_after_training_is_one_line(tmp_path, tiny_store, module,
                                                               name, line):
    argv = fit_argv(tiny_store, tmp_path / "runs")[2:]  # ["partrain", "fit", ...]
    argv[argv.index("--epochs") + 1] = "1"
    out = _lost_ctrl_c(tmp_path, module, name, argv)
    assert out.returncode == 130, out.stderr
    assert "Exception ignored" not in out.stderr and "Traceback" not in out.stderr, out.stderr
    assert out.stderr.strip().splitlines()[-1].startswith(line), out.stderr
    run = tmp_path / "runs" / "r"
    assert (run / "checkpoint.h5").exists()
    assert not (run / "run.lock").exists()


def test_ctrl_c_lost_in_a_finaliser_in_any_command_is_130(tmp_path):
    (tmp_path / "runs").mkdir()
    out = _lost_ctrl_c(tmp_path, "partrain.cli_runs", "list_runs",
                       ["partrain", "runs", str(tmp_path / "runs")])
    assert out.returncode == 130, out.stderr
    assert out.stderr.strip() == "interrupted", out.stderr


# ----------------------------------------------------------------------- /dev/shm (D2)
def _in_private_shm(mount_opts: str, argv: list[str], cwd) -> subprocess.CompletedProcess:
    if not _namespaces():
        pytest.skip("no private mount namespace (unshare -m) here")
    script = f'mount -t tmpfs -o {mount_opts} tmpfs /dev/shm && exec "$@"'
    return subprocess.run(["unshare", "-m", "sh", "-c", script, "sh", *argv],
                          capture_output=True, text=True, timeout=300, cwd=cwd)


def _namespaces() -> bool:
    probe = subprocess.run(["unshare", "-m", "sh", "-c", "mount -t tmpfs tmpfs /dev/shm"],
                           capture_output=True)
    return probe.returncode == 0


@pytest.mark.parametrize("opts", ["ro", "nr_inodes=5", "size=1m"])
def test_unusable_dev_shm_is_one_line_and_no_run_folder(tmp_path, tiny_store, opts):
    out = _in_private_shm(opts, fit_argv(tiny_store, tmp_path / "runs"), tmp_path)
    assert out.returncode == 1, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and "/dev/shm" in lines[0], lines
    assert not (tmp_path / "runs" / "r").exists()  # D6


# ------------------------------------------------------------------------ run folders (D6)
def test_worker_killed_in_the_first_epoch_leaves_no_dead_end_folder(tmp_path, store, tiny_store):
    fit = started(tmp_path, store)
    os.kill(workers_of(fit.pid)[0], signal.SIGKILL)
    rc, err = fit.finish()
    assert rc == 1 and "died (killed by signal 9 (SIGKILL))" in err, err
    fit.assert_clean()
    folder = tmp_path / "runs" / "r"
    assert not folder.exists(), sorted(os.listdir(folder))
    again = subprocess.run(fit_argv(tiny_store, tmp_path / "runs", "r", "--epochs", 1),
                           capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert again.returncode == 0, again.stderr  # the same --name works again


# ----------------------------------------------------------------------- assorted (D13)
def test_a_diverging_loss_is_one_line_without_numpy_warnings(tmp_path, tiny_store):
    out = subprocess.run(fit_argv(tiny_store, tmp_path / "runs", "r", "--optimizer", "sgd",
                                  "--lr", "1e38", "--epochs", 1),
                         capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert out.returncode == 1, out.stderr
    assert out.stderr.strip().splitlines() == [
        line for line in out.stderr.strip().splitlines() if line.startswith("Error: loss")]
    assert "RuntimeWarning" not in out.stderr


def test_folder_left_by_a_parent_killed_before_its_first_checkpoint_is_reused(tmp_path, store):
    fit = started(tmp_path, store)
    os.kill(fit.pid, signal.SIGKILL)  # nothing of partrain runs after this: config.json stays
    fit.finish()
    run = tmp_path / "runs" / "r"
    assert (run / "config.json").exists() and not (run / "checkpoint.h5").exists()
    resumed = subprocess.run([sys.executable, "-m", "partrain", "fit", "--resume", str(run)],
                             capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert resumed.returncode == 1
    assert "start it again with the same --name" in resumed.stderr
    again = subprocess.run(fit_argv(store, tmp_path / "runs", "r", *CNN, "--epochs", 1),
                           capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert "note: reusing run folder" in again.stderr
    assert (run / "checkpoint.h5").exists()


# ------------------------------------------------------- surviving a lost worker (issue 13)
def _arrays_bytes(path) -> bytes:
    from partrain.checkpoint import load_checkpoint
    arrays, _ = load_checkpoint(path)
    return b"".join(arrays[k].tobytes() for k in sorted(arrays))


@pytest.mark.parametrize("micro", [None, 10])
def test_worker_killed_mid_epoch_with_restart_ends_with_the_undisturbed_bits(tmp_path, store,
                                                                               micro):
    """--on-worker-failure restart: the run goes on with fresh workers, says so, and its
    checkpoints (parameters, optimizer state, BN state) and history are those of a run nobody
    disturbed (with and without micro-batches)."""
    import json
    from procs import untimed_history
    extra = ["--epochs", 2, "--log-every", 5, "--on-worker-failure", "restart"]
    extra += ["--micro-batch", micro] if micro else []
    fit = started(tmp_path, store, *extra)
    history = tmp_path / "runs" / "r" / "history.csv"
    wait_until(lambda: history.exists() and len(history.read_text().splitlines()) > 2,
               "two history rows", fit)
    os.kill(workers_of(fit.pid)[1], signal.SIGKILL)
    rc, err = fit.finish(300)
    assert rc == 0, err
    assert "warning: worker 1 died (killed by signal 9 (SIGKILL)) in step " in err, err
    assert "2 fresh worker(s) started" in err and "again from its start" in err, err
    assert_quiet(err)
    fit.assert_clean()
    calm = subprocess.run(fit_argv(store, tmp_path / "runs", "u", *CNN, *extra),
                          capture_output=True, text=True, timeout=300, cwd=tmp_path,
                          env=env_with_tmp(tmp_path))
    assert calm.returncode == 0, calm.stderr
    runs = tmp_path / "runs"
    for which in ("checkpoint.h5", "best.h5"):
        assert _arrays_bytes(runs / "r" / which) == _arrays_bytes(runs / "u" / which), which
    assert untimed_history(runs / "r") == untimed_history(runs / "u")
    restarts = json.loads((runs / "r" / "summary.json").read_text())["worker_restarts"]
    assert len(restarts) == 1 and restarts[0].startswith("worker 1 died")


"""The MPI backend with real jobs: `mpiexec -n 2` (the venv's hydra) running `partrain fit
--backend mpi`, one rank per "machine", both on this one.

- 2 ranks x 1 worker give the bits of 1 rank x 2 workers (three-layer, and vgg with batch norm,
  ghost batches and augmentation); 2 x 2 equal 1 x 4 within the engine tests' tolerance, and
  with --micro-batch 2 x 1 and 2 x 2 give the bits of 1 x 1; rank 1's
  parameters are rank 0's (seen from the outside: tests/mpi_fail_rank.py --dump);
- faults: a rank SIGKILLed, an exception on one rank, a SIGSTOPped rank (--step-timeout), a
  worker of one rank killed: each job ends within its bound, exit != 0, with a message naming
  the rank (or its pid) and the cause, no `partrain-*` block of the job left in /dev/shm and no
  process of the job left alive;
- SIGUSR1 or SIGINT to mpiexec: both ranks stop at the same step with a checkpoint (exit 130),
  and `--resume` ends bit-identical to the uninterrupted run;
- `--backend mpi` outside mpiexec runs as one rank; a launcher/library mismatch is one line.

Timing on a loaded machine (two cores shared with other jobs): the tests wait for conditions (a
file a rank writes after step T, the job's exit), never for a guessed time. Where a time bound is
the point it is generous (20 s, or the watchdog's deadline + 5 s): far above what an abort takes
on busy cores (a few tenths of a second idle), far below "never" (MPI's default for a rank that
raised or stopped is to hang the job forever).

Each job gets its own TMPDIR (the ranks' logs go there). MPICH itself leaves one
`/dev/shm/mpich_shm_*` per aborted job; the tests remove those that appeared during the test and
that no live process maps.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("mpi4py", reason="the MPI tests need mpi4py (pip install '.[test]')")

from partrain.checkpoint import load_checkpoint  # noqa: E402
from procs import alive, children, untimed_history  # noqa: E402
from synthetic import make_tiny_store  # noqa: E402

pytestmark = [pytest.mark.mpi, pytest.mark.slow]

MPIEXEC = Path(sys.executable).parent / "mpiexec"
HOOKS = Path(__file__).with_name("mpi_fail_rank.py")
CLI = [sys.executable, "-m", "partrain.cli"]
LAUNCHER_VARS = ("PMI_", "OMPI_", "PMIX_", "SLURM_", "HYDRA_", "MPI_")

RUNS = {  # as tests/test_digests.py's, with a whole epoch so the per-epoch digest check runs
    "three-layer": ["--model", "three-layer", "--model-option", "num_filters=8",
                    "--model-option", "hidden_dim=32", "--batch-size", "50", "--epochs", "2"],
    "vgg": ["--model", "vgg", "--model-option", "widths=[8,16]", "--model-option",
            "ghost_batch=8", "--optimizer", "sgd", "--lr", "0.05", "--batch-size", "32",
            "--epochs", "1", "--flip", "--translate", "2"],
}
# A job that runs far longer than any test waits for it (100 epochs of 45 steps): it only ends
# through the fault the test makes.
LONG = ["--model", "three-layer", "--model-option", "num_filters=4", "--model-option",
        "hidden_dim=16", "--batch-size", "10", "--epochs", "100", "--val-size", "50"]
FAULT_BOUND_S = 20.0


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return make_tiny_store(tmp_path_factory.mktemp("mpi-data") / "cifar10.h5")


def _env(tmp: Path) -> dict:
    """This Python's venv first on PATH (hydra's proxy and the ranks' python), no launcher
    variables of an outer job, a private TMPDIR."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(LAUNCHER_VARS)}
    env["PATH"] = f"{MPIEXEC.parent}{os.pathsep}{env.get('PATH', '')}"
    tmp.mkdir(parents=True, exist_ok=True)
    env["TMPDIR"] = str(tmp)
    return env


def _fit_args(store: Path, runs: Path, name: str, *args) -> list[str]:
    args = [str(a) for a in args]
    return ["fit", *args, *([] if "--val-size" in args else ["--val-size", "100"]),
            "--data-dir", str(store.parent), "--runs-dir", str(runs), "--name", name, "--quiet"]




def descendants(root: int) -> set[int]:
    kids, out, todo = children(), set(), [root]
    while todo:
        for k in kids.get(todo.pop(), []):
            out.add(k)
            todo.append(k)
    return out


def _mpich_shm() -> set[str]:
    return {n for n in os.listdir("/dev/shm") if n.startswith("mpich_shm_")}


def _mapped(name: str) -> bool:
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/maps") as f:
                    if name in f.read():
                        return True
            except OSError:
                continue
    return False


class Job:
    """An MPI job (or a plain process) in its own session; stdout and stderr are read as they
    come. `pids` collects every process seen under it, so `assert_clean` can check that none
    outlived it (a rank's forkserver is re-parented to init when the rank dies)."""

    def __init__(self, argv, tmp: Path, cwd: Path):
        self.tmp, self.mpich_before = tmp, _mpich_shm()
        self.proc = subprocess.Popen(argv, cwd=cwd, env=_env(tmp / "tmp"), text=True,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     start_new_session=True)
        self.pids: set[int] = set()
        self.tags: list[str] = []
        self._out: list[str] = []
        self._readers = [threading.Thread(target=self._read, args=(s,), daemon=True)
                         for s in (self.proc.stdout, self.proc.stderr)]
        for r in self._readers:
            r.start()

    def _read(self, stream):
        for line in stream:
            self._out.append(line)

    @property
    def output(self) -> str:
        return "".join(self._out)

    def snapshot(self) -> None:
        self.pids |= descendants(self.proc.pid)

    def wait_info(self, info: Path, ranks=(0, 1), timeout: float = 120.0) -> dict[int, dict]:
        """The --info files of `ranks` (written after step T), and every pid of the job now."""
        deadline = time.monotonic() + timeout
        while not all((info / f"rank{r}.json").exists() for r in ranks):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.kill()
                pytest.fail(f"the job did not reach its step: rc={self.proc.poll()}\n"
                            + self.output)
            time.sleep(0.005)
        got = {r: json.loads((info / f"rank{r}.json").read_text()) for r in ranks}
        self.snapshot()
        for r in got.values():
            self.pids |= {r["pid"], *r["workers"]}
            self.tags.append(r["tag"])
        return got

    def finish(self, timeout: float) -> tuple[int, str]:
        """Wait (at most `timeout`) for the job to end: (exit code, its stdout + stderr)."""
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"the job did not end within {timeout:g} s\n{self.output}")
        self.t_exit = time.monotonic()
        for r in self._readers:
            r.join(10)
        return self.proc.returncode, self.output

    def kill(self) -> None:
        """Last resort of a failing test: nothing of the job may outlive it."""
        self.snapshot()
        for pid in self.pids | {self.proc.pid}:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        self.proc.wait(10)

    def assert_clean(self, wait: float = 20.0) -> None:
        """No process of the job alive, no shared memory of its ranks left (allowing `wait` s
        for the launcher's clean-up to finish); MPICH's own leftovers of this job removed."""
        deadline = time.monotonic() + wait
        while True:
            procs = sorted(p for p in self.pids if alive(p))
            shm = sorted(n for n in os.listdir("/dev/shm")
                         if any(n.startswith(t) for t in self.tags))
            if not procs and not shm:
                break
            if time.monotonic() > deadline:
                for p in procs:
                    os.kill(p, signal.SIGKILL)
                pytest.fail(f"left behind: processes {procs}, shared memory {shm}")
            time.sleep(0.05)
        for name in _mpich_shm() - self.mpich_before:
            if not _mapped(name):  # a live job maps its file; a stale one belongs to nobody
                try:
                    os.unlink(f"/dev/shm/{name}")
                except OSError:
                    pass


def mpi_job(tmp: Path, *ranks: list[str], cwd: Path) -> Job:
    """`mpiexec -n 1 RANK0 : -n 1 RANK1 ...`, each RANK a command line."""
    argv = [str(MPIEXEC)]
    for i, cmd in enumerate(ranks):
        argv += ([":"] if i else []) + ["-n", "1", *cmd]
    return Job(argv, tmp, cwd)


def hooked(*hooks, fit_args) -> list[str]:
    return [sys.executable, str(HOOKS), *map(str, hooks), "--", *fit_args]


def arrays(path: Path) -> dict[str, np.ndarray]:
    return load_checkpoint(path)[0]


def assert_same_bits(a: dict, b: dict, what: str) -> None:
    assert a.keys() == b.keys(), what
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].tobytes() == b[k].tobytes(), (what, k)


def test_mpiexec_is_beside_this_python():
    """The test extra installs the mpich wheel; without its hydra every MPI test fails (never a
    silent skip)."""
    assert MPIEXEC.exists(), f"{MPIEXEC} missing: pip install '.[test]' brings the mpich wheel"


# ----------------------------------------------------------------------------------- equality
@pytest.mark.parametrize("run", ["three-layer", "vgg"])
def test_two_ranks_equal_one_rank_with_two_workers(tmp_path, store, run):
    """Bit-identical, not only within tolerance: with 2 ranks x 1 worker every sum over the
    global batch has two addends (the ranks' gradients, loss, BN statistics), and a + b == b + a
    in IEEE arithmetic; 1 rank x 2 workers sums the same two numbers. Rank 1's parameters (its
    would-be checkpoint, dumped by the hook) are rank 0's too."""
    runs, dump = tmp_path / "runs", tmp_path / "dump"
    dump.mkdir()
    job = mpi_job(tmp_path, hooked(fit_args=_fit_args(store, runs, "mpi", *RUNS[run],
                                                       "--backend", "mpi", "--workers", 1)),
                  hooked("--dump", dump, fit_args=_fit_args(store, runs, "mpi", *RUNS[run],
                                                            "--backend", "mpi", "--workers", 1)),
                  cwd=tmp_path)
    rc, out = job.finish(120)
    assert rc == 0, out
    assert "Error" not in out and "Traceback" not in out, out
    local = subprocess.run([*CLI, *_fit_args(store, runs, "local", *RUNS[run], "--workers", 2)],
                           cwd=tmp_path, env=_env(tmp_path / "tmp"), capture_output=True,
                           text=True, timeout=120)
    assert local.returncode == 0, local.stderr
    for which in ("checkpoint", "best"):
        ours = arrays(runs / "mpi" / f"{which}.h5")
        assert_same_bits(ours, arrays(runs / "local" / f"{which}.h5"), f"{which} vs 1 x 2")
        with np.load(dump / f"rank1-{'last' if which == 'checkpoint' else which}.npz") as f:
            assert_same_bits(ours, {k: f[k] for k in f.files}, f"rank 1's {which}")
    _, meta = load_checkpoint(runs / "mpi" / "checkpoint.h5")
    assert meta["epoch"] == int(RUNS[run][RUNS[run].index("--epochs") + 1])
    assert json.loads((dump / "rank1-last.json").read_text())["t"] == meta["t"]


def _two_ranks_and_local(tmp_path, store, args, rank_workers: int, local_workers: int) -> Path:
    """`fit ARGS` as 2 ranks x rank_workers (run "mpi") and in one process group with
    local_workers (run "local"), both finished; returns their runs folder."""
    runs = tmp_path / "runs"
    job = mpi_job(tmp_path, *[[*CLI, *_fit_args(store, runs, "mpi", *args, "--backend", "mpi",
                                                 "--workers", rank_workers)]] * 2, cwd=tmp_path)
    rc, out = job.finish(180)
    assert rc == 0, out
    local = subprocess.run([*CLI, *_fit_args(store, runs, "local", *args, "--workers",
                                             local_workers)],
                           cwd=tmp_path, env=_env(tmp_path / "tmp"), capture_output=True,
                           text=True, timeout=180)
    assert local.returncode == 0, local.stderr
    return runs


def test_two_ranks_of_two_workers_agree_with_four_workers(tmp_path, store):
    """2 x 2 sums (g0 + g1) + (g2 + g3), 1 x 4 sums ((g0 + g1) + g2) + g3: not the same bits,
    so the engine tests' tolerance across N (tests/test_engine.py: max |p_K - p_1| <= 1e-4 *
    max |p_1|). SGD: Adam's first steps divide by sqrt(v) of gradients near zero, which turns
    rounding into ~1e-3 relative moves of single weights (1 x 1 against 1 x 2 workers locally
    differ as much here: 8e-6 of max |p| 0.01 after 8 steps). 6 processes on 2 cores: slow but
    tiny."""
    args = [*RUNS["three-layer"][:-1], "1", "--optimizer", "sgd", "--lr", "0.05"]
    runs = _two_ranks_and_local(tmp_path, store, args, rank_workers=2, local_workers=4)
    a, b = arrays(runs / "mpi" / "checkpoint.h5"), arrays(runs / "local" / "checkpoint.h5")
    tol = 1e-4 * np.abs(b["params"]).max()
    assert np.abs(a["params"] - b["params"]).max() <= tol  # measured: 3e-9 against 1.3e-6


@pytest.mark.parametrize("workers", [1, 2])
def test_micro_batches_make_two_ranks_the_bits_of_one_worker(tmp_path, store, workers):
    """With --micro-batch the sum is over micro-batch rows in one order whoever computes them:
    2 ranks x 1 or 2 workers (rows all-reduced across the ranks) give the bits of 1 worker,
    with batch norm, ghost batches and augmentation (vgg), and the same history."""
    args = [*RUNS["vgg"], "--micro-batch", 8]
    runs = _two_ranks_and_local(tmp_path, store, args, rank_workers=workers, local_workers=1)
    for which in ("checkpoint", "best"):
        assert_same_bits(arrays(runs / "mpi" / f"{which}.h5"),
                         arrays(runs / "local" / f"{which}.h5"), which)
    assert untimed_history(runs / "mpi") == untimed_history(runs / "local")


def test_restart_after_a_lost_worker_is_refused_on_two_ranks_in_one_line(tmp_path, store):
    """Under MPI the other ranks would wait in their all-reduce while one restarts workers."""
    args = _fit_args(store, tmp_path / "runs", "r", *RUNS["three-layer"], "--backend", "mpi",
                     "--workers", 1, "--on-worker-failure", "restart")
    job = mpi_job(tmp_path, [*CLI, *args], [*CLI, *args], cwd=tmp_path)
    rc, out = job.finish(120)
    assert rc != 0
    errors = [line for line in out.splitlines() if line.startswith("Error:")]
    assert errors and all("--on-worker-failure restart works on one machine only" in e
                          for e in errors), out  # "Error: rank R: ...", as every rank's error
    assert "Traceback" not in out, out


# ------------------------------------------------------------------------------------- faults
def _long_job(tmp_path, store, rank1_hooks=(), extra=()) -> tuple[Job, dict]:
    """The LONG job under way (both ranks past step 2), rank 1 with `rank1_hooks`."""
    info = tmp_path / "info"
    info.mkdir()
    args = _fit_args(store, tmp_path / "runs", "r", *LONG, "--backend", "mpi", "--workers", 1,
                     *extra)
    job = mpi_job(tmp_path, hooked("--info", info, fit_args=args),
                  hooked("--info", info, *rank1_hooks, fit_args=args), cwd=tmp_path)
    return job, job.wait_info(info)


def test_sigkill_of_one_rank_ends_the_job(tmp_path, store):
    job, info = _long_job(tmp_path, store)
    t0 = time.monotonic()
    os.kill(info[1]["pid"], signal.SIGKILL)
    rc, out = job.finish(FAULT_BOUND_S)
    assert job.t_exit - t0 < FAULT_BOUND_S  # 0.02 s idle: hydra sees its child die
    assert rc != 0, out
    # Hydra names a process (its pid) and the cause; the other rank gets SIGKILLed with no
    # chance to say anything. Which pid it names is a race: the killed rank's, or (1 run in 6
    # here) the survivor's, which hydra SIGKILLed itself.
    assert "Killed (signal 9)" in out, out
    assert any(f"PID {info[r]['pid']} RUNNING AT" in out for r in (0, 1)), out
    job.assert_clean()


def test_exception_on_one_rank_aborts_the_job(tmp_path, store):
    """MPMD: rank 1 raises at step 40 while rank 0 waits in that step's all-reduce; without
    MPI_Abort this hangs forever."""
    job, info = _long_job(tmp_path, store, rank1_hooks=("--raise-at", 40))
    rc, out = job.finish(FAULT_BOUND_S)  # 0.4 s idle
    assert rc != 0, out
    lines = [ln for ln in out.splitlines() if ln.startswith("Error: rank 1:")]
    assert len(lines) == 1 and "RuntimeError: injected fault at step 40" in lines[0], out
    assert "Traceback" not in out, out  # it is in the rank's log, which the line names
    log = Path(lines[0].split("(traceback in ")[1].rstrip(")"))
    assert "Traceback" in log.read_text() and "injected fault" in log.read_text()
    job.assert_clean()


def test_stopped_rank_is_caught_by_the_watchdog(tmp_path, store):
    """SIGSTOP rank 1 (a hung or cut-off machine): rank 0 waits in an all-reduce that never
    ends, and MPI never notices. Its watchdog aborts the job after --step-timeout."""
    deadline = 3.0
    job, info = _long_job(tmp_path, store, extra=("--step-timeout", deadline))
    t0 = time.monotonic()
    os.kill(info[1]["pid"], signal.SIGSTOP)
    try:
        rc, out = job.finish(deadline + 5 + 10)
    finally:
        try:
            os.kill(info[1]["pid"], signal.SIGCONT)
        except OSError:
            pass
    # The watchdog checks every 0.2 s; the abort itself takes tenths of a second. 5 s over the
    # deadline is the margin for the loaded machine.
    assert job.t_exit - t0 < deadline + 5, (job.t_exit - t0, out)
    assert rc != 0, out
    assert "Error: rank 0: no step finished within 3 s (--step-timeout)" in out, out
    job.assert_clean()


def test_rank_stopped_while_validating_is_caught_too(tmp_path, store):
    """Validation and checkpoints pause the watchdog; the collectives after them (the next
    step) must be watched again, or a rank lost meanwhile hangs the job forever."""
    job, info = _long_job(tmp_path, store, rank1_hooks=("--stop-in-validation",),
                          extra=("--step-timeout", 3))
    rc, out = job.finish(FAULT_BOUND_S + 10)  # epoch 1 ends at step 45, then 3 s
    assert rc != 0, out
    assert "Error: rank 0: no step finished within 3 s (--step-timeout)" in out, out
    job.assert_clean()


def test_killed_worker_of_one_rank_ends_the_job(tmp_path, store):
    job, info = _long_job(tmp_path, store)
    t0 = time.monotonic()
    os.kill(info[1]["workers"][0], signal.SIGKILL)
    rc, out = job.finish(FAULT_BOUND_S)
    assert job.t_exit - t0 < FAULT_BOUND_S
    assert rc != 0, out
    assert "Error: rank 1: worker 0 died (killed by signal 9 (SIGKILL))" in out, out
    job.assert_clean()


# ------------------------------------------------------------------------ stop and resume
STOP_RUN = ["--model", "three-layer", "--model-option", "num_filters=4", "--model-option",
            "hidden_dim=16", "--batch-size", "10", "--epochs", "4", "--val-size", "50",
            "--log-every", "7", "--backend", "mpi", "--workers", "1"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, store):
    tmp = tmp_path_factory.mktemp("mpi-ref")
    args = _fit_args(store, tmp / "runs", "ref", *STOP_RUN)
    job = mpi_job(tmp, [*CLI, *args], [*CLI, *args], cwd=tmp)
    rc, out = job.finish(120)
    assert rc == 0, out
    return tmp / "runs" / "ref"


@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGINT, signal.SIGTERM])
def test_signal_to_mpiexec_stops_every_rank_at_one_step_then_resume_is_exact(
        tmp_path, store, uninterrupted, sig):
    """Hydra forwards SIGUSR1 and SIGINT to every rank (and to each rank's process group: the
    workers ignore both). The ranks all-reduce 'asked to stop' after each step, so both stop
    after the same one; rank 0 checkpoints, rank 1 would have saved the same (--dump)."""
    info, dump, runs = tmp_path / "info", tmp_path / "dump", tmp_path / "runs"
    info.mkdir()
    dump.mkdir()
    args = _fit_args(store, runs, "cut", *STOP_RUN)
    # The signal goes after step 60 of 180 (epoch 2): the run is then long from over, even idle.
    job = mpi_job(tmp_path, hooked("--info", info, "--info-at", 60, fit_args=args),
                  hooked("--info", info, "--info-at", 60, "--dump", dump, fit_args=args),
                  cwd=tmp_path)
    job.wait_info(info)
    job.proc.send_signal(sig)
    rc, out = job.finish(60)
    assert rc == (143 if sig == signal.SIGTERM else 130), out  # SIGUSR1: a Ctrl-C
    assert "continue with: partrain fit --resume" in out and "Traceback" not in out, out
    job.assert_clean()
    _, meta = load_checkpoint(runs / "cut" / "checkpoint.h5")
    assert 60 <= meta["t"] < 180, meta
    rank1 = json.loads((dump / "rank1-last.json").read_text())
    assert (rank1["epoch"], rank1["position"], rank1["t"]) == (
        meta["epoch"], meta["position"], meta["t"])
    with np.load(dump / "rank1-last.npz") as f:
        assert_same_bits(arrays(runs / "cut" / "checkpoint.h5"), {k: f[k] for k in f.files},
                         "rank 1 at the stop")

    resumed = mpi_job(tmp_path, *[[*CLI, "fit", "--backend", "mpi", "--resume",
                                   str(runs / "cut"), "--quiet"]] * 2, cwd=tmp_path)
    rc, out = resumed.finish(120)
    assert rc == 0, out
    for name in ("checkpoint.h5", "best.h5"):
        assert_same_bits(arrays(runs / "cut" / name), arrays(uninterrupted / name), name)


# ------------------------------------------------------------------------------ launching
def test_backend_mpi_without_mpiexec_runs_as_one_rank(tmp_path, store):
    runs = tmp_path / "runs"
    args = [*RUNS["three-layer"][:-1], "1", "--workers", 1]
    p = subprocess.run([*CLI, *_fit_args(store, runs, "one", *args, "--backend", "mpi")],
                       cwd=tmp_path, env=_env(tmp_path / "tmp"), capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 0, p.stderr
    assert "note: --backend mpi outside an MPI launcher: running as one rank" in p.stderr
    local = subprocess.run([*CLI, *_fit_args(store, runs, "local", *args)], cwd=tmp_path,
                           env=_env(tmp_path / "tmp"), capture_output=True, text=True,
                           timeout=120)
    assert local.returncode == 0, local.stderr
    # One rank is a ParallelRunner with one worker, which equals the in-process runner.
    assert_same_bits(arrays(runs / "one" / "checkpoint.h5"),
                     arrays(runs / "local" / "checkpoint.h5"), "one rank vs local")


def test_launcher_and_library_disagree_is_one_clear_line(tmp_path, store):
    """A launcher of another MPI library starts K singletons, each seeing PMI_SIZE=K: refused."""
    env = {**_env(tmp_path / "tmp"), "PMI_SIZE": "3"}
    p = subprocess.run([*CLI, *_fit_args(store, tmp_path / "runs", "x", *LONG, "--backend",
                                         "mpi", "--workers", 1)],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 1, p.stderr
    errors = [ln for ln in p.stderr.splitlines() if ln.startswith("Error:")]
    assert errors == ["Error: the launcher started 3 ranks (PMI_SIZE) but MPI sees 1: mpiexec "
                      "and mpi4py use different MPI libraries (use the mpiexec beside this "
                      f"Python: {sys.prefix}/bin/mpiexec)"], p.stderr
    assert "Traceback" not in p.stderr and not (tmp_path / "runs" / "x").exists()

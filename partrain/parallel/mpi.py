"""Across machines: one MPI rank per machine, each the parent of its own shared-memory workers.

The workers never call MPI. After worker w has summed slice w of its machine's gradients, the
parent all-reduces that slice across the ranks (in the fixed order w = 0..N-1, so every rank
issues the same collectives in the same order), then worker w steps it: a reduce-scatter inside
the machine, an all-reduce of each shard across machines, and no all-gather (the parameters
already live in shared memory). Optimizer state stays replicated, so checkpoints keep their
format. Every control decision of the loop (stop, non-finite loss, end of run) is taken from
all-reduced values, so all ranks always take the same branch.

MPI's own fault behaviour is "abort the job if a process dies, hang forever otherwise", so this
module adds what turns every hang into an abort: `Cross.fail` (any exception: one line, the
traceback in the rank's log, `MPI_Abort`) and `Watchdog` (no step finished within the deadline:
abort, with an `os._exit` fallback). `start()` starts the forkserver before MPI initialises:
forking a process that has initialised MPI is unsafe with RDMA providers, and every worker is
forked by the forkserver, which never does.

mpi4py is an optional dependency (`pip install 'partrain[mpi]'`); nothing imports this module
unless `--backend mpi` is asked for.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import sys
import threading
import time
import traceback
from typing import Iterator

import numpy as np

from .. import __version__
from ..errors import PartrainError
from ..interrupt import Interrupted
from ..launcher import launcher_size
from . import scratch
from .worker import append_private

ABORT_GRACE_S = 2.0     # after MPI_Abort, this long before the rank exits by itself
DEFAULT_DEADLINE_S = 120.0
DEADLINE_STEPS = 20     # the default deadline: at least this many median steps


class Cross:
    """The ranks of one job: the world communicator and the few collectives partrain uses."""

    def __init__(self, comm, MPI):
        self.comm, self.MPI = comm, MPI
        self.rank, self.size = comm.Get_rank(), comm.Get_size()
        self.watchdog: Watchdog | None = None
        self.log_path: str | None = None
        self.seconds = 0.0      # time spent in the cross-machine all-reduces (for bench)

    # -- collectives ---------------------------------------------------------------------
    def allreduce(self, view: np.ndarray) -> None:
        """Sum `view` (contiguous) over the ranks, in place."""
        if view.size:
            c0 = time.perf_counter()
            self.comm.Allreduce(self.MPI.IN_PLACE, view, op=self.MPI.SUM)
            self.seconds += time.perf_counter() - c0

    def bcast(self, obj):
        """Rank 0's (picklable, small) `obj` on every rank."""
        return self.comm.bcast(obj, root=0)

    def bcast_array(self, arr: np.ndarray) -> None:
        """Rank 0's `arr` into every rank's `arr` (same shape and dtype), in place."""
        if arr.size:
            self.comm.Bcast(arr, root=0)

    def agree(self, what: dict) -> None:
        """Every rank must have the same `what` ({name: value}); PartrainError naming the first
        name that differs, and on which rank, otherwise (on every rank alike)."""
        everyone = self.comm.allgather(what)
        for rank, theirs in enumerate(everyone):
            for key, value in everyone[0].items():
                if theirs.get(key) != value:
                    raise PartrainError(f"rank {rank} differs from rank 0 in {key}: "
                                        f"{theirs.get(key)!r} != {value!r}")

    def same_bits(self, arrays: dict[str, np.ndarray], when: str) -> None:
        """Check that every rank holds the same parameters (MPI implementations have broken
        the bitwise identity of all-reduce results before)."""
        h = hashlib.sha256()
        for name in sorted(arrays):
            h.update(np.ascontiguousarray(arrays[name]).tobytes())
        digests = self.comm.allgather(h.hexdigest())
        bad = [r for r, d in enumerate(digests) if d != digests[0]]
        if bad:
            raise PartrainError(f"ranks {bad} hold other parameters than rank 0 {when}: the "
                                f"all-reduce did not give every rank the same bits")

    # -- failure -------------------------------------------------------------------------
    def fail(self, exc: BaseException, code: int = 1) -> None:
        """End the whole job because of `exc` on this rank: its one line on stderr (rank-named),
        the traceback in this rank's log (for a bug: not for bad input or a signal, whose line
        says everything), then MPI_Abort (never returns)."""
        expected = isinstance(exc, (PartrainError, Interrupted))
        line = str(exc) if expected else f"{type(exc).__name__}: {exc}"
        where = None if expected else self._write_log(
            "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)))
        print(f"Error: rank {self.rank}: {line.splitlines()[0] if line else type(exc).__name__}"
              + (f" (traceback in {where})" if where else ""), file=sys.stderr, flush=True)
        self.abort(code)

    def abort(self, code: int) -> None:
        # A moment for the line just printed to reach the launcher: hydra can tear the job
        # down before it forwards a rank's last output (seen in 2 of 30 runs without it).
        sys.stderr.flush()
        time.sleep(0.3)
        threading.Timer(ABORT_GRACE_S, os._exit, (code,)).start()  # if Abort itself hangs
        self.comm.Abort(code)
        os._exit(code)

    def _write_log(self, text: str) -> str | None:
        if not self.log_path:
            return None
        try:
            append_private(self.log_path, text)
            return self.log_path
        except OSError:
            return None


class Watchdog:
    """Aborts the job when this rank finishes no step within the deadline: a rank that is
    stopped, deadlocked or cut off would otherwise leave every rank waiting forever.

    `deadline` None: max(DEFAULT_DEADLINE_S, DEADLINE_STEPS x the median step so far). `pause()`
    around work that is not a step (validation, checkpoints, the test pass); `pet()` after each
    step resumes it.
    """

    def __init__(self, cross: Cross, deadline: float | None):
        self.cross, self.fixed = cross, deadline
        self.steps: list[float] = []
        # Watching from the start (a rank lost during the start-up checks or the resume
        # broadcast would hang the others too), with at least DEFAULT_DEADLINE_S until the
        # first step is done: start-up can take far longer than a step.
        self._last = time.monotonic()
        self._paused, self._first = False, True
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="partrain-watchdog", daemon=True)
        self._thread.start()

    def deadline(self) -> float:
        if not self.steps and self._first:  # start-up: data, workers, checks, the first step
            return max(DEFAULT_DEADLINE_S, self.fixed or 0.0)
        if self.fixed is not None:
            return self.fixed
        median = float(np.median(self.steps[-100:])) if self.steps else 0.0
        return max(DEFAULT_DEADLINE_S, DEADLINE_STEPS * median)

    def pet(self) -> None:
        now = time.monotonic()
        if not self._paused and not self._first:
            self.steps.append(now - self._last)
        self._last, self._paused, self._first = now, False, False

    def pause(self) -> None:
        self._paused = True

    def resume(self) -> None:
        """Watch again from now, without counting the paused stretch as a step: after a pause
        the next collective (the digest check, the next step) must not wait unwatched, or a
        rank stopped meanwhile leaves the others waiting forever."""
        self._last, self._paused = time.monotonic(), False

    def close(self) -> None:
        self._done.set()

    def until_exit(self) -> None:
        """From now until the process exits, at most DEFAULT_DEADLINE_S (see `job`)."""
        self.steps, self._first = [], True
        self.resume()

    def _run(self) -> None:
        while not self._done.wait(0.2):
            waited = time.monotonic() - self._last
            if not self._paused and waited > self.deadline():
                msg = (f"Error: rank {self.cross.rank}: no step finished within "
                       f"{self.deadline():.0f} s (--step-timeout): a rank is stopped, hung or "
                       f"unreachable; aborting the job")
                print(msg, file=sys.stderr, flush=True)  # all there is to say: no log
                self.cross.abort(70)


@contextlib.contextmanager
def job(step_timeout: float | None = None, clean_exits: tuple = ()) -> Iterator[Cross]:
    """`start()`, then the block; any exception on this rank ends the whole job (`Cross.fail`:
    one line, the traceback in the rank's log, MPI_Abort; 130 for a Ctrl-C) instead of leaving
    the other ranks waiting. `clean_exits`: exception types that are an ordinary exit (the CLI's
    exit codes), raised as they are."""
    cross = start(step_timeout)
    try:
        yield cross
    except clean_exits:
        raise
    except BaseException as e:  # noqa: BLE001 - every rank must end, whatever the cause
        cross.fail(e, e.exit_code if isinstance(e, Interrupted) else 1)
    finally:
        # Watched to the end: MPI_Finalize at exit waits for every rank, so one stopped in its
        # test pass would leave the others there forever. The daemon thread ends with the
        # process; if the exit takes longer than a start-up may, the job is aborted.
        cross.watchdog.until_exit()


def start(step_timeout: float | None = None) -> Cross:
    """Start the forkserver, then MPI; check that the launcher and the library agree."""
    from . import pool
    # Hydra forwards a SIGUSR1 sent to mpiexec to each rank's whole process group, where the
    # forkserver, its workers and the resource tracker live too; by default it kills them (the
    # rank then saw "worker 0 died" instead of stopping). Ignored there, inherited through
    # fork and exec; the rank itself catches it (interrupt.StopFlag).
    # The same for SIGTERM, which hydra forwards the same way (an ignored signal stays ignored
    # across fork and exec; a blocked one does not: the exec resets the mask): the pool still
    # stops its workers with b"Q", or SIGKILL when they do not answer.
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGUSR1,
                                                                    signal.SIGTERM)}
    try:
        pool.start_forkserver()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    try:
        import mpi4py
    except ImportError:
        raise PartrainError("--backend mpi needs mpi4py and an MPI library: "
                            "pip install 'partrain[mpi]' (mpi4py and the mpich wheel)") from None
    mpi4py.rc.initialize = False
    mpi4py.rc.finalize = True
    from mpi4py import MPI
    if not MPI.Is_initialized():
        MPI.Init_thread(MPI.THREAD_MULTIPLE)
    cross = Cross(MPI.COMM_WORLD, MPI)
    # Each rank's own log (on its own machine): the traceback of whatever ended the job there.
    # Private (scratch.py): not a predictable /tmp name a planted symlink could redirect.
    cross.log_path = os.path.join(scratch.private_dir(), f"rank{cross.rank}.log")
    expected = launcher_size()
    if expected is not None and expected[1] != cross.size:
        raise PartrainError(f"the launcher started {expected[1]} ranks ({expected[0]}) but MPI "
                            f"sees {cross.size}: mpiexec and mpi4py use different MPI libraries "
                            f"(use the mpiexec beside this Python: {sys.prefix}/bin/mpiexec)")
    if expected is None and cross.rank == 0:
        print("note: --backend mpi outside an MPI launcher: running as one rank",
              file=sys.stderr, flush=True)
    cross.agree({"partrain version": __version__})
    cross.watchdog = Watchdog(cross, step_timeout)
    return cross

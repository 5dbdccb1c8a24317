"""The worker processes of a ParallelRunner: start them, talk to all of them, notice a failure,
stop them.

Every wait polls the pipes with a short timeout and checks that the workers are alive, so a dead
worker (EOF or exit status) or a failing one (b"E" message; traceback in its log file) ends the
wait within POLL_S with a PartrainError naming it. The pool knows nothing of shared memory: its
owner closes that (see engine.ParallelRunner.close).

Workers start with `forkserver` (a clean, single-threaded server forks each worker with numpy and
partrain already imported: no fork-after-threads hazard, no re-import per worker).
"""
from __future__ import annotations

import contextlib
import multiprocessing as mp
import signal
import time

from ..errors import PartrainError
from . import calm
from . import worker as W

POLL_S = 0.1        # how often a waiting parent checks that every worker is alive
QUIT_GRACE_S = 2.0  # how long workers get to exit after b"Q" before they are terminated


class WorkerPool:
    """N worker processes running `worker.main`, one duplex pipe each."""

    def __init__(self, log_paths: list[str], step_timeout: float | None = None):
        self.log_paths = log_paths
        self.step_timeout = step_timeout
        self.procs: list = []
        self.conns: list = []

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def start(self, start_method: str, cfg: dict) -> None:
        """Start one worker per log path with `cfg` (see worker.main); returns at once.

        SIGINT is blocked in the parent meanwhile, so a Ctrl-C cannot cut a process start in
        half (it is delivered after); the forkserver ignores it (see `start_forkserver`). Only
        started processes are recorded, so `stop` never meets one that never ran.
        """
        ctx = mp.get_context(start_method)
        if start_method == "forkserver":
            start_forkserver()
        with _sigint_blocked():
            for w, log_path in enumerate(self.log_paths):
                parent_end, child_end = ctx.Pipe(duplex=True)
                p = ctx.Process(target=W.main, name=f"partrain-worker-{w}", daemon=True,
                                args=(w, child_end, dict(cfg, log_path=log_path)))
                try:
                    p.start()
                except (OSError, EOFError) as e:  # the forkserver is gone (killed meanwhile)
                    parent_end.close()
                    raise PartrainError(f"worker {w} could not be started: the forkserver did "
                                        f"not answer ({type(e).__name__}: {e})") from None
                except BaseException:
                    parent_end.close()
                    raise
                finally:
                    child_end.close()  # the worker holds the only other end: death means EOF
                self.conns.append(parent_end)
                self.procs.append(p)

    def send_one(self, w: int, msg: bytes) -> None:
        try:
            self.conns[w].send_bytes(msg)
        except OSError:
            self._check_alive()
            self._fail_dead(w)

    def send_all(self, msg: bytes) -> None:
        for w, conn in enumerate(self.conns):
            try:
                conn.send_bytes(msg)
            except OSError:  # EPIPE: the worker is gone (it may have left an error message)
                self._check_alive()
                self._fail_dead(w)

    def collect(self, expect: bytes, timeout: float | None = None, what: str = "step") -> None:
        """Wait until every worker has sent `expect`, in order w = 0..N-1; raise on a dead or
        failing worker (checked every POLL_S) or on timeout."""
        timeout = self.step_timeout if timeout is None else timeout
        deadline = None if timeout is None else time.monotonic() + timeout
        for w in range(len(self.conns)):
            self.collect_one(w, expect, deadline, timeout, what)

    def collect_one(self, w: int, expect: bytes, deadline: float | None = None,
                    timeout: float | None = None, what: str = "step") -> None:
        """Wait for worker w's `expect` (until `deadline`, a time.monotonic value)."""
        conn = self.conns[w]
        while not conn.poll(POLL_S):
            self._check_alive()
            if deadline is not None and time.monotonic() > deadline:
                raise PartrainError(f"worker {w} did not answer within {timeout:g} s ({what})")
        try:
            msg = conn.recv_bytes()
        except (EOFError, OSError):
            self._fail_dead(w)
        if msg[:1] != expect:
            self._unexpected(w, msg)

    def kill(self) -> None:
        """SIGKILL every worker now; safe in a signal handler."""
        for p in list(self.procs):
            try:
                p.kill()
            except Exception:  # noqa: BLE001 - already reaped, or never started
                pass

    def stop(self, graceful: bool) -> None:
        """Ask every worker to quit (graceful), then terminate, then kill the ones left; close
        the pipes. Leaves no process behind."""
        procs, conns = self.procs, self.conns
        if graceful:
            for conn in conns:
                try:
                    conn.send_bytes(b"Q")
                except OSError:
                    pass
            _join_all(procs, QUIT_GRACE_S)
        for p in procs:
            if p.exitcode is None:
                p.terminate()
        _join_all(procs, 1.0)
        for p in procs:
            if p.exitcode is None:
                p.kill()
                p.join(5.0)
        for conn in conns:
            conn.close()
        for p in procs:
            try:
                p.close()
            except ValueError:  # still running after SIGKILL + 5 s: nothing more to do
                pass
        self.procs, self.conns = [], []

    def _check_alive(self) -> None:
        for w, p in enumerate(self.procs):
            if p.exitcode is not None:
                conn = self.conns[w]
                try:  # a worker that raised has left its message in the pipe
                    while conn.poll(0):
                        msg = conn.recv_bytes()
                        if msg[:1] == b"E":
                            self._unexpected(w, msg)
                except (EOFError, OSError):
                    pass
                self._fail_dead(w)

    def _unexpected(self, w: int, msg: bytes):
        if msg[:1] == b"E":
            text = msg[1:].decode("utf-8", "replace")
            raise PartrainError(f"worker {w} failed: {text} (traceback in {self.log_paths[w]})")
        raise PartrainError(f"worker {w} sent an unexpected message {msg[:16]!r}")

    def _fail_dead(self, w: int):
        p = self.procs[w]
        p.join(1.0)
        raise PartrainError(f"worker {w} died ({W.describe_exit(p.exitcode)})")


def start_forkserver() -> None:
    """Start the forkserver now (idempotent), with `calm` (SIGINT ignored from its first import
    on) and the worker module preloaded. SIGINT is blocked in the parent meanwhile, so a Ctrl-C
    then is delivered after, not lost. The MPI backend calls this before MPI initialises, so no
    process that initialised MPI ever forks a worker."""
    from multiprocessing import forkserver
    mp.get_context("forkserver").set_forkserver_preload([calm.__name__, W.__name__])
    with _sigint_blocked():
        forkserver.ensure_running()


@contextlib.contextmanager
def _sigint_blocked():
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _join_all(procs, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))

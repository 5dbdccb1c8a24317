"""The worker processes of a ParallelRunner: start them, talk to all of them, notice a failure,
stop them.

Every wait polls the pipes with a short timeout and checks that the workers are alive, so a dead
worker (EOF or exit status) or a failing one (b"E" message; traceback in its log file) ends the
wait within POLL_S with a PartrainError naming it. A stopped one (SIGSTOP, state T) ends it
after STOPPED_S; one that is alive but silent, after the step timeout (the engine's). Starting a
process waits on the forkserver, which can be stopped or stuck too: a guard thread kills it
after STOPPED_S stopped or the start-up timeout, so `start` fails instead of blocking forever.
The pool knows nothing of shared memory: its owner closes that (see engine.ParallelRunner.close).

Workers start with `forkserver` (a clean, single-threaded server forks each worker with numpy and
partrain already imported: no fork-after-threads hazard, no re-import per worker).
"""
from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import signal
import threading
import time

from ..errors import PartrainError, WorkerLost
from ..interrupt import helpers_start_deaf
from . import scratch
from . import worker as W

POLL_S = 0.1        # how often a waiting parent checks that every worker is alive
QUIT_GRACE_S = 2.0  # how long workers get to exit after b"Q" before they are terminated
CALM = "partrain.parallel.calm"  # the forkserver's first preload import (never the parent's)
STOPPED_S = 2.0     # how long a process may stay stopped (state T) before the run gives up on it


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


class WorkerPool:
    """N worker processes running `worker.main`, one duplex pipe each."""

    def __init__(self, log_paths: list[str], step_timeout: float | None = None):
        self.log_paths = log_paths
        self.step_timeout = step_timeout
        self.procs: list = []
        self.conns: list = []
        self._stopped_since: dict[int, float] = {}

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def start(self, start_method: str, cfg: dict, timeout: float = 120.0) -> None:
        """Start one worker per log path with `cfg` (see worker.main); returns at once.

        SIGINT is blocked in the parent meanwhile, so a Ctrl-C cannot cut a process start in
        half (it is delivered after); the forkserver ignores it (see `start_forkserver`). Only
        started processes are recorded, so `stop` never meets one that never ran.
        """
        ctx = mp.get_context(start_method)
        if start_method == "forkserver":
            start_forkserver()
        with _sigint_blocked(), ForkserverGuard(timeout) as guard:
            for w, log_path in enumerate(self.log_paths):
                parent_end, child_end = ctx.Pipe(duplex=True)
                p = ctx.Process(target=W.main, name=f"partrain-worker-{w}", daemon=True,
                                args=(w, child_end, dict(cfg, log_path=log_path)))
                try:
                    p.start()
                except (OSError, EOFError) as e:  # the forkserver is gone (killed meanwhile)
                    parent_end.close()
                    why = guard.reason or f"did not answer ({type(e).__name__}: {e})"
                    raise PartrainError(f"worker {w} could not be started: the forkserver "
                                        f"{why}") from None
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
                hint = "; --step-timeout SECONDS sets the limit" if what == "step" else ""
                raise PartrainError(f"worker {w} did not answer within {timeout:g} s "
                                    f"({what}{hint})")
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
        if any(p.exitcode is None for p in procs):
            _unstick(procs)
        for conn in conns:
            conn.close()
        for p in procs:
            try:
                p.close()
            except ValueError:  # still running after SIGKILL + 5 s: nothing more to do
                pass
        self.procs, self.conns = [], []

    def _check_alive(self) -> None:
        now = time.monotonic()
        for w, p in enumerate(self.procs):
            if process_state(p.pid) == "T":
                since = self._stopped_since.setdefault(w, now)
                if now - since > STOPPED_S:
                    raise PartrainError(f"worker {w} (pid {p.pid}) has been stopped (SIGSTOP or "
                                        f"Ctrl-Z) for {now - since:.0f} s; the run cannot go on "
                                        f"without it")
            else:
                self._stopped_since.pop(w, None)
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
        raise WorkerLost(f"worker {w} died ({W.describe_exit(p.exitcode)})", w)


def process_state(pid: int | None) -> str | None:
    """The state letter of /proc/PID/stat (R, S, D, T, Z, ...), or None where there is none."""
    if pid is None:
        return None
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0].decode()
    except (OSError, IndexError):
        return None


class ForkserverGuard:
    """While open, a thread watches the forkserver: stopped for STOPPED_S, or the block open
    longer than `timeout`, and it is killed, so a `Process.start()` blocked on its socket fails
    with EOFError at once instead of waiting forever; `reason` then says why."""

    def __init__(self, timeout: float):
        self.timeout, self.reason = timeout, None
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="partrain-forkserver-guard",
                                        daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._done.set()
        self._thread.join()

    def _watch(self) -> None:
        from multiprocessing import forkserver
        t0, stopped_since = time.monotonic(), None
        while not self._done.wait(POLL_S):
            pid = getattr(forkserver._forkserver, "_forkserver_pid", None)
            now = time.monotonic()
            if process_state(pid) == "T":
                stopped_since = stopped_since or now
            else:
                stopped_since = None
            if stopped_since is not None and now - stopped_since > STOPPED_S:
                self.reason = f"(pid {pid}) was stopped (SIGSTOP or Ctrl-Z)"
            elif now - t0 > self.timeout:
                self.reason = f"(pid {pid}) did not start the workers within {self.timeout:g} s"
            if self.reason is not None and pid:
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
                return


def start_forkserver() -> None:
    """Start the forkserver now (idempotent), with `calm` (SIGINT ignored from its first import
    on) and the worker module preloaded, started with SIGINT blocked (interrupt.helpers_start_deaf).
    The MPI backend calls this before MPI initialises, so no
    process that initialised MPI ever forks a worker."""
    from multiprocessing import forkserver
    scratch.private_dir()  # its socket goes there, not into a /tmp/pymp-* a SIGKILL leaves
    # By name: importing `calm` here would make the parent ignore Ctrl-C too.
    mp.get_context("forkserver").set_forkserver_preload([CALM, W.__name__])
    scratch.start_quiet_tracker()  # first: ensure_running would start it without the filter
    with helpers_start_deaf():
        forkserver.ensure_running()


@contextlib.contextmanager
def _sigint_blocked():
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _unstick(procs) -> None:
    """A forkserver's child reports its exit through the forkserver, which reaps it; a stopped or
    stuck forkserver never does, and multiprocessing's exit hook would then wait for that report
    forever. So the forkserver is killed (the next start makes a new one), which closes every
    report pipe, and a process whose report still does not come is no longer waited for."""
    from multiprocessing import forkserver, process
    pid = getattr(forkserver._forkserver, "_forkserver_pid", None)
    if pid:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    for p in procs:
        p.join(1.0)
        if p.exitcode is None:
            process._children.discard(p)


def _join_all(procs, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))

"""Ctrl-C and SIGTERM for a training loop: one stop flag, one exception.

Whoever drives the loop installs `catch_signals()` around it, worker start-up included (train.fit;
a ParallelRunner used on its own, as by bench, installs it for itself):
- the first Ctrl-C or SIGTERM (what `timeout`, `docker stop`, systemd and Slurm send before
  their SIGKILL) sets `stop.requested` and prints "stopping after this step (Ctrl-C again to
  force)"; the loop finishes its step, saves a checkpoint and raises `Interrupted`, whose
  `exit_code` is 128 + the signal (130 or 143);
- a second one (either kind) stops now: every abort registered with `on_force` runs (a
  ParallelRunner's kills its workers and unlinks its shared memory), then `Interrupted` (at_once)
  is raised;
- SIGUSR1 (what Open MPI forwards to its ranks, and Slurm's `--signal`) is a first Ctrl-C.
Under the MPI backend (`collective`) whichever rank gets one, every rank stops at the same step
boundary. Outside these blocks the CLI's entry point (partrain/entry.py) turns either signal into
one line and the same exit code.

An exception raised from a signal handler can be lost: when the handler runs inside a `__del__`,
Python prints "Exception ignored in ..." and carries on. So clean-up that must not be cut runs in
`stop.deferred()` (there a forced stop only aborts; its exception is raised when the block ends),
and a runner that was aborted raises `stop.forced_exception()` at its next wait, so a lost
exception comes back at a safe point. Outside the loop (drawing report.html after it, any other
command) the CLI keeps a lost Ctrl-C instead of printing it (`keep_lost_interrupts`) and raises it
where it is safe (`raise_lost_interrupt`: after the report, after the command): one line and 130,
never "Exception ignored ... KeyboardInterrupt" and exit 0 (found by scripts/faults.py in CI).
"""
from __future__ import annotations

import os
import signal
import sys
import threading
from contextlib import contextmanager
from typing import Callable, Iterator

STOPPING = b"\nstopping after this step (Ctrl-C again to force)\n"


_early: list[int] = []  # a signal that came before any loop's handlers, kept for the first one


def defer_to_loop(signum: int) -> bool:
    """Keep a signal that came before the training loop for `catch_signals` to act on (the
    entry point does this for a rank of an MPI job: a rank that exited on its own there would
    leave the others waiting in a collective). False if one was kept already."""
    if _early:
        return False
    _early.append(int(signum))
    return True


_lost: list[KeyboardInterrupt] = []  # Ctrl-Cs raised inside a finaliser, kept for a safe point


def _keep_or_print(unraisable) -> None:
    """sys.unraisablehook: a KeyboardInterrupt raised where Python cannot propagate it (a
    `__del__`, a weakref callback, the garbage collector) is kept; anything else is printed as
    Python would."""
    if isinstance(unraisable.exc_value, KeyboardInterrupt):
        _lost.append(unraisable.exc_value)
        return
    sys.__unraisablehook__(unraisable)


def keep_lost_interrupts() -> None:
    """From now on (the CLI's entry point sets it for the whole process) a Ctrl-C that lands in
    a finaliser is kept for `raise_lost_interrupt`, not printed as a traceback and dropped."""
    sys.unraisablehook = _keep_or_print


def raise_lost_interrupt() -> None:
    """Raise the first Ctrl-C kept since the last call (none: nothing happens)."""
    if _lost:
        first = _lost[0]
        _lost.clear()
        raise first


class Interrupted(KeyboardInterrupt):
    """Ctrl-C stopped the run: at a step boundary, or at once (`at_once`) after a second one.
    A KeyboardInterrupt, so code that does not know it treats it as Ctrl-C."""

    def __init__(self, message: str, at_once: bool = False, signum: int = signal.SIGINT):
        super().__init__(message)
        self.at_once = at_once
        self.signum = int(signum)

    @property
    def exit_code(self) -> int:
        """The shell's convention for a process ended by this signal: 130 (SIGINT), 143 (TERM)."""
        return 128 + self.signum


class StopFlag:
    """What the signals asked for; the loop reads `requested` between steps."""

    def __init__(self, collective: bool = False, announce: bool = True) -> None:
        self.requested = False            # first Ctrl-C: stop after the current step
        # Under MPI a signal only sets `asked`; `requested` is set on every rank alike from the
        # all-reduced `asked` of all ranks after a step (engine), so all stop at the same step.
        self.collective, self.asked = collective, False
        self.announce = announce          # print "stopping after this step" (MPI: rank 0 only)
        self.forced: int | None = None    # the signal that asked to stop now
        self.signum = int(signal.SIGINT)  # the signal that asked first (the exit code's)
        self._aborts: list[Callable[[], None]] = []
        self._deferring = 0
        self._pending: BaseException | None = None
        self._now_message: str | None = None  # set by stop_now_from_here

    def stop_now_from_here(self, message: str) -> None:
        """From now on the first Ctrl-C stops at once with `message`: there is no step boundary
        left to wait for (fit's final test pass, after the last checkpoint)."""
        self._now_message = message

    def on_force(self, abort: Callable[[], None]) -> None:
        """Call `abort` (it must be safe in a signal handler) when a stop-now arrives."""
        self._aborts.append(abort)

    def forget(self, abort: Callable[[], None]) -> None:
        if abort in self._aborts:
            self._aborts.remove(abort)

    def forced_exception(self) -> BaseException:
        return Interrupted(self._now_message or "stopped at once (asked a second time); the last "
                           "checkpoint is kept", at_once=True, signum=self.signum)

    def interrupted(self, message: str) -> Interrupted:
        """The graceful stop's exception, with the exit code of the signal that asked for it."""
        return Interrupted(message, signum=self.signum)

    @contextmanager
    def deferred(self) -> Iterator[None]:
        """Inside: a forced stop aborts but raises only when the block ends."""
        self._deferring += 1
        try:
            yield
        finally:
            self._deferring -= 1
        if not self._deferring and self._pending is not None:
            exc, self._pending = self._pending, None
            raise exc

    def _on_signal(self, signum, frame) -> None:
        if not self.asked and self._now_message is None:
            self.asked = True
            if signum != signal.SIGUSR1:
                self.signum = signum
            self.requested = self.requested or not self.collective
            if self.announce:
                os.write(2, STOPPING)  # no buffered stream: the handler may run inside a print
            return
        if signum == signal.SIGUSR1:
            return  # asked again to stop at the next boundary: it is on its way
        self.forced = signum
        if not self.asked:  # a stop-now phase (stop_now_from_here): this signal's exit code
            self.signum = signum
        for abort in list(self._aborts):
            abort()
        exc = self.forced_exception()
        if self._deferring:
            self._pending = exc
            return
        raise exc


@contextmanager
def helpers_start_deaf() -> Iterator[None]:
    """Start helper processes (the forkserver, the resource tracker) inside: they begin life
    with SIGINT blocked, so a terminal's Ctrl-C (sent to the whole process group; under MPI the
    launcher forwards it there too) cannot kill one while its Python starts, before it can set
    its own handlers (a KeyboardInterrupt traceback from its site import, or a dead forkserver):
    the signal mask survives fork and exec, and the helper's own SIG_IGN (parallel/calm.py, the
    tracker's main) then discards the pending signal. Only this thread's mask changes, never the
    disposition: SIG_IGN here (as before) is process-wide, and a Ctrl-C that the kernel handed to
    another thread meanwhile (OpenBLAS's, which do not block it) was lost; now it reaches the
    handler, or waits for the unblock."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)


@contextmanager
def catch_signals(collective: bool = False, announce: bool = True) -> Iterator[StopFlag]:
    """Install the handlers for the block (in the main thread only; elsewhere signals cannot be
    caught, and the flag just stays down) and restore the previous ones after it. collective:
    the MPI backend's flag (see StopFlag)."""
    stop = StopFlag(collective, announce)
    if _early:  # asked before the handlers were in place: the first boundary stops
        stop.asked, stop.signum = True, _early.pop()
        stop.requested = not collective
        if announce:
            os.write(2, STOPPING)
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return
    saved = {sig: signal.signal(sig, stop._on_signal) for sig in (signal.SIGINT, signal.SIGTERM,
                                                                 signal.SIGUSR1)}
    try:
        yield stop
    finally:
        for sig, old in saved.items():
            signal.signal(sig, old)

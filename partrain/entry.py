"""The `partrain` command's entry point: one signal policy from the first instruction on.

Importing the CLI (numpy, h5py, matplotlib) takes a noticeable fraction of a second; a Ctrl-C or
a SIGTERM then would print a KeyboardInterrupt traceback or end the process silently. Here both
are set before that import: each becomes one line and the shell's exit code (130 for SIGINT, 143
for SIGTERM), in every phase. Inside `fit` the training loop installs its own handlers
(partrain/interrupt.py: first signal = stop at the next step with a checkpoint), and restores
these after. A rank of an MPI job (launcher.py) keeps an early signal for that loop instead, so
that all ranks stop together rather than one leaving the others blocked in a collective.
"""
from __future__ import annotations

import signal

# From the first line of partrain that runs: a signal during the imports below is remembered
# and answered by `main` (a KeyboardInterrupt raised inside an import would be a traceback).
_early: list[int] = []


def _remember(signum, frame):
    _early.append(signum)


_SIGNALS = (signal.SIGINT, signal.SIGTERM)
for _sig in _SIGNALS:
    if signal.getsignal(_sig) is not signal.SIG_IGN:
        signal.signal(_sig, _remember)

import atexit  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402

from .interrupt import (Interrupted, defer_to_loop, keep_lost_interrupts,  # noqa: E402
                        raise_lost_interrupt)
from .launcher import launcher_size  # noqa: E402


def _terminate(signum, frame):
    raise Interrupted("interrupted (SIGTERM)", signum=signum)


def _rank_signal(signum, frame):
    """A rank of an MPI job: the first signal waits for the training loop, where every rank
    stops at the same step (interrupt.defer_to_loop); a second one ends this rank by the signal
    itself, which the launcher answers by ending the whole job."""
    if not defer_to_loop(signum):
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)


def _ignore_signals_at_the_end() -> None:
    """The last exit hook (registered first): from here Python finalises, and it resets
    handlers to the default, so a signal now would end the process by SIGINT (-2) after the
    command had finished; ignored signals stay ignored."""
    for sig in _SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


def main() -> int:
    atexit.register(_ignore_signals_at_the_end)  # before any import registers its own hooks
    keep_lost_interrupts()  # a Ctrl-C inside a finaliser: kept for the end of the command
    size = launcher_size()
    rank = size is not None and size[1] > 1
    handlers = {signal.SIGINT: _rank_signal if rank else signal.default_int_handler,
                signal.SIGTERM: _rank_signal if rank else _terminate}
    for sig, handler in handlers.items():
        if signal.getsignal(sig) is not signal.SIG_IGN:
            signal.signal(sig, handler)
    if _early and not (rank and defer_to_loop(_early[0])):
        sys.stderr.write("interrupted\n")
        return 128 + _early[0]
    try:
        from .cli import main as cli
        try:
            code = cli()
        except SystemExit as e:
            if e.code not in (None, 0):
                raise  # the command's own error (its line is out): that exit code stands
            code = e.code
        raise_lost_interrupt()  # the command finished, but a Ctrl-C came and was kept
        return code
    except KeyboardInterrupt as e:  # before the CLI is up, or after a command returned
        code = e.exit_code if isinstance(e, Interrupted) else 130
        sys.stderr.write(f"{e if isinstance(e, Interrupted) else 'interrupted'}\n")
        return code
    finally:
        for sig in _SIGNALS:
            if signal.getsignal(sig) is not signal.SIG_IGN:
                signal.signal(sig, _tearing_down)


def _tearing_down(signum, frame):
    """The command is done and the process is tidying up (exit hooks: temp folder, workers'
    reports): a first signal lets it finish with the command's own exit code instead of
    cutting the tidying short with a traceback; a second ends it now."""
    if getattr(_tearing_down, "asked", False):
        os._exit(128 + signum)
    _tearing_down.asked = True


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

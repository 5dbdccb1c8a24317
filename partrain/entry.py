"""The `partrain` command's entry point: one signal policy from the first instruction on.

Importing the CLI (numpy, h5py, matplotlib) takes a noticeable fraction of a second; a Ctrl-C or
a SIGTERM then would print a KeyboardInterrupt traceback or end the process silently. Here both
are set before that import: each becomes one line and the shell's exit code (130 for SIGINT, 143
for SIGTERM), in every phase. Inside `fit` the training loop installs its own handlers
(partrain/interrupt.py: first signal = stop at the next step with a checkpoint), and restores
these after.
"""
from __future__ import annotations

import signal
import sys

from .interrupt import Interrupted


def _terminate(signum, frame):
    raise Interrupted("interrupted (SIGTERM)", signum=signum)


def main() -> int:
    signal.signal(signal.SIGTERM, _terminate)
    try:
        from .cli import main as cli
        return cli()
    except KeyboardInterrupt as e:  # before the CLI is up, or after a command returned
        code = e.exit_code if isinstance(e, Interrupted) else 130
        sys.stderr.write(f"{e if isinstance(e, Interrupted) else 'interrupted'}\n")
        return code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

"""What the user sees while `fit` trains: a bar on a terminal, plain lines in a log, or nothing."""
from __future__ import annotations

import sys
import time


class Progress:
    """What the user sees while training.

    - On a terminal (the stream is a TTY): a tqdm bar per epoch with steps done, elapsed and ETA,
      the loss of the last logged window, the accuracy so far this epoch and images/s; at the end
      of the epoch the bar is replaced by a one-line summary (`line`).
    - Elsewhere (CI logs, pipes, files): the same numbers as a plain line, with the epoch's ETA,
      at most every tenth of an epoch and every `plain_every` seconds; no carriage returns, so
      logs stay readable.
    - quiet: nothing at all (but `warn`); the caller prints the final summary.
    Summaries (`line`) go to stdout; the bar goes to `stream` (stderr by default).
    """

    def __init__(self, quiet: bool, stream=None, tty: bool | None = None,
                 plain_every: float = 5.0):
        self.quiet, self.plain_every = quiet, plain_every
        self.stream = stream or sys.stderr
        self.tty = (hasattr(self.stream, "isatty") and self.stream.isatty()) if tty is None else tty
        self.bar = None
        self.epoch = self.epochs = self.total = self.done0 = self.next_plain = 0
        self.t0 = self.last_plain = time.perf_counter()

    def line(self, text: str) -> None:
        if self.quiet:
            return
        if self.bar is not None:
            self.bar.write(text, file=sys.stdout)
        else:
            print(text, flush=True)

    def warn(self, text: str) -> None:
        """'warning: text' on stderr, also with quiet: something went wrong and was mended."""
        if self.bar is not None:
            self.bar.write(f"warning: {text}", file=sys.stderr)
        else:
            print(f"warning: {text}", file=sys.stderr, flush=True)

    def start_epoch(self, epoch: int, epochs: int, total: int, done: int) -> None:
        """Epoch `epoch` (0-based) of `epochs` has `total` steps, `done` of them already (resume)."""
        self.epoch, self.epochs, self.total, self.done0 = epoch, epochs, total, done
        self.t0 = self.last_plain = time.perf_counter()
        self.next_plain = done + max(1, total // 10)
        if self.quiet or not self.tty:
            return
        from tqdm import tqdm
        self.bar = tqdm(total=total, initial=done, desc=f"epoch {epoch + 1}/{epochs}",
                        unit="step", file=self.stream, leave=False, dynamic_ncols=True)

    def update(self, pos: int, loss: float, acc: float, ips: float) -> None:
        """`pos` steps of the epoch are done; loss of the last window, accuracy so far, img/s."""
        if self.quiet:
            return
        if self.bar is not None:
            self.bar.set_postfix_str(f"loss {loss:.3f}, acc {acc:.1%}, {ips:,.0f} img/s",
                                     refresh=False)
            self.bar.update(pos - self.bar.n)
        elif (not self.tty and self.next_plain <= pos < self.total  # the epoch line ends it
              and time.perf_counter() - self.last_plain >= self.plain_every):
            self.next_plain = pos + max(1, self.total // 10)
            self.last_plain = now = time.perf_counter()
            eta = (now - self.t0) / max(pos - self.done0, 1) * (self.total - pos)
            print(f"epoch {self.epoch + 1}/{self.epochs} step {pos}/{self.total}: loss {loss:.4f}"
                  f"  acc {acc:.1%}  {ips:,.0f} img/s  ETA {format_duration(eta)}", flush=True)

    def end_epoch(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def format_duration(seconds: float) -> str:
    """12.3 s, 4 min 05 s, 1 h 02 min."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    m, s = divmod(int(round(seconds)), 60)
    if m < 60:
        return f"{m} min {s:02d} s"
    h, m = divmod(m, 60)
    return f"{h} h {m:02d} min"


class Phase:
    """Progress of one long phase that is not an epoch (decoding an image folder, a test pass):
    a tqdm bar on a terminal, a plain line at most every `plain_every` seconds elsewhere, nothing
    with quiet. `desc` says what is being done ("decoding images"); `update(n)` adds n items.
    Use as a context manager: the bar is closed however the phase ends."""

    def __init__(self, desc: str, total: int, unit: str = "item", quiet: bool = False,
                 stream=None, tty: bool | None = None, plain_every: float = 10.0):
        self.desc, self.total, self.unit, self.quiet = desc, total, unit, quiet
        self.stream = stream or sys.stderr
        self.tty = (hasattr(self.stream, "isatty") and self.stream.isatty()) if tty is None else tty
        self.plain_every, self.done, self.bar = plain_every, 0, None
        self.t0 = self.last = time.perf_counter()

    def __enter__(self) -> "Phase":
        if not self.quiet and self.tty:
            from tqdm import tqdm
            self.bar = tqdm(total=self.total, desc=self.desc, unit=self.unit, file=self.stream,
                            leave=False, dynamic_ncols=True)
        return self

    def update(self, n: int = 1) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
        elif not self.quiet and not self.tty and self.done < self.total:
            now = time.perf_counter()
            if now - self.last >= self.plain_every:
                self.last = now
                eta = (now - self.t0) / self.done * (self.total - self.done)
                print(f"{self.desc}: {self.done:,}/{self.total:,} {self.unit}s, ETA "
                      f"{format_duration(eta)}", file=self.stream, flush=True)

    def __exit__(self, *exc) -> bool:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        return False

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.t0

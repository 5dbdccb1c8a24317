"""run.lock: which run folders a `fit` is training now, and how a run that is not ended.

`fit` (its writer: rank 0 under MPI) holds an exclusive `flock` on RUN/run.lock from before it
reads the run folder until it returns, and writes into it who holds it: pid, host, start time,
ranks. A reader (`partrain runs`) asks for a shared lock without waiting: refused means a process
is training that run now. The kernel drops the lock with its process, so no pid can be stale:
however a run ends, killed included, it is not "running" once its process is gone.

How the file is left says how the last `fit` that changed the folder ended:
- removed: it returned, or was stopped by a signal (Ctrl-C, SIGTERM): the checkpoint and
  summary.json tell the rest;
- left, with "outcome": "failed" and the error's line: it raised after it had changed a folder
  with a checkpoint (a worker died, the loss became NaN): the checkpoint is older than its end;
- left as written at the start (no outcome) and not locked: its process was killed (SIGKILL, out
  of memory, power loss) and nothing could be written.
A fit that fails before it changes anything (a resume on other data, a damaged checkpoint)
leaves the file as it found it, as it leaves the rest of the folder. A second `fit` on a folder
that is being trained is refused (it would write the same files).
"""
from __future__ import annotations

import datetime as _dt
import errno
import fcntl
import json
import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path

from .errors import PartrainError

LOCK = "run.lock"
WATCHED = ("checkpoint.h5", "history.csv", "config.json")  # what a fit changes in its folder
WAIT_S = 2.0  # how long `take` waits out readers (who hold the lock for microseconds)


@dataclass
class LockState:
    """What run.lock says about a run folder: state "absent" (no file), "running" (locked by a
    live process) or "left" (a file no process holds: see the module doc); info: its JSON,
    {} if unreadable."""

    state: str
    info: dict = field(default_factory=dict)

    @property
    def killed(self) -> bool:
        return self.state == "left" and not self.info.get("outcome")

    @property
    def failed(self) -> bool:
        return self.state == "left" and self.info.get("outcome") == "failed"


class RunLock:
    """The lock `fit` holds on its run folder; `take` it, then `release` it once, however fit
    ends."""

    def __init__(self, path: Path, fd: int, before: dict, previous: bytes):
        self.path, self._fd, self._before, self._previous = path, fd, before, previous

    @classmethod
    def take(cls, run: str | os.PathLike, ranks: int = 1) -> "RunLock":
        """Lock RUN/run.lock and write who holds it; PartrainError if another process trains
        this run folder now."""
        path = Path(run) / LOCK
        deadline = time.monotonic() + WAIT_S
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                os.close(fd)
                if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                    raise
                if time.monotonic() > deadline:
                    raise PartrainError(f"{run} is being trained by another process "
                                        f"({_holder(read_lock(run).info)}); wait for it or "
                                        f"stop it first") from None
                time.sleep(0.02)
                continue
            if _same_file(fd, path):  # not a file its last holder removed meanwhile
                break
            os.close(fd)
        previous = os.pread(fd, 1 << 16, 0)  # the last fit's record, if it left one
        info = {"pid": os.getpid(), "host": socket.gethostname(), "ranks": ranks,
                "started": _dt.datetime.now().isoformat(timespec="seconds")}
        _rewrite(fd, json.dumps(info, sort_keys=True).encode() + b"\n")
        return cls(path, fd, _signature(path.parent), previous)

    def release(self, error: BaseException | None = None) -> None:
        """Unlock. A fit that `error` ended before it changed the folder leaves the file as it
        found it (a failing resume changes nothing); one that changed it and raised (not a stop
        by a signal) with a checkpoint there records the failure; otherwise the file goes."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            run = self.path.parent
            unchanged = error is not None and _signature(run) == self._before
            if unchanged and self._previous:
                _rewrite(fd, self._previous)
            elif (unchanged or error is None or isinstance(error, KeyboardInterrupt)
                  or not (run / WATCHED[0]).exists()):
                self.path.unlink(missing_ok=True)
            else:
                info = json.loads(os.pread(fd, 1 << 16, 0) or b"{}")
                info.update(outcome="failed", error=_one_line(error),
                            ended=_dt.datetime.now().isoformat(timespec="seconds"))
                _rewrite(fd, json.dumps(info, sort_keys=True).encode() + b"\n")
        except (OSError, ValueError):
            pass  # a record we cannot write leaves the file as a killed run's: still not running
        finally:
            os.close(fd)  # the lock goes with it


def read_lock(run: str | os.PathLike) -> LockState:
    """The state of RUN/run.lock, without waiting and without changing it."""
    path = Path(run) / LOCK
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        return LockState("absent")
    except OSError:
        return LockState("left")
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            state = "left"
        except OSError as e:
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                return LockState("left")
            state = "running"
        try:
            info = json.loads(os.pread(fd, 1 << 16, 0).decode() or "{}")
        except (OSError, ValueError):
            info = {}
        return LockState(state, info if isinstance(info, dict) else {})
    finally:
        os.close(fd)


def _holder(info: dict) -> str:
    """'pid 123 on host since 2026-12-01 20:23:02' (what is known of it)."""
    words = [f"pid {info['pid']}" if "pid" in info else "pid unknown"]
    if info.get("host"):
        words.append(f"on {info['host']}")
    if info.get("started"):
        words.append(f"since {str(info['started']).replace('T', ' ')}")
    return " ".join(words)


def _rewrite(fd: int, data: bytes) -> None:
    os.ftruncate(fd, 0)
    os.pwrite(fd, data, 0)


def _same_file(fd: int, path: Path) -> bool:
    try:
        st = os.stat(path, follow_symlinks=False)
    except FileNotFoundError:
        return False
    own = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (own.st_dev, own.st_ino)


def _signature(run: Path) -> dict:
    """{name: (inode, size, mtime_ns)} of the files a fit writes: whether this one wrote any."""
    out = {}
    for name in WATCHED:
        try:
            st = os.stat(run / name)
            out[name] = (st.st_ino, st.st_size, st.st_mtime_ns)
        except OSError:
            out[name] = None
    return out


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= 300 else text[:297] + "..."

"""What a run keeps outside its run folder, and how a later run removes what a killed one left.

A parent holds two kinds of things outside the run folder:
- shared-memory blocks `/dev/shm/partrain-<pid>-<hex>-<array>` (shm.SharedArrays);
- one private folder `<tmp>/partrain-<pid>-<random>` (mode 0700, made with mkdtemp, so its name
  cannot be guessed): multiprocessing's forkserver socket goes there instead of a `pymp-*` folder,
  and so do the worker and rank logs when there is no run folder to put them in.

Normally the parent removes both. A SIGKILL of the whole process group (`timeout -s KILL`, a CI
job's time limit, a scheduler's hard kill, the OOM killer) also kills the resource tracker, and
nothing does. So every owner holds a shared `flock` for as long as it lives, on its folder and on
a lock file `/dev/shm/partrain-<pid>-<hex>-lock` made before its blocks; the kernel drops the
lock when the process dies, however it dies. `sweep()`, run before a parent creates its own,
removes every block set and folder that nobody holds a lock on. Each lock is taken before its name
appears (made under a hidden name, locked, then renamed), so a sweep running at the same moment
never sees an unlocked new one. A lock, not the pid in the name: pids are reused, and another
container sharing /dev/shm has its own pid numbers (sets without a lock file, from older versions,
fall back to the pid). A folder that still holds a non-empty log is kept: an error message
pointed the user at that log.
"""
from __future__ import annotations

import atexit
import fcntl
import os
import secrets
import shutil
import sys
import tempfile
from multiprocessing import current_process

from ..interrupt import helpers_start_deaf

PREFIX = "partrain-"
SHM_DIR = "/dev/shm"

_held: dict[str, int] = {}        # path -> descriptor whose shared lock says "still in use"
_private: str | None = None


_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)


def new_lock_file(path: str) -> None:
    """Create `path` (an empty file), already locked by this process when its name appears."""
    folder, name = os.path.split(path)
    hidden = os.path.join(folder, f".{name}.{secrets.token_hex(4)}")
    fd = os.open(hidden, os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)
        os.rename(hidden, path)
    except BaseException:
        os.close(fd)
        os.unlink(hidden)
        raise
    _held[path] = fd


def _new_locked_folder() -> str:
    """A private folder (0700, unguessable name), locked by this process when its name appears."""
    hidden = tempfile.mkdtemp(prefix=f".{PREFIX}{os.getpid()}-", dir=base_dir())
    path = os.path.join(os.path.dirname(hidden), os.path.basename(hidden)[1:])
    fd = os.open(hidden, _FLAGS)
    fcntl.flock(fd, fcntl.LOCK_SH)
    os.rename(hidden, path)
    _held[path] = fd
    return path


def release(path: str) -> None:
    fd = _held.pop(path, None)
    if fd is not None:
        os.close(fd)


def unowned(path: str) -> bool:
    """True when no live process holds `path`'s lock (so its owner is gone)."""
    if path in _held:
        return False
    try:
        fd = os.open(path, _FLAGS)
    except OSError:
        return False  # gone already, or not ours to open
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def _tag(name: str) -> str | None:
    """'partrain-<pid>-<hex>' of a block or folder name, or None if it is not partrain's."""
    parts = name.split("-")
    if len(parts) < 3 or parts[0] + "-" != PREFIX or not parts[1].isdigit():
        return None
    return "-".join(parts[:3])


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: alive, someone else's
        return True
    return True


def _owner_gone(tag: str, members: list[str], shm_dir: str) -> bool:
    lock = f"{tag}-lock"
    if lock in members:
        return unowned(os.path.join(shm_dir, lock))
    return not _pid_alive(int(tag.split("-")[1]))


def sweep_blocks(shm_dir: str = SHM_DIR) -> tuple[int, int]:
    """Unlink the block sets whose owner is gone: (blocks, bytes) removed; the lock file goes
    last, so a set is never without one while it has blocks."""
    try:
        names = sorted(os.listdir(shm_dir))
    except OSError:
        return 0, 0
    sets: dict[str, list[str]] = {}
    for name in names:
        tag = _tag(name)
        if tag is not None:
            sets.setdefault(tag, []).append(name)
    removed = nbytes = 0
    for tag, members in sets.items():
        if not _owner_gone(tag, members, shm_dir):
            continue
        for p in sorted((os.path.join(shm_dir, n) for n in members),
                        key=lambda p: p.endswith("-lock")):
            try:
                size = os.stat(p).st_size
                os.unlink(p)
            except OSError:
                continue
            if not p.endswith("-lock"):
                removed, nbytes = removed + 1, nbytes + size
    return removed, nbytes


def base_dir() -> str:
    """Where private folders go: the temp folder, unless its path is so long that the
    forkserver's socket path inside would pass the AF_UNIX limit (~107 bytes); then /tmp."""
    tmp = tempfile.gettempdir()
    if len(tmp) + len("/partrain-4194304-xxxxxxxx/listener-xxxxxxxx") > 100 and os.path.isdir(
            "/tmp"):
        return "/tmp"
    return tmp


def sweep_folders(tmp: str | None = None) -> int:
    """Tidy the private folders of owners that are gone (see `_tidy`); returns how many."""
    tmp = tmp or base_dir()
    try:
        names = sorted(os.listdir(tmp))
    except OSError:
        return 0
    tidied = 0
    for name in names:
        path = os.path.join(tmp, name)
        try:  # another partrain may tidy the same folder meanwhile (two ranks on one machine)
            if (_tag(name) != name or os.path.islink(path) or not os.path.isdir(path)
                    or os.stat(path).st_uid != os.getuid() or not unowned(path)):
                continue
        except FileNotFoundError:
            continue
        tidied += _tidy(path)
    return tidied


def _tidy(path: str) -> bool:
    """Remove folder `path`, or, when it holds a non-empty log (an error message named it),
    everything in it but the logs. True if anything was removed."""
    try:
        entries = os.listdir(path)
        logs = {n for n in entries
                if n.endswith(".log") and os.path.getsize(os.path.join(path, n)) > 0}
    except OSError:
        return False
    if not logs:
        shutil.rmtree(path, ignore_errors=True)
        return True
    for n in set(entries) - logs:
        target = os.path.join(path, n)
        if os.path.isdir(target) and not os.path.islink(target):
            shutil.rmtree(target, ignore_errors=True)
        else:
            try:
                os.unlink(target)
            except OSError:
                pass
    return len(entries) > len(logs)


def sweep(quiet: bool = False) -> None:
    """Both sweeps, with one line on stderr when anything was removed."""
    blocks, nbytes = sweep_blocks()
    sweep_folders()  # small: removing them needs no word
    if blocks and not quiet:
        print(f"partrain: removed {blocks} shared-memory block(s) ({nbytes / 2**20:,.1f} MiB) "
              f"left in {SHM_DIR} by a killed run", file=sys.stderr, flush=True)


def start_quiet_tracker() -> None:
    """Start multiprocessing's resource tracker (idempotent) with its "leaked shared_memory
    objects" warning off: it only speaks when the parent was SIGKILLed, and then freeing the
    blocks is exactly what it should do, not a fault to report. The tracker is a fresh Python
    started from this process's environment, so the filter goes in there for that moment."""
    from multiprocessing import resource_tracker
    saved = os.environ.get("PYTHONWARNINGS")
    quiet = "ignore::UserWarning:multiprocessing.resource_tracker"
    os.environ["PYTHONWARNINGS"] = f"{saved},{quiet}" if saved else quiet
    try:
        with helpers_start_deaf():
            resource_tracker.ensure_running()
    finally:
        if saved is None:
            del os.environ["PYTHONWARNINGS"]
        else:
            os.environ["PYTHONWARNINGS"] = saved


def private_dir() -> str:
    """This process's private folder (made, locked and handed to multiprocessing on first use;
    removed at exit unless it holds a non-empty log)."""
    global _private
    if _private is not None and os.path.isdir(_private):
        return _private
    path = _new_locked_folder()
    # multiprocessing puts the forkserver's socket in its temp folder, which a SIGKILL leaves
    # behind as /tmp/pymp-*; it takes ours instead (util.get_temp_dir reads this entry).
    current_process()._config["tempdir"] = path
    _private = path
    atexit.register(_remove_private, path, os.getpid())
    return path


def _remove_private(path: str, pid: int) -> None:
    if os.getpid() != pid:  # a forked child inherits atexit: not its folder
        return
    release(path)
    _tidy(path)

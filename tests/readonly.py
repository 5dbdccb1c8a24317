"""Run a command with one folder read-only, as root too.

Root ignores folder permission bits, so `chmod 555` proves nothing there. As root the command runs
instead in a private mount namespace (`unshare -m`) in which the folder is bind-mounted onto itself
read-only: the kernel then refuses every write with EROFS, whoever asks, and the mount disappears
with the namespace, so nothing outside the test changes. Elsewhere the folder is chmod-ed 555 for
the duration of the command.
"""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

_REMOUNT = 'mount --bind "$1" "$1" && mount -o remount,bind,ro "$1" "$1" && shift && exec "$@"'


def _is_root() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0


def namespace_available() -> bool:
    """True if `unshare -m` and a read-only bind mount work here (root in a usable kernel)."""
    if not shutil.which("unshare"):
        return False
    probe = subprocess.run(["unshare", "-m", "sh", "-c", _REMOUNT, "sh", "/tmp", "true"],
                           capture_output=True)
    return probe.returncode == 0


def run_read_only(folder: Path, argv: list[str], **kw) -> subprocess.CompletedProcess:
    """Run argv (a real process) while `folder` cannot be written; returns its result."""
    folder = Path(folder).resolve()
    kw = {"capture_output": True, "text": True, "timeout": 300, **kw}
    if not _is_root():
        folder.chmod(0o555)
        try:
            return subprocess.run(argv, **kw)
        finally:
            folder.chmod(0o755)
    if not namespace_available():
        pytest.skip("running as root and no private mount namespace (unshare -m) to make a "
                    "read-only folder")
    return subprocess.run(["unshare", "-m", "sh", "-c", _REMOUNT, "sh", str(folder), *argv], **kw)

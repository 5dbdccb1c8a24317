"""Two simulated hosts for the MPI tests: two network namespaces joined by a veth pair.

The set-up itself lives in scripts/two_hosts.py (the same command the benchmarks use), loaded
from there so that the tests and the script cannot drift apart. What this module adds is what
the tests need around it:

- `skip_reason()`: why these tests cannot run here (no mpi4py, not root, no `ip`), or None;
- `wait_until(pred, timeout)`: a bounded poll;
- `job_shm_blocks(hosts)`: the partrain blocks left in either host's /dev/shm.
"""
from __future__ import annotations

import importlib.util
import os
import sys
import tempfile
import time
from pathlib import Path

_SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "two_hosts.py"
_spec = importlib.util.spec_from_file_location("two_hosts", _SCRIPT)
two_hosts = importlib.util.module_from_spec(_spec)
sys.modules.setdefault("two_hosts", two_hosts)
_spec.loader.exec_module(two_hosts)

TwoHosts = two_hosts.TwoHosts
PREFIX = two_hosts.PREFIX
MPIEXEC = Path(sys.executable).parent / "mpiexec"


def skip_reason() -> str | None:
    if importlib.util.find_spec("mpi4py") is None:
        return "mpi4py is not installed (pip install -e '.[test]')"
    why = two_hosts.problem()
    return f"two simulated hosts: {why}" if why else None


def wait_until(pred, timeout: float, every: float = 0.05) -> bool:
    """Poll `pred()` until it is true or `timeout` seconds passed; its last value."""
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(every)


def job_shm_blocks(hosts: TwoHosts) -> list[str]:
    """partrain's shared-memory blocks in either host's own /dev/shm."""
    return sorted(f"{'AB'[h]}:{p.name}" for h in (0, 1)
                  for p in hosts.shm(h).glob("partrain-*"))


def leftovers(prefix: str = PREFIX) -> list[str]:
    """Namespaces, mounts and temp folders of this process's set-ups still there."""
    mine = f"{prefix}-{os.getpid()}-"
    out = [ns for ns in two_hosts.namespaces() if ns.startswith(mine)]
    with open("/proc/self/mounts") as f:
        out += [line.split()[1] for line in f if mine in line.split()[1]]
    out += [str(p) for p in Path(tempfile.gettempdir()).glob(f"{mine}*")]
    out += [str(p) for p in Path("/etc/netns").glob(f"{mine}*")]
    return out

"""Two simulated hosts on one machine, for MPI runs that really cross a network.

    python scripts/two_hosts.py [--ppn 1] [--timeout S] -- partrain fit --backend mpi --workers 1 ...

runs the command under the venv's `mpiexec` (hydra) with one rank in each of two network
namespaces, "hostA" and "hostB", joined by a veth pair (10.77.0.1/24 and 10.77.0.2/24 on `mpi0`,
the only interface besides `lo` in either namespace). Everything is removed afterwards, also
after Ctrl-C; namespaces this prefix left behind by a killed run are removed on the next one.
SIGINT, SIGTERM and SIGUSR1 are passed on to mpiexec (which forwards them to the ranks). The
exit code is mpiexec's; the bytes that crossed the veth are printed on stderr at the end.

How it works:
- Both ends of the veth are created inside the namespaces (the root namespace never sees them),
  and neither namespace has a route anywhere else, so traffic stays on `lo` or on that veth.
  `/etc/netns/<ns>/hosts` and `resolv.conf` (bind-mounted by `ip netns exec`) make the two host
  names resolve locally, with no name server to ask.
- mpiexec runs inside namespace A; hydra has no launcher for namespaces, but its ssh launcher
  takes any executable (`-bootstrap ssh -bootstrap-exec <wrapper>`): the generated wrapper maps
  10.77.0.2 to `ip netns exec <ns B> unshare --uts ...` (own host name), where hydra's proxy
  then starts the rank. Hydra starts the proxy for host A itself.
- `UCX_TLS=tcp,self` (and the ucx netmod): without it UCX sees the same boot id on both "hosts"
  and moves the data through shared memory instead of the veth.
- Each host has its own /dev/shm, as real machines do: a tmpfs (as large as the real /dev/shm)
  mounted in the temp folder and bound over /dev/shm in that host's mount namespace. What a job
  leaves there (MPICH leaves `mpich_shm_*` files whenever a job aborts) goes with the set-up;
  `TwoHosts.shm(host)` is where a test looks for leftovers.

Needs root and iproute2's `ip`; `problem()` says why it cannot run, or None. tests/hosts.py
imports this module (the tests use the same set-up).
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PREFIX = "ptmh"         # every namespace, /etc/netns entry and temp folder of ours starts so
SUBNET = "10.77.0"      # .1 = hostA, .2 = hostB, on the veth only
IFACE = "mpi0"
HOSTNAMES = ("hostA", "hostB")
IP_TIMEOUT_S = 10       # any single `ip` call; they take milliseconds
KILL_WAIT_S = 10        # for SIGKILLed processes to vanish from a namespace
_counter = itertools.count()


def problem() -> str | None:
    """Why two namespaces cannot be made here (not root, no `ip`, no netns support), or None."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None or shutil.which("unshare") is None:
        return "needs iproute2's `ip` and util-linux's `unshare`"
    name = f"{PREFIX}-probe-{os.getpid()}"
    try:
        p = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True,
                           timeout=IP_TIMEOUT_S)
        if p.returncode:
            return f"`ip netns add` failed: {p.stderr.strip()}"
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"`ip netns add` failed: {e}"
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=IP_TIMEOUT_S)
    return None


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    p = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=IP_TIMEOUT_S)
    if check and p.returncode:
        raise RuntimeError(f"ip {' '.join(args)}: {p.stderr.strip()}")
    return p


def alive(pid: int) -> bool:
    """True if pid runs and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def namespaces() -> list[str]:
    return [line.split()[0] for line in ip("netns", "list").stdout.splitlines() if line.strip()]


def netns_pids(ns: str) -> list[int]:
    """The live (non-zombie) processes whose network namespace is `ns`."""
    p = ip("netns", "pids", ns, check=False)
    return [pid for pid in map(int, p.stdout.split()) if alive(pid)]


def kill_namespace(ns: str) -> list[int]:
    """SIGKILL every process in `ns` until none is left (bounded); the pids still alive."""
    deadline = time.monotonic() + KILL_WAIT_S
    while True:
        pids = netns_pids(ns)
        if not pids or time.monotonic() > deadline:
            return pids
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.05)


def remove_namespace(ns: str) -> list[int]:
    """Kill what runs in `ns`, delete it and its /etc/netns entry; the pids that would not die."""
    left = kill_namespace(ns) if ns in namespaces() else []
    if ns in namespaces():
        ip("netns", "del", ns, check=False)
    shutil.rmtree(f"/etc/netns/{ns}", ignore_errors=True)
    try:
        os.rmdir("/etc/netns")  # only if empty, i.e. nobody else uses it
    except OSError:
        pass
    return left


def unmount_under(folder: Path) -> None:
    """Unmount (lazily) every mount point at or under `folder`, deepest first."""
    root = os.path.realpath(folder)
    with open("/proc/self/mounts") as f:
        points = [line.split()[1] for line in f]
    for point in sorted(points, key=len, reverse=True):
        point = point.replace("\\040", " ")
        if point == root or point.startswith(root + os.sep):
            subprocess.run(["umount", "-l", point], capture_output=True, timeout=IP_TIMEOUT_S)


def remove_folder(folder: Path) -> None:
    unmount_under(folder)
    shutil.rmtree(folder, ignore_errors=True)


def remove_stale(prefix: str = PREFIX) -> list[str]:
    """Remove what set-ups of `prefix` left behind when their process died (a SIGKILLed test or
    script): namespaces, /etc/netns entries, temp folders. Returns the namespaces removed."""
    pattern = re.compile(rf"^{re.escape(prefix)}-(\d+)-\d+-[ab]$")
    removed = []
    for ns in namespaces():
        m = pattern.match(ns)
        if m and not alive(int(m.group(1))):
            remove_namespace(ns)
            removed.append(ns)
    for folder in (Path("/etc/netns"), Path(tempfile.gettempdir())):
        for entry in folder.glob(f"{prefix}-*"):
            m = re.match(rf"^{re.escape(prefix)}-(\d+)-", entry.name)
            if m and not alive(int(m.group(1))):
                remove_folder(entry)
    return removed


class TwoHosts:
    """Two network namespaces joined by a veth pair; `with TwoHosts() as hosts:` builds them and
    removes them (and every process left inside) on the way out.

    `hosts.mpiexec_argv(cmd)` is the argv that runs `cmd` with `ppn` ranks on each host.
    """

    def __init__(self, prefix: str = PREFIX, subnet: str = SUBNET,
                 mpiexec: str | os.PathLike | None = None):
        self.prefix = prefix
        self.name = f"{prefix}-{os.getpid()}-{next(_counter)}"
        self.ns = (f"{self.name}-a", f"{self.name}-b")
        self.addrs = (f"{subnet}.1", f"{subnet}.2")
        self.mpiexec = str(mpiexec or Path(sys.executable).parent / "mpiexec")
        self.folder: Path | None = None
        self.wrapper: Path | None = None
        self.left_alive: list[int] = []   # after down(): pids that survived SIGKILL (none, ever)

    # -- set-up and tear-down ------------------------------------------------------------
    def up(self) -> "TwoHosts":
        remove_stale(self.prefix)
        try:
            for ns in self.ns:
                ip("netns", "add", ns)
            # Both ends are born inside the namespaces: the root namespace never has them.
            ip("link", "add", "name", IFACE, "netns", self.ns[0], "type", "veth",
               "peer", "name", IFACE, "netns", self.ns[1])
            for ns, addr in zip(self.ns, self.addrs):
                ip("-n", ns, "addr", "add", f"{addr}/24", "dev", IFACE)
                ip("-n", ns, "link", "set", "lo", "up")
                ip("-n", ns, "link", "set", IFACE, "up")
                self._etc(ns)
            self.folder = Path(tempfile.mkdtemp(prefix=f"{self.name}-"))
            size = os.statvfs("/dev/shm")
            for host in (0, 1):
                self.shm(host).mkdir()
                subprocess.run(["mount", "-t", "tmpfs", "-o",
                                f"size={size.f_blocks * size.f_frsize},mode=1777",
                                f"{self.name}-shm", str(self.shm(host))],
                               check=True, capture_output=True, timeout=IP_TIMEOUT_S)
            self.wrapper = self.folder / "netns-rsh"
            self.wrapper.write_text(self._wrapper_text())
            self.wrapper.chmod(0o755)
            self._wait_reachable()
        except BaseException:
            self.down()
            raise
        return self

    def down(self) -> None:
        """Kill every process in both namespaces, delete them; never raises for a missing one."""
        left = []
        for ns in self.ns:
            left += remove_namespace(ns)
        self.left_alive = left
        if self.folder is not None:
            remove_folder(self.folder)

    def shm(self, host: int) -> Path:
        """The folder that is /dev/shm on host `host` (0 = A, 1 = B)."""
        return self.folder / f"shm-{'ab'[host]}"

    def __enter__(self) -> "TwoHosts":
        return self.up()

    def __exit__(self, *exc) -> None:
        self.down()

    def _etc(self, ns: str) -> None:
        """hosts + resolv.conf for `ip netns exec` to bind over /etc: both host names resolve
        locally and no name server is configured (so none is ever asked)."""
        etc = Path("/etc/netns") / ns
        try:
            etc.mkdir(parents=True, exist_ok=True)
            (etc / "hosts").write_text(
                "127.0.0.1 localhost\n" + "".join(f"{a} {h}\n" for a, h in zip(self.addrs,
                                                                                HOSTNAMES)))
            (etc / "resolv.conf").write_text("# two_hosts: no name server in these namespaces\n"
                                             "nameserver 127.0.0.1\noptions attempts:1 timeout:1\n")
        except OSError:
            pass    # read-only /etc: names then fail to resolve, nothing leaves the namespace

    def _wrapper_text(self) -> str:
        cases = "".join(f"  {a}|{h}) ns={ns}; hn={h}; shm={self.shm(i)} ;;\n"
                        for i, (a, h, ns) in enumerate(zip(self.addrs, HOSTNAMES, self.ns)))
        return ("#!/bin/sh\n"
                "# hydra's \"ssh\" into the namespaces of scripts/two_hosts.py (generated)\n"
                "while [ $# -gt 0 ]; do case \"$1\" in -*) shift ;; *) break ;; esac; done\n"
                "host=$1; shift\n"
                "case \"$host\" in\n" + cases +
                "  *) echo \"netns-rsh: unknown host $host\" >&2; exit 255 ;;\n"
                "esac\n"
                "exec ip netns exec \"$ns\" unshare --uts --mount --propagation private \\\n"
                "    sh -c \"mount --bind $shm /dev/shm && hostname $hn && exec $*\"\n")

    def _wait_reachable(self) -> None:
        """Until both ends of the veth report carrier (milliseconds; bounded)."""
        deadline = time.monotonic() + IP_TIMEOUT_S
        while time.monotonic() < deadline:
            states = [json.loads(ip("-n", ns, "-j", "link", "show", IFACE).stdout)[0]
                      .get("operstate") for ns in self.ns]
            if states == ["UP", "UP"]:
                return
            time.sleep(0.02)
        raise RuntimeError(f"the veth of {self.name} did not come up: {states}")

    # -- running -------------------------------------------------------------------------
    def env(self, base: dict | None = None) -> dict:
        """The environment for mpiexec (hydra passes it on to every rank): the venv's bin first
        on PATH, and the transport settings that make the traffic cross the veth."""
        env = dict(os.environ if base is None else base)
        env["PATH"] = f"{Path(self.mpiexec).parent}{os.pathsep}{env.get('PATH', '')}"
        env.update(MPIR_CVAR_CH4_NETMOD="ucx", UCX_TLS="tcp,self", UCX_NET_DEVICES=IFACE)
        return env

    def mpiexec_argv(self, command: list[str], ppn: int = 1) -> list[str]:
        """argv (run it with `env()`) that starts `command` as 2*ppn ranks, ppn on each host."""
        return ["ip", "netns", "exec", self.ns[0], "unshare", "--uts", "--mount",
                "--propagation", "private", "--", "sh", "-c",
                'mount --bind "$1" /dev/shm && hostname "$0" && shift && exec "$@"',
                HOSTNAMES[0], str(self.shm(0)),
                self.mpiexec, "-bootstrap", "ssh", "-bootstrap-exec", str(self.wrapper),
                "-iface", IFACE, "-hosts", ",".join(self.addrs), "-n", str(2 * ppn),
                "-ppn", str(ppn), *map(str, command)]

    def pids(self) -> dict[str, list[int]]:
        """{namespace: live pids inside it}."""
        return {ns: netns_pids(ns) for ns in self.ns}

    def link(self, host: int, up: bool) -> None:
        """Bring host `host`'s (0 = A, 1 = B) end of the veth down or up: a silent host loss."""
        ip("-n", self.ns[host], "link", "set", IFACE, "up" if up else "down")

    def traffic(self) -> dict[str, tuple[int, int]]:
        """{namespace: (rx_bytes, tx_bytes)} of each end of the veth."""
        out = {}
        for ns in self.ns:
            stats = json.loads(ip("-n", ns, "-j", "-s", "link", "show", IFACE).stdout)[0]
            s = stats.get("stats64", stats.get("stats"))
            out[ns] = (int(s["rx"]["bytes"]), int(s["tx"]["bytes"]))
        return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Run an MPI command with one rank per simulated host (two network "
                    "namespaces joined by a veth pair).",
        usage="%(prog)s [--ppn N] [--timeout S] -- COMMAND ...")
    parser.add_argument("--ppn", type=int, default=1, help="ranks per host [1]")
    parser.add_argument("--timeout", type=float, default=None,
                        help="kill everything after this many seconds (exit 124)")
    parser.add_argument("--mpiexec", default=None,
                        help="hydra's mpiexec [the one beside this Python]")
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("no command given (put it after --)")
    why = problem()
    if why:
        print(f"two_hosts: cannot run here: {why}", file=sys.stderr)
        return 2
    with TwoHosts(mpiexec=args.mpiexec) as hosts:
        proc = subprocess.Popen(hosts.mpiexec_argv(command, args.ppn), env=hosts.env())
        forward = lambda signum, _frame: proc.send_signal(signum)  # noqa: E731
        old = {s: signal.signal(s, forward)
               for s in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)}
        try:
            try:
                rc = proc.wait(timeout=args.timeout)
            except subprocess.TimeoutExpired:
                print(f"two_hosts: --timeout {args.timeout:g} s: killing the job",
                      file=sys.stderr)
                rc = 124
        finally:
            for s, h in old.items():
                signal.signal(s, h)
            traffic = hosts.traffic()
        a, b = (traffic[ns] for ns in hosts.ns)
        print(f"two_hosts: {a[1] / 1e6:.1f} MB hostA->hostB, {b[1] / 1e6:.1f} MB hostB->hostA "
              "over the veth", file=sys.stderr)
    # (leaving the with-block killed whatever was still running in either namespace)
    try:
        proc.wait(timeout=IP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        pass
    if hosts.left_alive:
        print(f"two_hosts: pids {hosts.left_alive} survived SIGKILL", file=sys.stderr)
    return rc


if __name__ == "__main__":
    sys.exit(main())

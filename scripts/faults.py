"""partrain's own fault-injection harness (a benchmark, not a timed test).

K trials on a small synthetic store. Each starts `partrain fit --workers 2` (or, with
`--backend mpi`, `mpiexec -n 2 partrain fit --backend mpi --workers 1`) in its own process group,
injects one random fault at a random moment of the run, and checks:

- gone: the seconds from the fault until every process of the run has exited (a hang: > 60 s);
- the exit code the README promises for that fault, and one clean line (no traceback);
- /dev/shm and the temp folder as they were before the trial, once the next run has started
  (the resume, or a one-step run when there is nothing to resume: a SIGKILL of the whole group
  leaves blocks that the next start removes; nothing else may);
- no orphan: no process of the group left;
- the last checkpoint loads, and `fit --resume` (or, when the fault came before the first
  checkpoint, the same `fit` again under the same --name) ends bit-identical to an undisturbed run.

Faults: worker SIGKILL / SIGSTOP / exception (an out-of-range label written into the shared
labels block, so the worker's own code raises), parent SIGINT / SIGTERM / SIGKILL, group SIGINT
(a terminal's Ctrl-C) / SIGKILL, /dev/shm full (a 1 MiB tmpfs in a private mount namespace) and
disk full while checkpointing (the runs folder on a small tmpfs there). With --backend mpi: rank
SIGKILL / SIGSTOP, mpiexec SIGINT / SIGTERM, group SIGKILL. worker-kill-restart: a worker
SIGKILLed in a run with --on-worker-failure restart, which must finish (rc 0) bit-identical.

    python scripts/faults.py --trials 200            # prints a table and the one-line total
    python scripts/faults.py --trials 30 --json out.json
Exit status 0 only when every total is zero and every resume is exact.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from procs import alive, descendants, group  # noqa: E402  (the tests' process helpers)
from synthetic import make_tiny_store  # noqa: E402

from partrain.checkpoint import load_checkpoint  # noqa: E402
from partrain.errors import PartrainError  # noqa: E402

LOCAL_FAULTS = ["worker-kill", "worker-kill-restart", "worker-stop", "worker-exception",
                "parent-int", "parent-term",
                "parent-kill", "group-int", "group-kill", "shm-full", "disk-full"]
MPI_FAULTS = ["rank-kill", "rank-stop", "launcher-int", "launcher-term", "group-kill"]
HANG_S = 60.0       # local: a run still there this long after its fault hangs
HANG_S_MPI = 150.0  # MPI: the watchdog's start-up and exit deadline is 120 s
EXPECTED = {"worker-kill": {1}, "worker-stop": {1}, "worker-exception": {1},
            "worker-kill-restart": set(),  # --on-worker-failure restart: the run must finish
            # -2 / -15: the signal came while Python itself was starting, before any line of
            # partrain ran (the first ~10 ms): the default action, as for any program
            "parent-int": {130, -2}, "parent-term": {143, -15}, "parent-kill": {-9},
            "group-int": {130, -2},
            "group-kill": {-9}, "shm-full": {1}, "disk-full": {1},
            "rank-kill": {1, 9, 137, -9}, "rank-stop": {70}, "launcher-int": {130},
            "launcher-term": {143}}


# ------------------------------------------------------------------------------ processes
def cmdline(pid: int) -> bytes:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read()
    except OSError:
        return b""


def tree(root: int) -> list[int]:
    """Every live process below `root` (an MPI launcher's ranks leave its process group)."""
    return [p for p in descendants(root) if alive(p)]


def workers(pgid: int) -> list[int]:
    """The worker processes: children of the forkserver (same command line as it)."""
    members = group(pgid)
    servers = [p for p in members if b"from multiprocessing.forkserver import main" in cmdline(p)]
    parents = {}
    for p in members:
        try:
            with open(f"/proc/{p}/stat") as f:
                parents[p] = int(f.read().rsplit(")", 1)[1].split()[1])
        except OSError:
            pass
    return sorted(p for p, pp in parents.items() if pp in servers)


def ranks(root: int) -> list[int]:
    """The ranks that have initialised MPI (they have a worker: tracker, forkserver and worker
    below them). Before MPI_Init is done a stopped rank hangs the job: MPI_Init has no timeout
    (README, Reliability), so the harness does not stop ranks there."""
    return sorted(p for p in tree(root) if len(tree(p)) >= 3
                  if b"partrain" in cmdline(p) and b"mpiexec" not in cmdline(p)
                  and b"forkserver" not in cmdline(p) and b"resource_tracker" not in cmdline(p))


def snapshot(tmp: str) -> set[str]:
    shm = {f"shm:{n}" for n in os.listdir("/dev/shm") if n.startswith("partrain-")}
    return shm | {f"tmp:{n}" for n in os.listdir(tmp)}


def mount_namespaces() -> bool:
    probe = subprocess.run(["unshare", "-m", "sh", "-c", "mount -t tmpfs tmpfs /dev/shm"],
                           capture_output=True) if shutil.which("unshare") else None
    return probe is not None and probe.returncode == 0


def default_sigint():
    signal.signal(signal.SIGINT, signal.SIG_DFL)


# ------------------------------------------------------------------------------ one trial
class Harness:
    def __init__(self, work: Path, backend: str, epochs: int):
        self.work, self.backend, self.epochs = work, backend, epochs
        self.store = make_tiny_store(work / "data" / "cifar10.h5", 2000, 200)
        self.tmp = work / "tmp"
        self.tmp.mkdir()
        self.env = {**os.environ, "TMPDIR": str(self.tmp), "PYTHONFAULTHANDLER": "1"}
        self.reference, self.ref_s = None, None

    def argv(self, runs: Path, name: str, *extra) -> list[str]:
        fit = ["fit", "--model", "three-layer", "--model-option", "num_filters=8",
               "--model-option", "hidden_dim=32", "--batch-size", "50", "--epochs",
               str(self.epochs), "--val-size", "200", "--data-dir", str(self.store.parent),
               "--runs-dir", str(runs), "--name", name, "--quiet", *extra]
        py = [sys.executable, "-m", "partrain"]
        if self.backend == "mpi":
            mpiexec = str(Path(sys.executable).parent / "mpiexec")
            return [mpiexec, "-n", "2", *py, *fit, "--backend", "mpi", "--workers", "1",
                    "--step-timeout", "10"]
        return [*py, *fit, "--workers", "2"]

    def start(self, argv, namespace: str | None = None) -> subprocess.Popen:
        if namespace is not None:  # a private mount namespace with one small tmpfs
            argv = ["unshare", "-m", "sh", "-c", namespace, "sh", *argv]
        return subprocess.Popen(argv, cwd=self.work, env=self.env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, start_new_session=True,
                                preexec_fn=default_sigint)

    def make_reference(self) -> None:
        t0 = time.monotonic()
        p = self.start(self.argv(self.work / "ref", "ref"))
        out, err = p.communicate(timeout=600)
        if p.returncode != 0:
            sys.exit(f"the undisturbed run failed (rc {p.returncode}):\n{err}")
        self.ref_s = time.monotonic() - t0
        self.reference = load_checkpoint(self.work / "ref" / "ref" / "checkpoint.h5")[0]

    def trial(self, i: int, fault: str, rng: random.Random) -> dict:
        runs = self.work / f"runs{i}"
        runs.mkdir()
        before = snapshot(str(self.tmp))
        delay = rng.uniform(0.0, self.ref_s)
        namespace = None
        if fault == "shm-full":
            namespace = 'mount -t tmpfs -o size=1m tmpfs /dev/shm && exec "$@"'
        elif fault == "disk-full":
            size = rng.randint(100, 1500)  # KiB: room for some checkpoints, not for all
            namespace = (f'mount -t tmpfs -o size={size}k tmpfs {runs} && "$@"; rc=$?; '
                         f'cp -a {runs} {runs}.out 2>/dev/null; exit $rc')
        extra = ["--on-worker-failure", "restart"] if fault.endswith("-restart") else []
        p = self.start(self.argv(runs, "r", *extra), namespace)
        t_fault = self.inject(p, fault, delay)
        gone_s, hung = self.wait_gone(p, t_fault)
        out, err = p.communicate()
        if fault == "disk-full":
            shutil.rmtree(runs)
            if (Path(f"{runs}.out")).exists():
                Path(f"{runs}.out").rename(runs)
            else:
                runs.mkdir()
        rc = p.returncode
        result = {"trial": i, "fault": fault, "at_s": round(delay, 2), "rc": rc,
                  "gone_s": round(gone_s, 2), "hang": hung,
                  "orphans": self.left_behind,
                  "traceback": "Traceback" in err or "Exception ignored" in err,
                  "finished": rc == 0}
        result["bad_exit"] = not (rc == 0 or rc in EXPECTED.get(fault, set()))
        result["message"] = (err.strip().splitlines() or [""])[-1][:120]
        if result["traceback"] or result["hang"]:
            result["stderr_tail"] = err[-3000:]  # what to look at
        if rc == 1 and not result["message"].startswith(("Error:", "Abort")):
            result["bad_exit"] = True
        self.check_checkpoint_and_resume(runs, result)
        after = snapshot(str(self.tmp))
        result["leaks"] = sorted(after - before)
        return result

    def inject(self, p: subprocess.Popen, fault: str, delay: float) -> float:
        deadline = time.monotonic() + delay
        if fault in ("shm-full", "disk-full"):
            return time.monotonic()
        while time.monotonic() < deadline and p.poll() is None:
            time.sleep(0.005)
        target = p.pid
        if fault.startswith(("worker", "rank")):  # the moment is the first after `delay`
            pick = workers if fault.startswith("worker") else ranks
            while p.poll() is None and not pick(p.pid):
                time.sleep(0.002)
            found = pick(p.pid)
            if not found:
                return time.monotonic()
            target = random.choice(found)
        t = time.monotonic()
        try:
            if fault in ("worker-kill", "rank-kill", "worker-kill-restart"):
                os.kill(target, signal.SIGKILL)
            elif fault in ("worker-stop", "rank-stop"):
                os.kill(target, signal.SIGSTOP)
            elif fault == "worker-exception":
                self.poison_labels(p.pid)
            elif fault in ("parent-int", "launcher-int"):
                os.kill(target, signal.SIGINT)
            elif fault in ("parent-term", "launcher-term"):
                os.kill(target, signal.SIGTERM)
            elif fault == "parent-kill":
                os.kill(target, signal.SIGKILL)
            elif fault == "group-int":
                os.killpg(p.pid, signal.SIGINT)
            elif fault == "group-kill":
                os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        return t

    @staticmethod
    def poison_labels(pid: int) -> None:
        """Write label 200 over the shared labels: the next step's loss raises in a worker."""
        for name in os.listdir("/dev/shm"):
            if name.startswith(f"partrain-{pid}-") and name.endswith("-labels"):
                path = f"/dev/shm/{name}"
                with open(path, "r+b") as f:
                    size = os.path.getsize(path)
                    f.write(np.full(size, 200, np.uint8).tobytes())

    def wait_gone(self, p: subprocess.Popen, t_fault: float) -> tuple[float, bool]:
        """Until the run's processes are all gone: its process group and every process seen
        below it (an MPI launcher puts its ranks in groups of their own)."""
        seen: set[int] = set()
        while True:
            seen.update(group(p.pid), tree(p.pid))
            left = [pid for pid in seen if alive(pid)]
            if p.poll() is not None and not left:
                self.left_behind = 0
                return time.monotonic() - t_fault, False
            if time.monotonic() - t_fault > (HANG_S_MPI if self.backend == "mpi" else HANG_S):
                self.left_behind = len(left) - (p.poll() is None)  # besides the parent itself
                for pid in left:
                    try:
                        os.kill(pid, signal.SIGCONT)
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                p.wait()
                return time.monotonic() - t_fault, True
            time.sleep(0.01)

    def check_checkpoint_and_resume(self, runs: Path, result: dict) -> None:
        """The last checkpoint loads; the run, resumed (or restarted), ends as the reference."""
        run = runs / "r"
        ckpt = run / "checkpoint.h5"
        result["lost_checkpoint"] = False
        if ckpt.exists():
            try:
                load_checkpoint(ckpt)
            except PartrainError:
                result["lost_checkpoint"] = True
                result["resume_exact"] = False
                return
            argv = [sys.executable, "-m", "partrain", "fit", "--resume", str(run), "--quiet"]
            if self.backend == "mpi":
                argv = [str(Path(sys.executable).parent / "mpiexec"), "-n", "2", *argv,
                        "--backend", "mpi"]
            if result["finished"] or load_checkpoint(ckpt)[1]["epoch"] >= self.epochs:
                argv = None  # trained to the end (a fault in the test pass): nothing to resume
        else:  # before the first checkpoint: the same command again (the name must work)
            argv = self.argv(runs, "r")
        if argv is not None:
            p = self.start(argv)
            out, err = p.communicate(timeout=600)
            if p.returncode != 0:
                result["resume_exact"] = False
                result["resume_error"] = (err.strip().splitlines() or [""])[-1][:160]
                result["dead_end_folder"] = "already exists" in err
                return
        else:  # no next run of this one: start another briefly, whose start-up must sweep
            p = self.start(self.argv(runs, "next", "--max-steps", "1"))
            p.communicate(timeout=600)
            shutil.rmtree(runs / "next", ignore_errors=True)
        arrays = load_checkpoint(ckpt)[0]
        result["resume_exact"] = (arrays.keys() == self.reference.keys() and all(
            np.array_equal(arrays[k], self.reference[k]) for k in arrays))


# ------------------------------------------------------------------------------ report
def report(results: list[dict], ref_s: float) -> str:
    by = collections.defaultdict(list)
    for r in results:
        by[r["fault"]].append(r)
    lines = [f"undisturbed run: {ref_s:.1f} s", "",
             f"{'fault':<18}{'trials':>7}{'gone median s':>15}{'gone max s':>12}"
             f"{'exit codes':>22}{'resumed exact':>15}"]
    for fault, rs in sorted(by.items()):
        gone = [r["gone_s"] for r in rs]
        codes = ",".join(str(c) for c in sorted({r["rc"] for r in rs}))
        exact = sum(bool(r.get("resume_exact")) for r in rs)
        lines.append(f"{fault:<18}{len(rs):>7}{statistics.median(gone):>15.2f}"
                     f"{max(gone):>12.2f}{codes:>22}{f'{exact}/{len(rs)}':>15}")
    lines.append("")
    lines.append(total_line(results))
    return "\n".join(lines)


def totals(results: list[dict]) -> dict:
    return {"hangs": sum(r["hang"] for r in results),
            "leaks": sum(bool(r["leaks"]) for r in results),
            "orphans": sum(r["orphans"] > 0 for r in results),
            "tracebacks": sum(r["traceback"] for r in results),
            "bad exits": sum(r["bad_exit"] or bool(r.get("dead_end_folder")) for r in results),
            "lost checkpoints": sum(r["lost_checkpoint"] for r in results)}


def total_line(results: list[dict]) -> str:
    t = totals(results)
    exact = sum(bool(r.get("resume_exact")) for r in results)
    return (f"{len(results)} trials: " + ", ".join(f"{v} {k}" for k, v in t.items())
            + f", resume exact {exact}/{len(results)}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trials", type=int, default=30)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--backend", choices=["local", "mpi"], default="local")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--faults", default=None, help="comma-separated subset of the fault kinds")
    ap.add_argument("--json", type=Path, default=None, help="write every trial's record here")
    ap.add_argument("--keep", action="store_true", help="keep the work folder")
    args = ap.parse_args()
    kinds = (args.faults.split(",") if args.faults
             else MPI_FAULTS if args.backend == "mpi" else LOCAL_FAULTS)
    unknown = set(kinds) - set(LOCAL_FAULTS) - set(MPI_FAULTS)
    if unknown:
        ap.error(f"unknown fault kinds: {', '.join(sorted(unknown))}")
    if not mount_namespaces() and {"shm-full", "disk-full"} & set(kinds):
        print("note: no private mount namespace (unshare -m needs root): shm-full and disk-full "
              "left out", file=sys.stderr)
        kinds = [k for k in kinds if k not in ("shm-full", "disk-full")]
    rng = random.Random(args.seed)
    random.seed(args.seed)
    work = Path(tempfile.mkdtemp(prefix="partrain-faults."))
    try:
        h = Harness(work, args.backend, args.epochs)
        h.make_reference()
        results = []
        for i in range(args.trials):
            fault = kinds[i % len(kinds)]
            r = h.trial(i, fault, rng)
            results.append(r)
            flags = [k for k in ("hang", "traceback", "bad_exit", "lost_checkpoint") if r[k]]
            flags += ["leak"] if r["leaks"] else []
            flags += ["orphan"] if r["orphans"] else []
            flags += [] if r.get("resume_exact") else ["resume differs"]
            print(f"{i:>4} {fault:<17} at {r['at_s']:5.2f} s  rc {r['rc']:>4}  gone "
                  f"{r['gone_s']:5.2f} s  {' '.join(flags) or 'ok'}  {r['message'][:60]}"
                  + (f"  left: {' '.join(r['leaks'])}" if r["leaks"] else ""), flush=True)
        print()
        print(report(results, h.ref_s))
        if args.json:
            args.json.write_text(json.dumps({"reference_s": h.ref_s, "trials": results},
                                            indent=1))
        ok = not any(totals(results).values()) and all(r.get("resume_exact") for r in results)
        return 0 if ok else 1
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())

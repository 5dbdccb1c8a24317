"""Process helpers shared by the tests that start, kill and watch real processes."""
import os
import signal
import subprocess
import threading
import time

import pytest


def alive(pid: int) -> bool:
    """True if pid runs and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def children() -> dict[int, list[int]]:
    """{parent pid: [child pids]} of every process now running (from /proc)."""
    kids: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            kids.setdefault(ppid, []).append(int(d))
    return kids


def descendants(root: int) -> list[int]:
    """Every process below `root` (children, their children, ...)."""
    kids, out, todo = children(), [], [root]
    while todo:
        for k in kids.get(todo.pop(), []):
            out.append(k)
            todo.append(k)
    return out


def shm_leftovers(pid: int) -> list[str]:
    return sorted(n for n in os.listdir("/dev/shm") if n.startswith(f"partrain-{pid}-"))


def group(pgid: int) -> list[int]:
    """Live processes of process group `pgid` (the run and everything it started: the
    forkserver forks the workers inside the same group)."""
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == pgid and fields[0] != "Z":
                out.append(int(d))
    return out


class Proc:
    """A subprocess in its own session whose stderr is read as it comes (`wait_for`)."""

    def __init__(self, argv, cwd=None, env=None):
        self.proc = subprocess.Popen(argv, cwd=cwd, env=env, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True, start_new_session=True)
        self.pid = self.proc.pid
        self._err: list[str] = []
        self._new = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self):
        for line in self.proc.stderr:
            with self._new:
                self._err.append(line)
                self._new.notify_all()

    @property
    def err(self) -> str:
        with self._new:
            return "".join(self._err)

    def wait_for(self, text: str, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        with self._new:
            while text not in "".join(self._err):
                left = deadline - time.monotonic()
                if left <= 0 or (self.proc.poll() is not None and not self._reader.is_alive()):
                    pytest.fail(f"never saw {text!r} on stderr: rc={self.proc.poll()}\n"
                                + "".join(self._err))
                self._new.wait(min(left, 0.1))

    def finish(self, timeout=60.0):
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:  # a hang: its stacks (PYTHONFAULTHANDLER=1), then fail
            os.kill(self.pid, signal.SIGABRT)
            time.sleep(1.0)
            os.killpg(self.pid, signal.SIGKILL)
            self._reader.join(10)
            pytest.fail(f"still running after {timeout:g} s:\n{self.err[-6000:]}")
        self.t_exit = time.monotonic()
        self._reader.join(10)
        return self.proc.returncode, self.err

    def assert_clean(self, wait=20.0):
        """No shared memory and no process of this run left (allowing `wait` s to die out)."""
        deadline = time.monotonic() + wait
        while True:
            shm = shm_leftovers(self.pid)
            procs = group(self.pid)
            if not shm and not procs:
                return
            if time.monotonic() > deadline:
                pytest.fail(f"left behind: shared memory {shm}, processes {procs}")
            time.sleep(0.05)


def assert_quiet(err: str) -> None:
    """Nothing but the script's own lines: no traceback, no ignored exception, no leak warning."""
    assert "Traceback" not in err and "Exception ignored" not in err and "leaked" not in err, err


TIMED_COLUMNS = ("images_per_s", "time_s")


def untimed_history(run_dir) -> list[list[str]]:
    """A run folder's history.csv rows without the columns that time things (they differ
    between any two runs): what must be equal between runs that compute the same bits."""
    import csv
    with open(os.path.join(run_dir, "history.csv"), newline="") as f:
        rows = list(csv.reader(f))
    keep = [i for i, name in enumerate(rows[0]) if name not in TIMED_COLUMNS]
    return [[r[i] for i in keep] for r in rows]


def ctrl_c_after_a_step(cmd: list, run_dir, timeout: float = 120) -> tuple[str, str]:
    """Start the fit `cmd`, send it SIGINT once RUN_DIR/history.csv holds a step row (its
    handler is installed by then), and check it stopped as a Ctrl-C does (exit 130, checkpoint
    saved); returns its (stdout, stderr)."""
    import sys
    cut = subprocess.Popen([sys.executable, "-m", "partrain.cli", *map(str, cmd)], text=True,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    history = os.path.join(run_dir, "history.csv")
    deadline = time.monotonic() + timeout
    while not (os.path.exists(history) and "\nstep," in open(history).read()):
        assert cut.poll() is None and time.monotonic() < deadline, cut.communicate()
        time.sleep(0.005)
    cut.send_signal(signal.SIGINT)
    out, err = cut.communicate(timeout=timeout)
    assert cut.returncode == 130, (out, err)
    return out, err


def resume_matches(runs, *options, files=("checkpoint",), cut="cut", whole="whole") -> None:
    """`partrain fit --resume RUNS/CUT OPTIONS --quiet` succeeds and leaves the parameters and
    state of each of `files` (.h5) and the untimed history equal to RUNS/WHOLE's."""
    import sys
    from pathlib import Path
    from test_digests import digest
    runs = Path(runs)
    p = subprocess.run([sys.executable, "-m", "partrain.cli", "fit", "--resume",
                        str(runs / cut), *map(str, options), "--quiet"],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    for which in files:
        assert digest(runs / cut / f"{which}.h5") == digest(runs / whole / f"{which}.h5"), which
    assert untimed_history(runs / cut) == untimed_history(runs / whole)


def fit_quietly(data, runs, name, *args, check=True) -> subprocess.CompletedProcess:
    """`partrain fit ARGS --val-size 100 --quiet` into RUNS/NAME on the store folder DATA, as a
    real process; with check, it must succeed."""
    import sys
    p = subprocess.run([sys.executable, "-m", "partrain.cli", "fit", *map(str, args),
                        "--val-size", "100", "--quiet", "--data-dir", str(data),
                        "--runs-dir", str(runs), "--name", name],
                       capture_output=True, text=True, timeout=300)
    if check:
        assert p.returncode == 0, p.stderr
    return p

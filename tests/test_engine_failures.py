"""Failures with real processes: a training script (a ParallelRunner loop on a tiny store) runs in
a subprocess; the test kills a worker, presses Ctrl-C (SIGINT to the whole process group, as a
terminal does), or signals the parent, then checks the exit status, the message, that nothing is
left in /dev/shm and that every process the script started is gone.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from procs import alive

pytestmark = pytest.mark.slow

SCRIPT = textwrap.dedent('''
    import json, os, sys
    import numpy as np
    from partrain.datasets.store import load_store
    from partrain.errors import PartrainError
    from partrain.parallel.engine import Interrupted, ParallelRunner

    def descendants(root):
        kids = {}
        for d in os.listdir("/proc"):
            if d.isdigit():
                try:
                    with open(f"/proc/{d}/stat") as f:
                        ppid = int(f.read().rsplit(")", 1)[1].split()[1])
                except (OSError, ValueError, IndexError):
                    continue
                kids.setdefault(ppid, []).append(int(d))
        out, todo = [], [root]
        while todo:
            for k in kids.get(todo.pop(), []):
                out.append(k)
                todo.append(k)
        return out

    if __name__ == "__main__":
        store, info, model, batch, workers, log_dir = sys.argv[1:7]
        batch, workers = int(batch), int(workers)
        spec = {"linear": ("linear", {}),
                "cnn": ("three-layer", {"num_filters": 16, "hidden_dim": 64})}[model]
        data = load_store(store, splits=("train",))
        n = len(data.train_labels)
        labels = data.train_labels.copy()
        if sys.argv[7] == "bad-label":  # sample 15 of step 3: in worker 1's half of that batch
            labels[np.random.default_rng(0).permutation(n)[2 * batch + 15]] = 10
        t = 0
        try:
            with ParallelRunner(spec, ("adam", {"lr": 1e-3}), data.train_images,
                                labels, data.mean, data.std, n_workers=workers,
                                log_dir=log_dir) as r:
                epoch = 0
                while True:
                    r.set_order(np.random.default_rng(epoch).permutation(n))
                    epoch += 1
                    for lo in range(0, n - batch + 1, batch):
                        t += 1
                        r.step(lo, lo + batch, 1e-3, t)
                        if t == 2:
                            with open(info + ".tmp", "w") as f:
                                json.dump({"workers": r.worker_pids, "shm": r.shm_names,
                                           "all": descendants(os.getpid())}, f)
                            os.rename(info + ".tmp", info)
        except Interrupted:
            ok = np.isfinite(r.params).all()
            print(f"interrupted after step {t}, params finite: {ok}", file=sys.stderr)
            sys.exit(130)
        except KeyboardInterrupt:
            print(f"forced stop during step {t}", file=sys.stderr)
            sys.exit(130)
        except PartrainError as e:
            print(f"Error: {e}", file=sys.stderr)
            sys.exit(1)
''')



def _leftovers(pid: int) -> list[str]:
    return sorted(n for n in os.listdir("/dev/shm") if n.startswith(f"partrain-{pid}-"))


class Run:
    def __init__(self, tmp_path: Path, store: Path, model="linear", batch=20, workers=2,
                 fault="none"):
        script = tmp_path / "train_script.py"
        script.write_text(SCRIPT)
        self.info_path = tmp_path / "info.json"
        self.log_dir = tmp_path / "logs"
        self.proc = subprocess.Popen(
            [sys.executable, str(script), str(store), str(self.info_path), model, str(batch),
             str(workers), str(self.log_dir), fault],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
        deadline = time.monotonic() + 60
        while not self.info_path.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                out, err = self.proc.communicate(timeout=10)
                pytest.fail(f"training script did not start: rc={self.proc.returncode}\n{err}")
            time.sleep(0.02)
        self.info = json.loads(self.info_path.read_text())
        assert len(self.info["workers"]) == workers
        assert set(self.info["workers"]) <= set(self.info["all"])
        assert self.info["shm"]
        if fault == "none":  # (a faulty run may already have ended and cleaned up)
            assert set(self.info["shm"]) <= set(_leftovers(self.proc.pid))

    def finish(self, timeout=20.0):
        out, err = self.proc.communicate(timeout=timeout)
        self.t_exit = time.monotonic()
        return self.proc.returncode, err

    def assert_clean(self, wait=5.0):
        """No shared memory and no process of this run left (allowing `wait` s to die out)."""
        deadline = time.monotonic() + wait
        while True:
            shm = _leftovers(self.proc.pid)
            procs = [p for p in self.info["all"] if alive(p)]
            if not shm and not procs:
                return
            if time.monotonic() > deadline:
                pytest.fail(f"left behind: shared memory {shm}, processes {procs}")
            time.sleep(0.05)


def test_worker_killed_mid_epoch(tmp_path, tiny_store):
    run = Run(tmp_path, tiny_store)
    t0 = time.monotonic()
    os.kill(run.info["workers"][1], signal.SIGKILL)
    rc, err = run.finish()
    assert rc == 1
    assert "Error: worker 1 died (killed by signal 9 (SIGKILL))" in err
    assert run.t_exit - t0 < 3.0  # noticed within a second; the rest is cleanup and exit
    assert "Traceback" not in err and "leaked" not in err
    run.assert_clean(wait=2.0)


def test_ctrl_c_stops_at_a_step_boundary(tmp_path, tiny_store):
    run = Run(tmp_path, tiny_store)
    os.killpg(run.proc.pid, signal.SIGINT)  # what the terminal does: every process gets it
    rc, err = run.finish()
    assert rc == 130, err
    assert "stopping after this step" in err
    assert "interrupted after step" in err and "params finite: True" in err
    assert "Traceback" not in err and "leaked" not in err
    run.assert_clean(wait=2.0)


def test_second_ctrl_c_forces_exit_and_still_unlinks(tmp_path, tiny_store):
    run = Run(tmp_path, tiny_store, model="cnn", batch=250)  # long steps: both land mid-step
    os.killpg(run.proc.pid, signal.SIGINT)
    time.sleep(0.05)
    os.killpg(run.proc.pid, signal.SIGINT)
    t0 = time.monotonic()
    rc, err = run.finish()
    assert rc == 130, err
    assert "forced stop during step" in err
    assert run.t_exit - t0 < 3.0
    assert "leaked" not in err
    run.assert_clean(wait=2.0)


def test_sigterm_to_parent_cleans_up(tmp_path, tiny_store):
    run = Run(tmp_path, tiny_store)
    os.kill(run.proc.pid, signal.SIGTERM)
    rc, err = run.finish()
    assert rc == 128 + signal.SIGTERM, err
    assert "leaked" not in err
    run.assert_clean(wait=2.0)


def test_parent_killed_outright_workers_exit_and_tracker_unlinks(tmp_path, tiny_store):
    run = Run(tmp_path, tiny_store)
    os.kill(run.proc.pid, signal.SIGKILL)
    rc, err = run.finish()
    assert rc == -signal.SIGKILL
    # workers see EOF on their pipes; the resource tracker unlinks the blocks once all are gone
    run.assert_clean(wait=10.0)


def test_worker_error_reported_with_traceback_in_log(tmp_path, tiny_store):
    run = Run(tmp_path, tiny_store, fault="bad-label")  # step 3 fails in worker 1
    rc, err = run.finish()
    assert rc == 1
    line = [x for x in err.splitlines() if x.startswith("Error:")]
    assert line and line[0].startswith(
        "Error: worker 1 failed: IndexError: index 10 is out of bounds")
    assert "Traceback" not in err  # the traceback goes to the log, not the terminal
    log = line[0].rsplit("(traceback in ", 1)[1].rstrip(")")
    assert Path(log).parent == run.log_dir and "Traceback" in Path(log).read_text()
    run.assert_clean(wait=2.0)

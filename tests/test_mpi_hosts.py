"""The MPI backend across two simulated hosts: network namespaces joined by a veth pair.

One rank in each namespace ("hostA" 10.77.0.1, "hostB" 10.77.0.2, see scripts/two_hosts.py),
with the traffic forced over the veth (UCX over TCP), so these runs cross a real (virtual)
network link that a test can cut:

- a short three-layer run with 2 hosts x 1 worker ends with exit 0 and the same bits as one
  machine with 2 workers, and its gradients really crossed the veth (byte counters);
- a silent host loss (host B's link brought down mid-run), and a hung remote rank (SIGSTOP),
  end the job through the watchdog within --step-timeout + the abort grace + a margin, exit
  != 0, with no process left in either namespace and no partrain block in either host's
  /dev/shm.

Traffic never leaves loopback or the test's own veth: the namespaces have no other interface
and no route. Needs root and iproute2 (skipped with the reason otherwise) and mpi4py.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from hosts import MPIEXEC, TwoHosts, job_shm_blocks, leftovers, skip_reason, wait_until
from partrain.checkpoint import load_checkpoint
from partrain.parallel.mpi import ABORT_GRACE_S
from synthetic import make_tiny_store

SKIP = skip_reason()
pytestmark = [pytest.mark.mpi, pytest.mark.slow, pytest.mark.skipif(SKIP is not None,
                                                                    reason=SKIP or "")]

N_PARAMS = 17_162           # three-layer with num_filters=4, hidden_dim=16 (float32 gradients)
STEPS_PER_EPOCH = 45        # 450 training images (500 - --val-size 50), global batch 10
TINY = ["--model", "three-layer", "--model-option", "num_filters=4", "--model-option",
        "hidden_dim=16", "--batch-size", "10", "--val-size", "50", "--seed", "1"]
# Start-up of two ranks (imports, forkserver, workers, MPI over TCP) plus a short run takes a
# few seconds; 120 s holds on a loaded 2-core machine with the rest of the suite running.
RUN_TIMEOUT_S = 120
STEP_TIMEOUT_S = 4.0        # a tiny step takes milliseconds: 4 s never fires by accident
# A lost host ends the job once the watchdog fires (STEP_TIMEOUT_S after the last step), plus
# MPI_Abort's grace before os._exit (ABORT_GRACE_S); 10 s more for a loaded machine.
LOSS_BOUND_S = STEP_TIMEOUT_S + ABORT_GRACE_S + 10


@pytest.fixture
def hosts():
    assert MPIEXEC.exists(), f"{MPIEXEC} missing: pip install -e '.[test]' brings mpich"
    with TwoHosts(mpiexec=MPIEXEC) as h:
        yield h
    assert h.left_alive == [], f"processes survived SIGKILL in the namespaces: {h.left_alive}"
    assert leftovers() == []


def start_job(hosts: TwoHosts, tmp_path, *args) -> subprocess.Popen:
    """`partrain fit --backend mpi --workers 1 ARGS`, one rank on each host."""
    env = hosts.env()
    env["TMPDIR"] = str(tmp_path)    # each rank's log, and nothing else, in the test's folder
    cmd = [sys.executable, "-m", "partrain.cli", "fit", "--backend", "mpi", "--workers", "1",
           *map(str, args)]
    return subprocess.Popen(hosts.mpiexec_argv(cmd), cwd=tmp_path, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def veth_bytes_sent(hosts: TwoHosts) -> tuple[int, int]:
    """Bytes host A and host B each sent over the veth."""
    traffic = hosts.traffic()
    return traffic[hosts.ns[0]][1], traffic[hosts.ns[1]][1]


def test_two_hosts_train_the_same_bits_as_one_machine_with_two_workers(tmp_path, hosts):
    store = make_tiny_store(tmp_path / "data" / "cifar10.h5")
    common = [*TINY, "--epochs", "2", "--data-dir", store.parent,
              "--runs-dir", tmp_path / "runs"]
    local = subprocess.run([sys.executable, "-m", "partrain.cli", "fit", "--workers", "2",
                            *map(str, common), "--name", "local"], cwd=tmp_path,
                           capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    assert local.returncode == 0, local.stderr

    proc = start_job(hosts, tmp_path, *common, "--name", "hosts")
    out, err = proc.communicate(timeout=RUN_TIMEOUT_S)
    assert proc.returncode == 0, (out, err)
    assert "2 ranks x 1 worker(s)" in out

    # Bit-identical, not just close: each element of the global gradient is the sum of the two
    # half-batch sums in both set-ups (worker 0 + worker 1 on one machine, rank 0 + rank 1
    # across the hosts), and a two-term float sum does not depend on who adds.
    a, meta_a = load_checkpoint(tmp_path / "runs" / "local" / "checkpoint.h5")
    b, meta_b = load_checkpoint(tmp_path / "runs" / "hosts" / "checkpoint.h5")
    assert a.keys() == b.keys() and {"params", "opt.m", "opt.v"} <= set(a)
    for name in a:
        assert np.array_equal(a[name], b[name]), name
    assert meta_a["t"] == meta_b["t"] == 2 * STEPS_PER_EPOCH

    # The gradients crossed the veth (each step all-reduces the whole float32 vector, which
    # sends at least its size each way for 2 ranks), not a shared-memory shortcut.
    need = 0.9 * 2 * STEPS_PER_EPOCH * N_PARAMS * 4
    sent = veth_bytes_sent(hosts)
    assert min(sent) >= need, (sent, need)

    assert hosts.pids() == {ns: [] for ns in hosts.ns}  # the job left nothing running
    assert job_shm_blocks(hosts) == []


def remote_rank(hosts: TwoHosts) -> int:
    """pid of the rank on host B (the child of hydra's proxy there)."""
    for pid in hosts.pids()[hosts.ns[1]]:
        try:
            with open(f"/proc/{pid}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{ppid}/comm") as f:
                parent = f.read().strip()
        except OSError:
            continue
        if parent == "hydra_pmi_proxy":
            return pid
    raise AssertionError(f"no rank under hydra's proxy on host B: {hosts.pids()}")


@pytest.mark.parametrize("loss", ["link-down", "sigstop-remote"])
def test_a_silently_lost_host_ends_the_job_within_the_watchdog_bound(tmp_path, hosts, loss):
    store = make_tiny_store(tmp_path / "data" / "cifar10.h5")
    proc = start_job(hosts, tmp_path, *TINY, "--epochs", "500", "--step-timeout",
                     STEP_TIMEOUT_S, "--data-dir", store.parent, "--runs-dir", tmp_path / "runs",
                     "--name", "r", "--quiet")
    try:
        # Mid-run: 10 steps' gradients have crossed (500 epochs would take minutes).
        started = wait_until(lambda: min(veth_bytes_sent(hosts)) > 10 * N_PARAMS * 4
                             or proc.poll() is not None, RUN_TIMEOUT_S)
        assert started and proc.poll() is None, (proc.returncode, proc.stderr.read())
        job_pids = hosts.pids()
        if loss == "link-down":     # host B vanishes: no FIN, no RST, its packets are dropped
            hosts.link(1, up=False)
        else:                       # the rank on host B hangs; its host and link stay up
            os.kill(remote_rank(hosts), signal.SIGSTOP)
        t0 = time.monotonic()
        out, err = proc.communicate(timeout=LOSS_BOUND_S)
        ended = time.monotonic() - t0
    finally:
        if proc.poll() is None:     # (hosts.down() kills it anyway; this only reaps it)
            proc.kill()
            proc.wait(timeout=10)
    assert proc.returncode != 0, (out, err)
    assert ended < LOSS_BOUND_S
    # The watchdog said why. Its line is printed just before MPI_Abort, and in about 1 run in 15
    # hydra tears the job down before forwarding it (stderr then is empty, rc still 70); the
    # rank's own log (in TMPDIR, here tmp_path) always has it.
    why = "no step finished within 4 s (--step-timeout)"
    logs = "".join(f.read_text() for f in tmp_path.glob("partrain-rank*.log"))
    assert why in err or why in logs, (proc.returncode, out, err, logs)

    # Every process of the job is gone from both hosts: rank A, its forkserver and worker,
    # hydra's proxies, and on host B the rank and its workers (os._exit after MPI_Abort could
    # not reach the launcher, or killed by the proxy).
    gone = wait_until(lambda: not any(hosts.pids().values()), LOSS_BOUND_S - ended)
    assert gone, {ns: [(p, _cmdline(p)) for p in pids] for ns, pids in hosts.pids().items()}
    assert all(pids for pids in job_pids.values())  # (there were processes on both to check)
    assert job_shm_blocks(hosts) == []


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline") as f:
            return f.read().replace("\0", " ")[:200]
    except OSError:
        return "?"

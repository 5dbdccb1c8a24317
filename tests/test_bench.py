"""The scaling benchmark: its arithmetic, and one tiny real run through the CLI."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from partrain.bench import (PARTS, BenchConfig, _measure, add_efficiency, default_workers,
                            format_table)
from partrain.cli import main
from partrain.memory import describe, peak_rss_bytes, pss_bytes, usage
from partrain.parallel.engine import StepTimes, usable_cores


def test_default_workers():
    assert default_workers(1) == [1]
    assert default_workers(2) == [1, 2]
    assert default_workers(6) == [1, 2, 4, 6]
    assert default_workers(8) == [1, 2, 4, 8]


def test_efficiency_and_speedup():
    rows = [{"reduction": "sharded", "batch": 50, "workers": n, "images_per_s": ips}
            for n, ips in [(1, 100.0), (2, 180.0), (4, 300.0)]]
    rows.append({"reduction": "parent", "batch": 50, "workers": 2, "images_per_s": 150.0})
    rows.append({"reduction": "parent", "batch": 50, "workers": 4, "images_per_s": 240.0})
    add_efficiency(rows)
    assert [r["speedup"] for r in rows[:3]] == [1.0, 1.8, 3.0]
    assert [r["efficiency"] for r in rows[:3]] == [1.0, 0.9, 0.75]
    # no N = 1 row: the smallest N is the reference, counted as perfectly efficient
    assert rows[3]["efficiency"] == 1.0 and rows[4]["efficiency"] == 0.8
    assert "effic." in format_table(rows) and "75%" in format_table(rows)


def test_pss_of_this_process():
    assert pss_bytes(os.getpid()) > 1 << 20
    assert pss_bytes(2**31 - 1) is None


def test_peak_rss_sees_a_transient_allocation():
    """VmHWM keeps the peak after the memory is given back: 200 MiB touched and freed show."""
    before = peak_rss_bytes(os.getpid())
    block = np.ones(200 * 2**20, np.uint8)
    del block
    assert peak_rss_bytes(os.getpid()) >= max(before, 200 * 2**20)
    assert peak_rss_bytes(2**31 - 1) is None


def test_usage_and_its_line():
    mem = usage([])
    assert mem["total_pss_mib"] > 1 and mem["parent_peak_rss_mib"] >= mem["total_pss_mib"] / 2
    assert mem["worker_peak_rss_mib"] is None
    assert usage([2**31 - 1])["total_pss_mib"] is None  # a worker whose figures are gone
    line = describe({"total_pss_mib": 1434.0, "parent_peak_rss_mib": 320.0,
                     "worker_peak_rss_mib": 560.0})
    assert line == ("memory: 1.40 GiB in all (PSS); peak resident 0.31 GiB parent, "
                    "0.55 GiB largest worker")
    assert describe({"total_pss_mib": None, "parent_peak_rss_mib": None,
                     "worker_peak_rss_mib": None}) == ""


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


class FakeRunner:
    """Each step: `outside` s pass before the step's own clock starts (the parent waiting for a
    core, as on a busy machine), then a 2.0 s step of known worker phases."""

    def __init__(self, clock, outside):
        self.clock, self.outside, self.steps = clock, outside, 0

    def step(self, lo, hi, lr, t):
        self.clock.now += self.outside
        self.clock.now += 2.0
        self.last_times = StepTimes(2.0, np.array([1.0, 1.2]), np.array([0.2, 0.3]),
                                    np.array([0.1, 0.1]))
        self.steps += 1
        return 0.0, 0


@pytest.mark.parametrize("outside", [0.0, 0.5, 7.0])
def test_breakdown_adds_up_to_the_step_time(outside):
    """With a fake clock: every second of a step is in exactly one named part, also when most of
    it is spent outside runner.step (a loaded machine), and warm-up steps are not counted."""
    clock = FakeClock()
    runner = FakeRunner(clock, outside)
    row, t = _measure(runner, batch=10, n_images=100, cfg=BenchConfig(steps=4, warmup=2), t=0,
                      clock=clock)
    assert t == 6 and runner.steps == 6
    assert row["step_ms"] == pytest.approx(1e3 * (2.0 + outside))
    expected = {"compute": 1.1, "wait": 0.1 + 0.05, "reduction": 0.25, "optimizer": 0.1,
                "signalling": 2.0 - 1.6, "between_steps": outside}
    for key, seconds in expected.items():
        assert row[f"{key}_ms"] == pytest.approx(1e3 * seconds), key
    assert sum(row[f"{k}_ms"] for k in PARTS) == pytest.approx(row["step_ms"])


@pytest.mark.slow
def test_bench_command_tiny_run(tmp_path):
    too_many = usable_cores() + 1
    out = tmp_path / "bench"
    result = CliRunner().invoke(main, [
        "bench", "--model", "linear", "--workers", f"1,{too_many}", "--batch-size", "8,16",
        "--steps", "3", "--warmup", "1", "--synthetic", "200", "--out-dir", str(out)])
    assert result.exit_code == 0, result.output
    assert f"warning: {too_many} workers but only {usable_cores()} usable cores" in result.output
    data = json.loads((out / "scaling.json").read_text())
    rows = data["rows"]
    assert len(rows) == 2 * 2 * 2  # reductions x workers x batches
    assert data["meta"]["usable_cores"] == usable_cores()
    for r in rows:
        assert r["images_per_s"] > 0 and r["memory_pss_mib"] > 0 and r["shm_mib"] > 0
        assert r["worker_peak_mib"] > 0 and r["parent_peak_mib"] > 0
        # that the parts add up is tested exactly below; here only that every one is reported
        assert all(r[f"{k}_ms"] >= 0 for k in PARTS)
        if r["workers"] == 1:
            assert r["efficiency"] == 1.0
    assert (out / "scaling.csv").read_text().startswith("batch,")
    assert (out / "scaling.png").stat().st_size > 1000


def test_bench_rejects_bad_lists():
    result = CliRunner().invoke(main, ["bench", "--workers", "1,x"])
    assert result.exit_code == 1 and "comma-separated integers" in result.output


def test_bench_kernels_prints_rates_and_writes_json(tmp_path):
    """`partrain bench --kernels`: per-phase times and the fraction of the GEMM rate, as JSON too."""
    import json

    from click.testing import CliRunner

    from partrain.cli import main

    res = CliRunner().invoke(main, ["bench", "--kernels", "--model", "linear", "--batch-size", "8,16",
                                    "--steps", "2", "--layers", "--out-dir", str(tmp_path)])
    assert res.exit_code == 0, res.output
    assert "GEMM" in res.output and "of GEMM" in res.output
    data = json.loads((tmp_path / "kernels.json").read_text())
    assert [r["batch"] for r in data["rows"]] == [8, 16]
    for r in data["rows"]:
        assert r["step_ms"] > 0 and 0 < r["fraction_of_gemm"] < 2
        assert r["layers"] and r["images_per_s"] == pytest.approx(r["batch"] / (r["step_ms"] / 1e3))


def test_mpi_estimate_is_a_ring_allreduce_on_top_of_the_local_step():
    from partrain.bench_mpi import estimates, ring_seconds
    assert ring_seconds(1e9, 1, 1e9) == 0.0
    assert ring_seconds(1e9, 2, 1e9) == pytest.approx(1.0)     # 2(K-1)/K = 1
    assert ring_seconds(1e9, 4, 1e9) == pytest.approx(1.5)
    rows = [{"rank": 0, "ranks": 2, "batch": 100, "step_ms": 30.0, "cross_ms": 10.0,
             "grad_mib": 1000 / 2**20 * 1e6 / 1e3},              # 1e6 bytes of gradient
            {"rank": 1, "ranks": 2, "batch": 100, "step_ms": 31.0, "cross_ms": 9.0,
             "grad_mib": 1.0}]
    est = {(e["machines"], e["bandwidth_gb_s"]): e for e in estimates(rows, [1.0])}
    # local part 20 ms (rank 0's step minus its cross-machine time); 1 MB at 1 GB/s, K = 4: 1.5 ms
    assert est[(4, 1.0)]["step_ms"] == pytest.approx(21.5, abs=0.01)
    assert est[(4, 1.0)]["batch_per_machine"] == 50
    assert est[(2, 1.0)]["cross_share"] == pytest.approx(1.0 / 21.0, abs=1e-4)


MPIEXEC = Path(sys.executable).parent / "mpiexec"


@pytest.mark.slow
@pytest.mark.mpi
@pytest.mark.skipif(importlib.util.find_spec("mpi4py") is None, reason="mpi4py not installed")
def test_bench_across_two_ranks_reports_every_rank(tmp_path):
    out = tmp_path / "bench"
    p = subprocess.run([str(MPIEXEC), "-n", "2", sys.executable, "-m", "partrain.cli", "bench",
                        "--backend", "mpi", "--model", "linear", "--workers", "1",
                        "--batch-size", "16", "--steps", "3", "--warmup", "1", "--synthetic",
                        "200", "--out-dir", str(out)], capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    data = json.loads((out / "mpi.json").read_text())
    assert sorted(r["rank"] for r in data["rows"]) == [0, 1]
    for r in data["rows"]:
        assert r["ranks"] == 2 and 0 < r["cross_ms"] < r["step_ms"] and r["bandwidth_gb_s"] > 0
    assert {e["machines"] for e in data["estimates"]} == {2, 4, 8, 16, 32}
    assert "cross share" in p.stdout

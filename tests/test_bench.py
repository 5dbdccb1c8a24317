"""The scaling benchmark: its arithmetic, and one tiny real run through the CLI."""
from __future__ import annotations

import json
import os

import pytest
from click.testing import CliRunner

from partrain.bench import add_efficiency, default_workers, format_table, pss_bytes
from partrain.cli import main
from partrain.parallel.engine import usable_cores


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
        parts = sum(r[f"{k}_ms"] for k in ("compute", "wait", "reduction", "optimizer",
                                           "signalling"))
        assert parts == pytest.approx(r["step_ms"], rel=0.2)
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

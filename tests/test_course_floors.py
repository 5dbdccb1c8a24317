"""scripts/course_floors.py: the floors it reports are the sums of the parts it timed."""
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "course_floors.py"


def _load():
    spec = importlib.util.spec_from_file_location("course_floors", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_floors_add_up_and_targets_follow_the_issue():
    """One round, so each median is that round's figure and the sums must hold exactly."""
    cf = _load()
    r = cf.floors(8, 1)
    one, two = r["one_thread"], r["two_workers"]
    assert len(one["products_ms"]) == 5 and all(ms > 0 for ms in one["products_ms"].values())
    assert one["floor_ms"] == pytest.approx(sum(one["products_ms"].values())
                                            + one["adam_memory_floor_ms"])
    assert one["target_step_ms"] == pytest.approx(r["nominal_gflop"] / (0.75 * r["gemm_gflops"]) * 1e3)
    assert two["floor_ms"] == pytest.approx(two["half_batch_compute_ms"]
                                            + two["row_parallel_half_ms"] + two["adam_half_ms"])
    assert two["target_step_ms"] == pytest.approx(one["step_ms"] / (2 * 0.90))
    assert two["floor_efficiency"] == pytest.approx(one["step_ms"] / (2 * two["floor_ms"]))
    assert one["floor_over_target"] == pytest.approx(one["floor_ms"] / one["target_step_ms"])
    assert "floor" in cf.report(r)


def test_command_line_writes_json(tmp_path):
    out = tmp_path / "floors.json"
    done = subprocess.run([sys.executable, str(SCRIPT), "--batch-size", "4", "--rounds", "1",
                           "--json", str(out)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "batch 4:" in done.stdout
    assert json.loads(out.read_text())[0]["batch"] == 4

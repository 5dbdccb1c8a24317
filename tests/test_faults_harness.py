"""scripts/faults.py in CI: 30 random faults (every kind three times) on a small store, each
checked for hangs, leaks, orphans, tracebacks, exit codes, lost checkpoints and an exact resume.
The totals must all be zero. A benchmark run with more trials is in BENCHMARKS.md."""
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "faults.py"


def test_thirty_faults_leave_nothing_wrong(tmp_path):
    out = subprocess.run([sys.executable, str(SCRIPT), "--trials", "30", "--seed", "1",
                          "--json", str(tmp_path / "faults.json")],
                         capture_output=True, text=True, timeout=1200)
    total = [line for line in out.stdout.splitlines() if line.startswith("30 trials:")]
    assert total, out.stdout + out.stderr
    assert total[0] == ("30 trials: 0 hangs, 0 leaks, 0 orphans, 0 tracebacks, 0 bad exits, "
                        "0 lost checkpoints, resume exact 30/30"), out.stdout + out.stderr
    assert out.returncode == 0

"""Bad settings are one `Error:` line and exit 1, before anything is created (issue 11, D2, D5,
D6, D10): no traceback, no run folder, nothing outside --runs-dir."""
from __future__ import annotations

import re

import pytest
from click.testing import CliRunner

from partrain.cli import main

BASE = ["fit", "--batch-size", "50", "--workers", "1", "--val-size", "100", "--epochs", "1",
        "--quiet"]

CASES = {
    "lr zero": (["--lr", "0"], "--lr must be more than 0"),
    "lr nan": (["--lr", "nan"], "--lr must be a finite number"),
    "lr negative": (["--lr", "-1"], "--lr must be more than 0"),
    "weight decay": (["--weight-decay", "-1"], "--weight-decay must be at least 0"),
    "seed": (["--seed", "-1"], "--seed must be at least 0"),
    "warm-up nan": (["--warmup-epochs", "nan"], "--warmup-epochs must be a finite number"),
    "momentum nan": (["--momentum", "nan"], "--momentum must be a finite number"),
    "log every": (["--log-every", "0"], "--log-every must be at least 1"),
    "workers zero": (["--workers", "0"], "--workers must be at least 1"),
    "option text": (["--model-option", "num_filters=abc"], "num_filters must be a whole number"),
    "option negative": (["--model-option", "num_filters=-3"], "num_filters must not be negative"),
    "option unknown": (["--model-option", "nope=3"], "model three-layer has no option nope"),
    "option misspelt": (["--model-option", "hiden_dim=3"], "has no option hiden_dim"),
    "even filter": (["--model-option", "filter_size=4"], "filter_size must be odd"),
    "vgg width": (["--model", "vgg", "--model-option", "widths=[8,0]"], r"widths\[1\] must be"),
    "name escapes": (["--name", "../outside"], "must be a plain folder name"),
    "name absolute": (["--name", "/tmp/partrain-absolute-name"], "must be a plain folder name"),
}


@pytest.mark.parametrize("case", CASES)
def test_bad_setting_is_one_line_and_creates_nothing(case, tiny_store, tmp_path):
    args, message = CASES[case]
    runs = tmp_path / "sub" / "runs"
    result = CliRunner().invoke(main, [*BASE, *args, "--data-dir", str(tiny_store.parent),
                                       "--runs-dir", str(runs)])
    assert result.exit_code == 1, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    assert re.search(message, lines[0]), lines[0]
    assert not (tmp_path / "sub").exists()  # no runs folder, and nothing beside it
    assert not (tmp_path / "outside").exists()

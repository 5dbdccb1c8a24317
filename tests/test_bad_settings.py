"""Bad settings are one `Error:` line and exit 1, before anything is created (issue 11, D2, D5,
D6, D10): no traceback, no run folder, nothing outside --runs-dir. A damaged run folder (its
config.json or checkpoint) is one line too, for `fit --resume` and `evaluate`, and stays as it
was (D2, D13)."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from partrain.checkpoint import load_checkpoint, save_checkpoint
from partrain.cli import main
from synthetic import make_tiny_store

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
    "warm-up huge": (["--warmup-epochs", "1e308"], "--warmup-epochs 1e\\+308 exceeds --epochs 1"),
    "momentum 1": (["--optimizer", "sgd", "--momentum", "1"], "--momentum must be less than 1"),
    "translate huge": (["--translate", "1000000"], "--translate must be at most 32"),
    "workers zero": (["--workers", "0"], "--workers must be at least 1"),
    "option text": (["--model-option", "num_filters=abc"], "num_filters must be a whole number"),
    "option negative": (["--model-option", "num_filters=-3"], "num_filters must not be negative"),
    "option unknown": (["--model-option", "nope=3"], "model three-layer has no option nope"),
    "option misspelt": (["--model-option", "hiden_dim=3"], "has no option hiden_dim"),
    "even filter": (["--model-option", "filter_size=4"], "filter_size must be odd"),
    "input size": (["--model-option", "input_size=7"], r"input_size=7, but .*cifar10.h5 holds 32x32 images of 10 classes"),
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


# ------------------------------------------------------------- a damaged run folder (D2, D13)
TINY = ["--workers", "1", "--model-option", "num_filters=2", "--model-option", "hidden_dim=4",
        "--batch-size", "50", "--val-size", "50", "--quiet"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A run stopped 4 steps into its second epoch (9 steps each): best.h5 and checkpoint.h5."""
    root = tmp_path_factory.mktemp("trained")
    store = make_tiny_store(root / "data" / "cifar10.h5")
    result = CliRunner().invoke(main, ["fit", *TINY, "--epochs", "2", "--max-steps", "13",
                                       "--data-dir", str(store.parent), "--runs-dir",
                                       str(root / "runs"), "--name", "r"])
    assert result.exit_code == 0, result.output
    return root / "runs" / "r"


@pytest.fixture
def run(trained, tmp_path):
    return Path(shutil.copytree(trained, tmp_path / "r"))


def _edit_config(run: Path, edit) -> None:
    meta = json.loads((run / "config.json").read_text())
    edit(meta)
    (run / "config.json").write_text(json.dumps(meta))


def _edit_checkpoint(run: Path, edit, which="checkpoint.h5") -> None:
    arrays, meta = load_checkpoint(run / which)
    edit(arrays, meta)
    save_checkpoint(run / which, arrays, meta)


def _config_file(text: bytes):
    return lambda run: (run / "config.json").write_bytes(text)


BAD_FOLDERS = {
    "epochs text": (lambda r: _edit_config(r, lambda m: m["config"].update(epochs="three")),
                    "setting 'epochs' must be a whole number, got 'three'"),
    "num_filters -1": (lambda r: _edit_config(
        r, lambda m: m["config"]["model_options"].update(num_filters=-1)),
        "num_filters must not be negative"),
    "lr a list": (lambda r: _edit_config(r, lambda m: m["config"].update(lr=[1e-3])),
                  "setting 'lr' must be a number"),
    "unknown key": (lambda r: _edit_config(r, lambda m: m["config"].update(speed=11)),
                    "unknown setting 'speed'"),
    "class names": (lambda r: _edit_config(r, lambda m: m.update(class_names=3)), "corrupt"),
    "non-object JSON": (_config_file(b"[1, 2, 3]"), "corrupt or not written by partrain"),
    "invalid UTF-8": (_config_file(b'{"config": {"model": "\xff\xfe"}}'), "corrupt"),
    "meta epoch text": (lambda r: _edit_checkpoint(r, lambda a, m: m.update(epoch="x")),
                        "epoch must be a whole number >= 0, got 'x'"),
    "meta negative t": (lambda r: _edit_checkpoint(r, lambda a, m: m.update(t=-13)),
                        "t must be a whole number >= 0"),
    "meta no position": (lambda r: _edit_checkpoint(r, lambda a, m: m.pop("position")),
                         "position must be a whole number"),
    "meta position 10^9": (lambda r: _edit_checkpoint(r, lambda a, m: m.update(
        position=10**9)), "do not fit together"),
    "meta sums": (lambda r: _edit_checkpoint(r, lambda a, m: m.update(epoch_sums="abc")),
                  "sums must be numbers"),
    "params shape": (lambda r: _edit_checkpoint(r, lambda a, m: a.update(
        params=a["params"][:-1])), r"does not match this run \(params\)"),
    "params NaN": (lambda r: _edit_checkpoint(r, lambda a, m: a["params"].__setitem__(0, np.nan)),
                   "damaged: params holds NaN or infinite values"),
    "adam state inf": (lambda r: _edit_checkpoint(r, lambda a, m: a["opt.v"].__setitem__(
        3, np.inf)), "damaged: opt.v holds NaN or infinite values"),
}
COMMANDS = {"resume": lambda run: ["fit", "--resume", str(run), "--epochs", "3", "--quiet"],
            "evaluate": lambda run: ["evaluate", str(run), "--checkpoint", "last"]}


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("case", BAD_FOLDERS)
def test_a_damaged_run_folder_is_one_line_and_stays_as_it_was(case, command, run):
    """D2 and D13: bad values in config.json or in the checkpoint's meta and arrays were
    TypeError / ValueError tracebacks, a silently skipped epoch (position 10^9), or "loss became
    nan ...; try a smaller --lr" after config.json's epochs had been rewritten."""
    damage, message = BAD_FOLDERS[case]
    damage(run)
    if command == "evaluate" and ("meta" in case or "params" in case or "state" in case):
        shutil.copy(run / "checkpoint.h5", run / "best.h5")  # the same damage in both
    before = snapshot(run)
    result = CliRunner().invoke(main, COMMANDS[command](run))
    if command == "evaluate" and case == "adam state inf":  # evaluate reads no optimizer state
        assert result.exit_code == 0, result.output
        return
    assert result.exit_code == 1, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    assert re.search(message, lines[0]), lines[0]
    assert snapshot(run) == before


def snapshot(folder: Path) -> dict:
    """{name: bytes} of every file in the folder."""
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_a_damaged_checkpoint_as_a_real_process(run):
    """The same through `python -m partrain`: no traceback on stderr, nothing changed."""
    _edit_checkpoint(run, lambda a, m: a["params"].__setitem__(0, np.nan))
    before = snapshot(run)
    p = subprocess.run([sys.executable, "-m", "partrain", "fit", "--resume", str(run),
                        "--epochs", "3"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 1, (p.stdout, p.stderr)
    assert p.stderr.strip().splitlines() == [
        f"Error: checkpoint {run / 'checkpoint.h5'} is damaged: params holds NaN or infinite "
        f"values"]
    assert snapshot(run) == before


def test_a_resume_that_fails_at_its_first_step_changes_nothing(run):
    _edit_checkpoint(run, lambda a, m: a["params"].__setitem__(slice(None), 3e38))
    before = snapshot(run)
    result = CliRunner().invoke(main, COMMANDS["resume"](run))
    assert result.exit_code == 1 and "loss became" in result.output, result.output
    assert snapshot(run) == before


@pytest.mark.parametrize("args, says", [
    (["--step-timeout", "nan"], "must be a number, not nan"),
    (["--model-option", "weight_scale=x"], "weight_scale must be a finite number"),
    (["--model-option", "num_filters=3.5"], "num_filters must be a whole number"),
    (["--model-option", "reg=inf"], "reg must be a finite number"),
])
def test_option_values_of_the_wrong_kind_are_one_line(args, says):
    result = CliRunner().invoke(main, ["fit", *args, "--dry-run"])
    assert result.exit_code in (1, 2) and says in result.output, result.output
    assert "Traceback" not in result.output

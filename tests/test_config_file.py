"""`partrain fit --config FILE` (issue 15): TOML settings with the command line's keys, options
given winning over the file and the file over a recipe, a past run's config.json run again, and
every bad key and value as one line of a real process."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from partrain.checkpoint import load_checkpoint
from synthetic import make_tiny_store

CLI = [sys.executable, "-m", "partrain.cli"]


def fit(*args, cwd, check=0):
    p = subprocess.run([*CLI, "fit", *map(str, args)], capture_output=True, text=True, cwd=cwd,
                       timeout=300)
    assert p.returncode == check, (p.stdout[-2000:], p.stderr[-2000:])
    return p


def marked(dry_run_output: str) -> dict:
    """The settings `fit --dry-run` marks as changed: {name: printed value}."""
    return {line.split()[0]: " ".join(line.split()[1:-1])
            for line in dry_run_output.splitlines() if line.endswith("   *")}


TOML = """
model = "three-layer"
epochs = 2
batch-size = 25          # the flag's spelling
val_size = 100
data_dir = "data"
workers = 1
lr = 0.003
name = "from-file"

[model_options]
num_filters = 4
hidden_dim = 16
"""


def test_file_then_command_line_then_recipe(tmp_path):
    (tmp_path / "run.toml").write_text(TOML)
    got = marked(fit("--config", "run.toml", "--dry-run", cwd=tmp_path).stdout)
    assert got["batch_size"] == "25" and got["epochs"] == "2" and got["lr"] == "0.003"
    assert got["model_options"] == "{'num_filters': 4, 'hidden_dim': 16}"
    got = marked(fit("--config", "run.toml", "--epochs", "5", "--dry-run", cwd=tmp_path).stdout)
    assert got["epochs"] == "5" and got["batch_size"] == "25"  # the command line wins
    (tmp_path / "r.toml").write_text('recipe = "airbench-short"\nbatch_size = 512\n')
    got = marked(fit("--config", "r.toml", "--dry-run", cwd=tmp_path).stdout)
    assert got["batch_size"] == "512" and got["model"] == "'airbench'"  # the file over the recipe
    assert got["recipe"] == "'airbench-short'" and got["lr"] != "0.003"
    got = marked(fit("--config", "r.toml", "--batch-size", "256", "--dry-run", cwd=tmp_path).stdout)
    assert got["batch_size"] == "256"


def test_a_past_run_runs_again(tmp_path):
    make_tiny_store(tmp_path / "data" / "cifar10.h5")
    (tmp_path / "run.toml").write_text(TOML)
    fit("--config", "run.toml", "--quiet", cwd=tmp_path)
    first = tmp_path / "runs" / "from-file"
    saved = json.loads((first / "config.json").read_text())["config"]
    assert saved["batch_size"] == 25 and saved["model_options"]["hidden_dim"] == 16
    fit("--config", first / "config.json", "--name", "again", "--quiet", cwd=tmp_path)
    again = tmp_path / "runs" / "again"
    assert json.loads((again / "config.json").read_text())["config"] == saved
    (a, _), (b, _) = (load_checkpoint(d / "checkpoint.h5") for d in (first, again))
    assert all(a[k].tobytes() == b[k].tobytes() for k in a)  # the same run, bit for bit
    fit("--config", first / "config.json", "--quiet", cwd=tmp_path)  # a third, named anew
    assert len(list((tmp_path / "runs").iterdir())) == 3


@pytest.mark.parametrize("text, message", [
    ("batch_sise = 50", r"bad.toml: unknown key 'batch_sise'; did you mean 'batch_size'\?"),
    ('batch_size = "50"', r"bad.toml: key 'batch_size' must be a whole number, got '50'"),
    ("lr = [1, 2]", r"bad.toml: key 'lr' must be a number, got \[1, 2\]"),
    ("augment_flip = 1", r"key 'augment_flip' must be true or false"),
    ("model_options = 3", r"key 'model_options' must be"),
    ("epochs = ", r"bad.toml is not valid TOML"),
    ("batch_size = 50\nbatch-size = 60", r"key 'batch_size' is given twice"),
    ('data_dir = "d"\ndata = "d/cifar10.h5"', r"give data_dir \(the folder\) or data"),
    ("name = 3", r"key 'name' must be text"),
    ("epochs = -2", r"--epochs must be at least 1"),
    ('model = "resnet"', r"unknown model 'resnet'"),
])
def test_bad_config_is_one_line(tmp_path, text, message):
    import re
    (tmp_path / "bad.toml").write_text(text + "\n")
    p = fit("--config", "bad.toml", cwd=tmp_path, check=1)
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), p.stderr
    assert re.search(message, lines[0]), lines[0]
    assert not (tmp_path / "runs").exists()


def test_config_json_that_is_not_settings_and_resume(tmp_path):
    (tmp_path / "x.json").write_text("[1, 2]")
    assert "expected an object of settings" in fit("--config", "x.json", cwd=tmp_path,
                                                   check=1).stderr
    (tmp_path / "run.toml").write_text(TOML)
    p = fit("--config", "run.toml", "--resume", "runs/x", cwd=tmp_path, check=1)
    assert "--config starts a new run" in p.stderr
    assert "no such file" in fit("--config", "nope.toml", cwd=tmp_path, check=1).stderr

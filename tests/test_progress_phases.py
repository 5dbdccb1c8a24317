"""Progress on every long phase (issue 16): a bar on a terminal, plain lines in a log, nothing with
--quiet; each saying what it is doing. The commands run as real processes, their stderr on a real
pseudo-terminal (a TTY) or a pipe."""
from __future__ import annotations

import fcntl
import io
import os
import pty
import select
import struct
import subprocess
import sys
import termios

import pytest

from partrain.progress import Phase
from synthetic import make_tiny_store

CLI = [sys.executable, "-m", "partrain.cli"]


def test_phase_modes():
    bar = io.StringIO()
    with Phase("test set, 3 images", 3, "image", stream=bar, tty=True) as p:
        p.update(3)
    assert "test set, 3 images" in bar.getvalue()
    plain = io.StringIO()
    with Phase("decoding 3 images", 3, "image", stream=plain, tty=False, plain_every=0) as p:
        p.update(1)
        p.update(1)
        p.update(1)  # the last: no line (the phase's own end line says it)
    lines = plain.getvalue().splitlines()
    assert lines[0].startswith("decoding 3 images: 1/3 images, ETA") and len(lines) == 2
    assert "\r" not in plain.getvalue()
    quiet = io.StringIO()
    for tty in (True, False):
        with Phase("x", 3, stream=quiet, tty=tty, quiet=True, plain_every=0) as p:
            p.update(2)
    assert quiet.getvalue() == ""


def on_a_terminal(args, cwd, timeout=300):
    """(exit code, stdout, what the terminal showed on stderr) of a real process whose stderr is
    a pseudo-terminal."""
    master, slave = pty.openpty()
    # a real terminal's size: a new pty has 0 columns, and tqdm draws no bar in 0 columns
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    p = subprocess.Popen([*CLI, *map(str, args)], cwd=cwd, stdout=subprocess.PIPE,
                         stderr=slave, text=False)
    os.close(slave)
    shown = b""
    while True:
        ready, _, _ = select.select([master], [], [], timeout)
        if not ready:
            p.kill()
            raise AssertionError("no end")
        try:
            chunk = os.read(master, 65536)
        except OSError:  # the process closed its side
            break
        if not chunk:
            break
        shown += chunk
    out = p.stdout.read().decode()
    p.wait(timeout)
    os.close(master)
    return p.returncode, out, shown.decode(errors="replace")


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("phases")
    make_tiny_store(root / "data" / "cifar10.h5", n_train=300, n_test=200)
    p = subprocess.run([*CLI, "fit", "--model-option", "num_filters=4", "--model-option",
                        "hidden_dim=8", "--epochs", "1", "--val-size", "100", "--workers", "1",
                        "--name", "r", "--quiet"], cwd=root, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stderr
    return root


@pytest.mark.parametrize("args, what", [
    (["evaluate", "runs/r"], "test set, 200 images"),
    (["evaluate", "runs/r", "--tta", "flip_translate"], "test set, 200 images, 6 TTA views"),
    (["predict", "runs/r", "--test-index", "0", "1", "2"], "predicting 3 images"),
])
def test_bar_on_a_terminal_nothing_with_quiet(run_folder, args, what):
    code, out, shown = on_a_terminal(args, run_folder)
    assert code == 0, (out, shown)
    assert what in shown and "image" in shown, shown
    code, out, shown = on_a_terminal([*args, "--quiet"], run_folder)
    assert code == 0 and shown.strip() == "", shown
    p = subprocess.run([*CLI, *args], cwd=run_folder, capture_output=True, text=True,
                       timeout=300)  # in a pipe: no bar (a fast pass ends before a plain line)
    assert p.returncode == 0 and "\r" not in p.stderr and what not in p.stderr


def test_prepare_images_and_bench_points_on_a_terminal(tmp_path):
    from image_folders import make_folder
    make_folder(tmp_path / "imgs", per_class=4)
    code, out, shown = on_a_terminal(["prepare", "--images", "imgs", "--data-dir", "d"],
                                     tmp_path)
    assert code == 0 and "decoding 12 images" in shown, (out, shown)
    assert "decoded 12 images in" in out
    code, out, shown = on_a_terminal(["bench", "--model", "linear", "--workers", "1",
                                      "--batch-size", "8", "--steps", "3", "--warmup", "1",
                                      "--synthetic", "64", "--reduction", "sharded",
                                      "--out-dir", "b"], tmp_path)
    assert code == 0 and "sharded N=1 batch 8: 1 warm-up + 3 timed steps" in shown, shown


def test_fit_shows_setup_validation_and_test_passes(tmp_path):
    make_tiny_store(tmp_path / "data" / "cifar10.h5", n_train=300, n_test=200)
    args = ["fit", "--model", "airbench", "--model-option", "widths=[4,4,4]", "--model-option",
            "ghost_batch=4", "--batch-size", "16", "--epochs", "1", "--val-size", "100",
            "--workers", "2", "--tta", "flip", "--name", "a"]
    code, out, shown = on_a_terminal(args, tmp_path)
    assert code == 0, (out, shown)
    assert ("setting up: starting 2 worker processes, airbench's data-dependent initialisation"
            in out)
    assert "(workers ready in" in out
    assert "validation, 100 images" in shown and "test set, 200 images, 2 TTA views" in shown
    code, out, shown = on_a_terminal([*args[:-1], "b", "--quiet"], tmp_path)
    assert code == 0 and shown.strip() == "" and "setting up" not in out

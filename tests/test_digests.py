"""Same seed, same bits: sha256 of the final parameter and state arrays of short real runs.

The digests were recorded with the code before the structure change of issue 9 (commit 62dd18b)
and must not move: a refactor that changes any result, in any model or worker count, fails here.
A change that means to alter the arithmetic re-records them and says so (issue 12, three times).
They pin this machine's arithmetic (numpy, OpenBLAS with the Haswell kernel): a different BLAS
build may legitimately change the last bits, and then these need re-recording with the old code.
"""
from __future__ import annotations

import hashlib
import subprocess
import sys

import h5py
import numpy as np
import pytest

from synthetic import make_tiny_store

COMMON = ["--val-size", "100", "--quiet"]
RUNS = {
    "three-layer": ["--model", "three-layer", "--model-option", "num_filters=8",
                    "--model-option", "hidden_dim=32", "--batch-size", "50", "--epochs", "1"],
    "vgg": ["--model", "vgg", "--model-option", "widths=[8,16]", "--model-option",
            "ghost_batch=8", "--optimizer", "sgd", "--lr", "0.05", "--batch-size", "32",
            "--max-steps", "6", "--epochs", "1"],
    # 2 epochs of 4 steps, stopped after 7: Lookahead has pulled once (step 5), not yet ended
    "airbench": ["--recipe", "airbench", "--model-option", "widths=[8,16,16]", "--model-option",
                 "ghost_batch=32", "--batch-size", "128", "--epochs", "2", "--max-steps", "7"],
}
DIGESTS = {
    # (run, workers): sha256 of the params bytes then the state bytes of checkpoint.h5.
    # All re-recorded in issue 12 for the (C, H, W, N) layout of the feature maps: the sums over
    # pixels and samples (im2col's weight gradient, biases, batch-norm statistics, the affine
    # input's layout) now add in another order; vgg's and airbench's again when their 16-channel
    # convs went Winograd (WINOGRAD_MIN_CHANNELS_DX 16). airbench's: one worker's two chunks and
    # two workers' one chunk each are summed alike, so the same bits. three-layer's again when
    # im2col's weight gradient became cols @ dout.T and a transposed-view input's affine forward
    # w @ x.T (each sums in another order inside OpenBLAS). All again when im2col's columns of
    # more than one 4 MB block stopped being kept (4-32 MB columns are now made in blocks and
    # their weight gradient summed over the blocks).
    ("three-layer", 1): "e8691e5d1f0dab1572c07f698b9a207c1844bd2bc9d97747f26b662440412e20",
    ("three-layer", 2): "f6f150b2a3d6dda266ffb4a4bf0c4e00ca4b79ec9bb0c9a21363cfb3307114fa",
    ("vgg", 1): "1ce4239b6e8adb22c723350b5e25c2ec9165692810646ac2fe7843a710c1dfd9",
    ("vgg", 2): "0e78900f3876ed762eeefcfbd409944d48e463bee8e6d03f645c4a13b563e81f",
    ("airbench", 1): "939277d9c0f1732f86759ab9264c70a100504646b1e4450e21e8ac38f37f0861",
    ("airbench", 2): "939277d9c0f1732f86759ab9264c70a100504646b1e4450e21e8ac38f37f0861",
}


def digest(path) -> str:
    with h5py.File(path, "r") as f:
        h = hashlib.sha256()
        for name in ("params", "state"):
            h.update(np.ascontiguousarray(f["arrays"][name][...]).tobytes())
        return h.hexdigest()


def run_digest(tmp_path, run: str, workers: int) -> str:
    data = tmp_path / "data"
    if not (data / "cifar10.h5").exists():
        make_tiny_store(data / "cifar10.h5")
    name = f"{run}-w{workers}"
    subprocess.run([sys.executable, "-m", "partrain.cli", "fit", *RUNS[run], *COMMON,
                    "--workers", str(workers), "--data-dir", str(data),
                    "--runs-dir", str(tmp_path / "runs"), "--name", name],
                   check=True, capture_output=True, timeout=600)
    return digest(tmp_path / "runs" / name / "checkpoint.h5")


@pytest.mark.slow
@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize("run", list(RUNS))
def test_same_seed_same_bits_as_before(tmp_path, run, workers):
    assert run_digest(tmp_path, run, workers) == DIGESTS[(run, workers)]


if __name__ == "__main__":  # print the digests of this code (to record them)
    import tempfile
    from pathlib import Path
    with tempfile.TemporaryDirectory() as d:
        for run in RUNS:
            for w in (1, 2):
                print(f"    ({run!r}, {w}): {run_digest(Path(d), run, w)!r},")

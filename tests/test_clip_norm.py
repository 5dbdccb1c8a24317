"""--clip-norm C: the gradient clipped by its global L2 norm, g *= C / max(|g|, C).

- the pieces: the fixed-block sum of squares is the float64 norm, the same bits however the
  vector is cut into whole-block slices; below C nothing is touched, above the norm becomes C;
- one step: the clipped step is the unclipped gradient scaled by C/|g| (SGD, no momentum), the
  norm is taken before weight decay, the engine (sharded or parent reduction) gives
  LocalRunner's bits;
- real `partrain fit` runs: with --micro-batch 1, 2 and 3 workers give sha256-identical
  checkpoints and history (and not those of the unclipped run), history has grad_norm and
  clipped_frac, a resume mid-epoch is the uninterrupted run, 2 MPI ranks give one worker's bits.
"""
from __future__ import annotations

import csv

import numpy as np
import pytest
from threadpoolctl import threadpool_limits

from partrain.clipping import BLOCK, Clipper, block_sums, n_blocks, tree_sum
from partrain.datasets.store import channel_stats
from partrain.parallel.engine import ParallelRunner
from partrain.parallel.reduce import shard_slices
from partrain.runner import LocalRunner
from procs import fit_quietly as fit, resume_matches, untimed_history
from synthetic import learnable_split, make_tiny_store
from test_digests import digest

SMALL_CNN = ("three-layer", dict(num_filters=4, hidden_dim=16, weight_scale=1e-2))
SGD = ("sgd", {"momentum": 0.0})
RUN = ["--model", "three-layer", "--model-option", "num_filters=8", "--model-option",
       "hidden_dim=32", "--batch-size", "50", "--epochs", "2", "--micro-batch", "10",
       "--clip-norm", "0.5", "--log-every", "3"]


# ------------------------------------------------------------------------------ the pieces
def test_block_norm_is_the_float64_norm_and_the_same_bits_for_any_slicing():
    g = np.random.default_rng(0).normal(0, 1e-2, 100_003).astype(np.float32)
    whole = np.zeros(n_blocks(g.size))
    block_sums(g, 0, g.size, whole)
    assert np.sqrt(tree_sum(whole)) == pytest.approx(np.linalg.norm(g.astype(np.float64)),
                                                     rel=1e-12)
    for n in (2, 3, 7):
        cut = np.zeros_like(whole)
        for lo, hi in shard_slices(g.size, n):  # the engine's slices: whole blocks
            block_sums(g, lo, hi, cut)
        assert cut.tobytes() == whole.tobytes()
    with pytest.raises(ValueError, match="whole blocks"):
        block_sums(g, BLOCK + 1, 5 * BLOCK, whole)
    assert tree_sum(np.arange(11.0)) == 55.0 and tree_sum(np.zeros(0)) == 0.0


def test_below_the_threshold_nothing_moves_above_the_norm_becomes_c():
    g = np.random.default_rng(1).normal(0, 1, 1000).astype(np.float32)
    norm = float(np.linalg.norm(g.astype(np.float64)))
    kept = g.copy()
    c = Clipper(norm * 1.01, g.size)
    c.clip(g)
    assert g.tobytes() == kept.tobytes() and c.last == (pytest.approx(norm), False)
    c = Clipper(norm / 4, g.size)
    c.clip(g)
    assert c.last[1] and np.linalg.norm(g.astype(np.float64)) == pytest.approx(norm / 4, rel=1e-6)
    np.testing.assert_allclose(g, kept / 4, rtol=1e-6)


# ------------------------------------------------------------------------------ one step
@pytest.fixture(scope="module")
def data():
    images, labels = learnable_split(200, np.random.default_rng(0))
    mean, std = channel_stats(images)
    return images, labels, mean, std


def one_step(data, opt=SGD, runner=LocalRunner, **kw):
    """(params before, params after, the step's gradient as the optimizer read it, clip.last)
    of one step of 40 samples at lr 0.1."""
    images, labels, mean, std = data
    r = runner(SMALL_CNN, opt, images, labels, mean, std, seed=3, **kw)
    with r:
        r.set_order(np.random.default_rng(7).permutation(len(labels)))
        params0 = np.array(r.params)
        r.step(0, 40, 0.1, 1)
        grads = np.array(r.grads if isinstance(r, LocalRunner) else r.reduced)
        return params0, np.array(r.params), grads, r.clip.last if r.clip is not None else None


def test_the_clipped_step_is_the_gradient_scaled_to_norm_c(data):
    p0, _, g, _ = one_step(data)
    norm = np.linalg.norm(g.astype(np.float64))
    p0c, p_clip, g_clip, (seen, clipped) = one_step(data, clip_norm=norm / 3)
    assert clipped and seen == pytest.approx(norm, rel=1e-12)
    assert p0c.tobytes() == p0.tobytes()
    np.testing.assert_allclose(g_clip, g / 3, rtol=1e-6)
    assert np.linalg.norm(g_clip.astype(np.float64)) == pytest.approx(norm / 3, rel=1e-6)
    # SGD without momentum steps with the clipped gradient: p1 = p0 - lr * g (in float32)
    assert p_clip.tobytes() == (p0 - g_clip * np.float32(0.1)).tobytes()
    _, p_loose, g_loose, (_, clipped) = one_step(data, clip_norm=norm * 3)  # nothing to clip
    _, p_free, _, _ = one_step(data)
    assert not clipped and p_loose.tobytes() == p_free.tobytes() and g_loose.tobytes() == g.tobytes()


def test_the_norm_is_taken_before_weight_decay(data):
    """PyTorch's order: clip_grad_norm_ on p.grad, then the optimizer adds the decay."""
    _, _, _, (plain, _) = one_step(data, clip_norm=1e-3)
    _, p_decayed, _, (decayed, _) = one_step(data, opt=("sgd", {"weight_decay": 10.0}),
                                             clip_norm=1e-3)
    _, p_plain, _, _ = one_step(data, clip_norm=1e-3)
    assert decayed == plain and p_decayed.tobytes() != p_plain.tobytes()  # the decay acted


def test_the_engine_clips_with_local_runners_bits(data):
    """One worker: LocalRunner's bits, both reductions. Three: the two reductions agree bit for
    bit (the same sums, the same blocks), and with LocalRunner within round-off (3 shards)."""
    with threadpool_limits(1):  # the workers' one BLAS thread
        ref = one_step(data, clip_norm=0.05)
    assert ref[3][1]
    for n in (1, 3):
        got = [one_step(data, runner=ParallelRunner, clip_norm=0.05, n_workers=n,
                        reduction=reduction) for reduction in ("sharded", "parent")]
        assert got[0][1].tobytes() == got[1][1].tobytes() and got[0][3] == got[1][3]
        if n == 1:
            assert got[0][1].tobytes() == ref[1].tobytes() and got[0][3] == ref[3]
        else:
            assert got[0][3][0] == pytest.approx(ref[3][0], rel=1e-5)
            np.testing.assert_allclose(got[0][1], ref[1], rtol=0, atol=1e-6)


# ------------------------------------------------------------------------------ real runs
@pytest.fixture(scope="module")
def store(tmp_path_factory):
    folder = tmp_path_factory.mktemp("clip-data")
    make_tiny_store(folder / "cifar10.h5")
    return folder


def epoch_rows(run):
    with open(run / "history.csv", newline="") as f:
        return [r for r in csv.DictReader(f) if r["kind"] == "epoch"]


@pytest.mark.slow
def test_one_two_and_three_workers_clip_to_the_same_bits(tmp_path, store):
    runs = tmp_path / "runs"
    for n in (1, 2, 3):
        fit(store, runs, f"w{n}", *RUN, "--workers", n)
    fit(store, runs, "free", *RUN[:-4], "--log-every", "3", "--workers", 1)
    for which in ("checkpoint", "best"):
        assert len({digest(runs / f"w{n}" / f"{which}.h5") for n in (1, 2, 3)}) == 1, which
    assert digest(runs / "w1" / "checkpoint.h5") != digest(runs / "free" / "checkpoint.h5")
    hist = [untimed_history(runs / f"w{n}") for n in (1, 2, 3)]
    assert hist[0] == hist[1] == hist[2]
    rows = epoch_rows(runs / "w1")
    assert len(rows) == 2 and all(float(r["grad_norm"]) > 0 for r in rows)
    fracs = [float(r["clipped_frac"]) for r in rows]
    assert all(0 <= f <= 1 for f in fracs) and max(fracs) > 0  # C = 0.5 clips some steps
    assert all(r["grad_norm"] == r["clipped_frac"] == "" for r in epoch_rows(runs / "free"))


def test_resume_mid_epoch_is_the_uninterrupted_run(tmp_path, store):
    runs = tmp_path / "runs"
    fit(store, runs, "whole", *RUN, "--workers", 2)
    fit(store, runs, "cut", *RUN, "--workers", 2, "--max-steps", 5)  # mid-epoch 1 of 8 steps
    resume_matches(runs)


@pytest.mark.parametrize("value", ["0", "-1", "nan"])
def test_a_bad_clip_norm_is_one_line(tmp_path, store, value):
    p = fit(store, tmp_path / "runs", "bad", "--clip-norm", value, check=False)
    assert p.returncode != 0 and "Traceback" not in p.stderr
    assert p.stderr.strip().splitlines()[-1].startswith("Error:"), p.stderr
    assert not (tmp_path / "runs" / "bad").exists()


@pytest.mark.mpi
@pytest.mark.slow
@pytest.mark.parametrize("micro, rank_workers, local_workers", [("10", 1, 1), ("0", 1, 2),
                                                                 ("0", 2, 4)])
def test_two_mpi_ranks_clip_as_one_machine(tmp_path, micro, rank_workers, local_workers):
    """Under --backend mpi every rank holds the whole summed gradient before the norm (the
    rows, or each slice, all-reduced), so each computes the same norm with no extra message.
    With micro-batches 2 ranks give one worker's bits; without, 2 x 1 sum the two shards as
    1 x 2 do (the same bits), 2 x 2 and 1 x 4 add four shards in other orders (round-off)."""
    pytest.importorskip("mpi4py")
    from test_mpi import _two_ranks_and_local, arrays, assert_same_bits
    store = make_tiny_store(tmp_path / "data" / "cifar10.h5")
    args = [*RUN[:RUN.index("--micro-batch")], "--micro-batch", micro,
            *RUN[RUN.index("--micro-batch") + 2:]]
    exact = micro != "0" or rank_workers == 1
    if not exact:  # SGD: Adam's sqrt(v) near zero magnifies round-off (tests/test_mpi.py)
        args += ["--optimizer", "sgd", "--lr", "0.05"]
    runs = _two_ranks_and_local(tmp_path, store, args, rank_workers, local_workers)
    a, b = arrays(runs / "mpi" / "checkpoint.h5"), arrays(runs / "local" / "checkpoint.h5")
    if exact:
        assert_same_bits(a, b, "checkpoint")
        assert untimed_history(runs / "mpi") == untimed_history(runs / "local")
    else:
        assert np.abs(a["params"] - b["params"]).max() <= 1e-4 * np.abs(b["params"]).max()

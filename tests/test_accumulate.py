"""--accumulate K: an optimizer step of K batches of --batch-size B, computed one batch at a time.

- with --micro-batch, K=2 x B=50 is the step of one batch of 100 (the same micro-batch rows,
  summed in the same order): sha256-identical checkpoints and history, on 1 and 2 workers;
- without, the K passes' gradients are added in pass order where one batch's GEMMs sum all its
  samples at once: the same run within float32 round-off. Tolerance: max |p_K - p_1| <= 1e-4 *
  max |p_1| after 16 steps (tests/test_engine.py's across-N tolerance, for the same reason: the
  same sums in another order, fed back through training);
- an epoch has ceil(batches / K) optimizer steps (the last may be short), the schedule and t
  count them, a pass holds only B samples' activations (the input buffer never exceeds B);
- batch-norm statistics of a step are merged over all its passes' groups;
- a run stopped mid-epoch (checkpoints only at optimizer-step boundaries) resumes to the bits
  of the uninterrupted run, also after a real SIGINT.
"""
from __future__ import annotations


import numpy as np
import pytest

from partrain.checkpoint import load_checkpoint
from partrain.datasets.store import channel_stats
from partrain.parallel.engine import ParallelRunner
from partrain.runner import LocalRunner
from partrain.step import pass_shards, stats_batch
from procs import ctrl_c_after_a_step, fit_quietly as fit, resume_matches, untimed_history
from synthetic import learnable_split, make_tiny_store
from test_digests import digest

MODEL = ["--model", "three-layer", "--model-option", "num_filters=8", "--model-option",
         "hidden_dim=32", "--log-every", "2"]
SMALL_BN = ("vgg", dict(widths=(4, 8), ghost_batch=4))


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return make_tiny_store(tmp_path_factory.mktemp("accumulate-data") / "cifar10.h5").parent


def params(run):
    return load_checkpoint(run / "checkpoint.h5")[0]["params"]


@pytest.mark.slow
@pytest.mark.parametrize("workers", [1, 2])
def test_two_batches_of_50_with_micro_batches_are_the_bits_of_one_batch_of_100(tmp_path, store,
                                                                               workers):
    runs = tmp_path / "runs"
    args = [*MODEL, "--epochs", 2, "--micro-batch", 10, "--workers", workers]
    fit(store, runs, "k2", *args, "--batch-size", 50, "--accumulate", 2)
    fit(store, runs, "b100", *args, "--batch-size", 100)
    fit(store, runs, "b50", *args, "--batch-size", 50)
    for which in ("checkpoint", "best"):
        assert digest(runs / "k2" / f"{which}.h5") == digest(runs / "b100" / f"{which}.h5")
    assert untimed_history(runs / "k2") == untimed_history(runs / "b100")
    assert digest(runs / "k2" / "checkpoint.h5") != digest(runs / "b50" / "checkpoint.h5")
    meta = load_checkpoint(runs / "k2" / "checkpoint.h5")[1]
    assert meta["t"] == 2 * 4 and meta["config"]["accumulate"] == 2  # 400 images: 4 steps/epoch


@pytest.mark.slow
def test_without_micro_batches_it_is_one_batch_within_round_off(tmp_path, store):
    runs = tmp_path / "runs"
    args = [*MODEL, "--micro-batch", 0, "--optimizer", "sgd", "--lr", "0.05", "--epochs", 4]
    fit(store, runs, "k2", *args, "--batch-size", 50, "--accumulate", 2, "--workers", 1)
    fit(store, runs, "k2w2", *args, "--batch-size", 50, "--accumulate", 2, "--workers", 2)
    fit(store, runs, "b100", *args, "--batch-size", 100, "--workers", 1)
    fit(store, runs, "b50", *args, "--batch-size", 50, "--workers", 1)
    ref = params(runs / "b100")
    tol = 1e-4 * np.abs(ref).max()
    for name in ("k2", "k2w2"):
        assert np.abs(params(runs / name) - ref).max() <= tol, name
    assert np.abs(params(runs / "b50") - ref).max() > 100 * tol  # what the tolerance tells apart
    assert load_checkpoint(runs / "k2" / "checkpoint.h5")[1]["t"] == 16


def test_steps_per_epoch_is_ceil_of_batches_over_k(tmp_path, store):
    """400 images in batches of 50 are 8 batches; K = 3: steps of 150, 150 and 100 images."""
    runs = tmp_path / "runs"
    fit(store, runs, "k3", *MODEL[:-2], "--epochs", 2, "--batch-size", 50, "--accumulate", 3,
        "--log-every", 1, "--schedule", "linear")
    meta = load_checkpoint(runs / "k3" / "checkpoint.h5")[1]
    assert meta["t"] == 2 * 3 and meta["epoch"] == 2
    import csv
    with open(runs / "k3" / "history.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    steps = [r for r in rows if r["kind"] == "step"]
    assert [int(r["step"]) for r in steps] == [1, 2, 3, 4, 5, 6]
    lrs = [float(r["lr"]) for r in steps]  # linear to 0 over the 6 optimizer steps
    assert lrs == pytest.approx([1e-3 * (1 - t / 6) for t in range(6)])


@pytest.fixture(scope="module")
def data():
    images, labels = learnable_split(200, np.random.default_rng(0))
    mean, std = channel_stats(images)
    return images, labels, mean, std


def steps(data, model, runner=LocalRunner, batch=40, chunk=None, n=4, **kw):
    images, labels, mean, std = data
    with runner(model, ("sgd", {"momentum": 0.9}), images, labels, mean, std, seed=3,
                chunk=chunk, **kw) as r:
        r.set_order(np.random.default_rng(7).permutation(len(labels)))
        losses = [r.step(lo, lo + batch, 0.02, t + 1)
                  for t, lo in enumerate(range(0, n * batch, batch))]
        biggest = r._xbuf.shape[0] if isinstance(r, LocalRunner) else None
        return np.array(r.params), np.array(r.state), losses, biggest


def assert_close(a, b, tol=1e-4):
    assert np.abs(a[0] - b[0]).max() <= tol * np.abs(b[0]).max()
    if b[1].size:
        assert np.abs(b[1]).max() > 0 and np.abs(a[1] - b[1]).max() <= tol * np.abs(b[1]).max()
    np.testing.assert_allclose([x for x, _ in a[2]], [x for x, _ in b[2]], rtol=1e-5)
    assert [c for _, c in a[2]] == [c for _, c in b[2]]


def test_passes_hold_one_batch_and_merge_batch_norm_over_all_groups(data):
    """Batch norm with ghost batches of 4: passes of 8 (2 groups each) against one batch of 40
    (10 groups), in this process and on 3 workers. Passes of 6 end with a short group each: a
    step of 40 is 6 passes of 2 groups and one of 1, 13 groups (not n_groups(40) = 10), which
    the running statistics are averaged over, in this process as on the workers."""
    assert stats_batch(40, 6, 4) == 13 * 4 and stats_batch(40, 8, 4) == 40
    assert stats_batch(40, None, 4) == stats_batch(40, 40, 4) == 40
    one = steps(data, SMALL_BN)
    passes = steps(data, SMALL_BN, chunk=8)
    assert passes[3] == 8 and one[3] == 40  # the input buffer: one pass of samples
    assert_close(passes, one)
    assert_close(steps(data, SMALL_BN, ParallelRunner, chunk=8, n_workers=3), one)
    odd_local = steps(data, SMALL_BN, chunk=6)
    assert_close(steps(data, SMALL_BN, ParallelRunner, chunk=6, n_workers=3), odd_local)


def test_pass_shards_cut_each_pass_by_machine_then_worker():
    assert pass_shards(0, 25, 10, 1) == [(0, 10), (10, 20), (20, 25)]
    # 2 ranks x 2 workers, groups of 2: rank 1's worker 0 gets the first half of its part
    assert pass_shards(0, 25, 10, 2, [(2, 1), (2, 0)]) == [(6, 8), (16, 18), (24, 25)]


@pytest.mark.slow
def test_resume_mid_epoch_is_the_uninterrupted_run(tmp_path, store):
    runs = tmp_path / "runs"
    args = [*MODEL, "--epochs", 2, "--micro-batch", 0, "--batch-size", 25, "--accumulate", 2,
            "--workers", 2]
    fit(store, runs, "whole", *args)
    fit(store, runs, "cut", *args, "--max-steps", 3)  # step 3 of epoch 1's 8
    resume_matches(runs, files=("checkpoint", "best"))


@pytest.mark.slow
def test_sigint_mid_epoch_then_resume_is_the_uninterrupted_run(tmp_path, store):
    runs = tmp_path / "runs"
    args = [*MODEL[:-2], "--micro-batch", 0, "--batch-size", 10, "--accumulate", 3,
            "--log-every", 1, "--workers", 1, "--epochs", 3]
    fit(store, runs, "whole", *args)
    ctrl_c_after_a_step(["fit", *args, "--val-size", "100", "--data-dir", store, "--runs-dir",
                         runs, "--name", "cut"], runs / "cut")
    meta = load_checkpoint(runs / "cut" / "checkpoint.h5")[1]
    assert meta["epoch"] < 3 and meta["t"] == meta["epoch"] * 14 + meta["position"]  # 40 batches
    resume_matches(runs, files=("checkpoint", "best"))


def test_a_bad_accumulate_is_one_line(tmp_path, store):
    p = fit(store, tmp_path / "runs", "bad", "--accumulate", 0, check=False)
    assert p.returncode == 1 and p.stderr.strip() == "Error: --accumulate must be at least 1, got 0"
    assert not (tmp_path / "runs" / "bad").exists()


@pytest.mark.mpi
@pytest.mark.slow
def test_two_mpi_ranks_accumulate_as_two_workers(tmp_path):
    """Without micro-batches each pass is cut across the ranks, then their workers: 2 ranks x 1
    worker compute 1 rank x 2 workers' shards and sum the two alike (batch norm with ghost
    batches of 8, augmentation: passes of 16 are one group per rank)."""
    pytest.importorskip("mpi4py")
    from test_mpi import RUNS as MPI_RUNS, _two_ranks_and_local, arrays, assert_same_bits
    store = make_tiny_store(tmp_path / "data" / "cifar10.h5")
    vgg = MPI_RUNS["vgg"]
    at = vgg.index("--batch-size")
    args = [*vgg[:at], *vgg[at + 2:], "--batch-size", 16, "--accumulate", 2, "--micro-batch", 0]
    runs = _two_ranks_and_local(tmp_path, store, args, rank_workers=1, local_workers=2)
    for which in ("checkpoint", "best"):
        assert_same_bits(arrays(runs / "mpi" / f"{which}.h5"),
                         arrays(runs / "local" / f"{which}.h5"), which)
    assert untimed_history(runs / "mpi") == untimed_history(runs / "local")

"""Row-parallel weight gradients (parallel/rowgrad.py): each worker writes the rows of a big
affine layer's weight gradient that lie in its slice, from every worker's stashed inputs and
output gradients; the sum of the N buffers skips those ranges.

Checked: the rows and partial rows of any slice against dout.T @ x (nothing outside written);
the sum that skips ranges; real workers (2 and 3, whose slices cut rows in the middle) against
one process, step by step and over a run; the workers' own buffers never written for those
weights; a layer frozen before the trainable ones (no backward: zero, not stale rows); where
it is not used; a step larger than max_batch refused. The restart of a killed
worker with it on is in test_engine (test_a_worker_killed_in_either_phase_...).
"""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from partrain.datasets.store import channel_stats
from partrain.nn.models import build_model
from partrain.parallel import rowgrad
from partrain.parallel.engine import ParallelRunner
from partrain.parallel.reduce import sum_except, sum_into
from partrain.runner import LocalRunner

from synthetic import learnable_split

N_IMAGES = 240
MODEL = ("three-layer", dict(num_filters=4, hidden_dim=16, weight_scale=1e-2))  # fc1: 1024 x 16


@pytest.fixture(scope="module")
def data():
    images, labels = learnable_split(N_IMAGES, np.random.default_rng(0))
    mean, std = channel_stats(images)
    return images, labels, mean, std


@pytest.fixture
def small_layers_too(monkeypatch):
    """fc1's 16,384 weights go row-parallel (the threshold is read by the parent only)."""
    monkeypatch.setattr(rowgrad, "MIN_WEIGHTS", 10_000)


def _stash(D=7, M=5, B=6, w_lo=3, rng=None):
    rng = rng or np.random.default_rng(0)
    layer = SimpleNamespace(d_in=D, d_out=M, name="fc")
    part = rowgrad.DeferredWeight(layer, np.empty(D * B, np.float32),
                                  np.empty(B * M, np.float32), w_lo)
    part.begin(B, 0)
    x = rng.standard_normal((B, D)).astype(np.float32)
    d = rng.standard_normal((B, M)).astype(np.float32)
    return part, x, d


def test_fill_writes_exactly_the_weights_of_the_slice():
    D, M, B, w_lo = 7, 5, 6, 3
    part, x, d = _stash(D, M, B, w_lo)
    part.put(np.ascontiguousarray(x.T).T, d)  # as Flatten hands it over: a transposed view
    want = (d.T.astype(np.float64) @ x).ravel()
    size = w_lo + D * M + 4
    for lo, hi in [(0, size), (0, 2), (w_lo, w_lo + D), (5, 9), (10, 12), (w_lo + 7, w_lo + 21),
                   (4, 30), (w_lo + D * M - 1, size), (w_lo + D * M, size), (8, 8)]:
        reduced = np.full(size, np.nan, np.float32)
        part.fill(reduced, lo, hi)
        a, b = max(lo, w_lo), min(hi, w_lo + D * M)
        inside = np.zeros(size, bool)
        inside[a:b] = True
        assert np.isnan(reduced[~inside]).all(), (lo, hi)
        np.testing.assert_allclose(reduced[inside], want[a - w_lo:max(a, b) - w_lo], rtol=1e-5, atol=1e-5)


def test_each_shard_goes_to_its_place_in_the_step():
    part, x, d = _stash(B=6)
    for a, b in [(0, 2), (2, 6)]:  # two workers' shards, in either order
        part.begin(6, a)
        part.put(x[a:b], d[a:b])
    reduced = np.zeros(3 + 35, np.float32)
    part.fill(reduced, 0, reduced.size)
    np.testing.assert_allclose(reduced[3:].reshape(5, 7), d.T @ x, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="larger than max_batch"):
        part.begin(7, 0)
    part.begin(6, 5)
    with pytest.raises(ValueError, match="outside the step"):
        part.put(x[:2], d[:2])


def test_the_sum_skips_the_deferred_ranges_only():
    rng = np.random.default_rng(1)
    grads = [rng.standard_normal(40).astype(np.float32) for _ in range(3)]
    full = np.zeros(40, np.float32)
    sum_into(grads, full, 0, 40)
    for lo, hi in [(0, 40), (5, 33), (12, 18), (0, 11)]:
        out = np.full(40, np.nan, np.float32)
        sum_except(grads, out, lo, hi, [(3, 10), (20, 30)])
        keep = np.zeros(40, bool)
        keep[lo:hi] = True
        keep[3:10] = keep[20:30] = False
        assert np.array_equal(out[keep], full[keep])
        assert np.isnan(out[~keep]).all()


def _train(data, n_workers, steps, batch=24, **kw):
    images, labels, mean, std = data
    r = (LocalRunner(MODEL, ("adam", {}), images, labels, mean, std, seed=3) if n_workers == 1
         else ParallelRunner(MODEL, ("adam", {}), images, labels, mean, std, seed=3,
                             n_workers=n_workers, max_batch=batch, **kw))
    grads = []
    with r:
        r.set_order(np.random.default_rng(7).permutation(N_IMAGES))
        for t in range(1, steps + 1):
            lo = ((t - 1) * batch) % (N_IMAGES - batch + 1)
            r.step(lo, lo + batch, 1e-3, t)
            if t == 1:
                grads.append(np.array(r.grads if n_workers == 1 else r.reduced))
        buffers = [np.array(g) for g in r.grads] if n_workers > 1 else []
        return np.array(r.params), grads[0], getattr(r, "deferred", []), buffers


@pytest.mark.slow
@pytest.mark.parametrize("n_workers", [2, 3])
def test_workers_with_row_parallel_weights_match_one_process(data, small_layers_too, n_workers):
    """The first step's gradient to float32 round-off, 20 Adam steps within test_engine's
    tolerance; the workers' own buffers hold nothing for fc1's weights (they never made them)."""
    p1, g1, _, _ = _train(data, 1, 20)
    pn, gn, deferred, buffers = _train(data, n_workers, 20)
    assert deferred == ["fc1"]
    scale = np.abs(g1).max()
    assert np.abs(gn - g1).max() <= 1e-5 * scale, np.abs(gn - g1).max() / scale
    assert np.abs(pn - p1).max() <= 1e-4 * np.abs(p1).max()
    lo, n = _fc1_weights()
    for buf in buffers:
        assert not buf[lo:lo + n].any()
        assert buf[:lo].any()  # the other layers' gradients are there as before
    assert np.abs(gn[lo:lo + n]).max() > 0


def _fc1_weights():
    m = build_model(MODEL[0], **MODEL[1])
    return m.layout.offsets["fc1.w"], 1024 * 16


def test_where_it_is_not_used(small_layers_too):
    m = build_model(MODEL[0], **MODEL[1])
    use = dict(n_workers=2, sharded=True, max_batch=24, micro=None, chunk=None,
               across_machines=False)
    assert rowgrad.deferred_layers(m, **use) == ["fc1"]
    for change in [dict(n_workers=1), dict(sharded=False), dict(max_batch=None), dict(micro=8),
                   dict(chunk=12), dict(across_machines=True)]:
        assert rowgrad.deferred_layers(m, **(use | change)) == [], change
    airbench = build_model("airbench", widths=(8, 16, 16))  # runs its shard in chunks
    assert rowgrad.deferred_layers(airbench, **use) == []


def test_default_threshold_leaves_small_layers_alone():
    m = build_model(MODEL[0], **MODEL[1])
    assert rowgrad.deferred_layers(m, 2, True, 24, None, None, False) == []
    course = build_model("three-layer")  # 8192 x 512
    assert rowgrad.deferred_layers(course, 2, True, 50, None, None, False) == ["fc1"]


@pytest.mark.slow
def test_a_step_larger_than_max_batch_is_refused(data, small_layers_too):
    images, labels, mean, std = data
    with ParallelRunner(MODEL, ("adam", {}), images, labels, mean, std, n_workers=2,
                        max_batch=20) as r:
        assert r.deferred == ["fc1"]
        r.set_order(np.arange(N_IMAGES))
        with pytest.raises(ValueError, match="larger than max_batch"):
            r.step(0, 21, 1e-3, 1)
        r.step(0, 20, 1e-3, 1)  # and the runner still works


@pytest.mark.slow
def test_a_frozen_layer_before_the_trainable_ones_gets_no_gradient(data, small_layers_too):
    """Frozen after step 1, conv1 .. fc1 run no backward (Model.set_frozen): the stash keeps
    step 1's shards, yet fc1's rows of step 2's summed gradient are zero, as without
    row-parallel weights, and its weights stay as they are."""
    images, labels, mean, std = data
    frozen = ("adam", {"freeze": {"conv1": 1, "conv1_bias": 1, "fc1": 1}})
    with ParallelRunner(MODEL, frozen, images, labels, mean, std, seed=3, n_workers=2,
                        max_batch=24) as r:
        assert r.deferred == ["fc1"]
        r.set_order(np.arange(N_IMAGES))
        lo, n = _fc1_weights()
        r.step(0, 24, 1e-3, 1)
        assert np.asarray(r.reduced)[lo:lo + n].any()
        before = np.array(r.params)
        r.step(24, 48, 1e-3, 2)
        assert not np.asarray(r.reduced)[lo:lo + n].any()
        assert np.array_equal(np.asarray(r.params)[lo:lo + n], before[lo:lo + n])
        assert np.asarray(r.reduced)[lo + n:].any()  # fc1's bias and fc2 still learn

"""Issue 6 wired into training: augmentation in the runners (independent of the worker count),
data-dependent initialisation before the workers start, parameters frozen after a step, TTA at the
end of fit, the `airbench` recipe, and exact resume with all of it on.

Tolerance across worker counts is test_engine's (see its docstring): max |p_N - p_1| <= 1e-4 of
max |p_1|, and bit-identical for one worker against LocalRunner on one BLAS thread.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner
from threadpoolctl import threadpool_limits

from partrain.augment import AugmentSpec
from partrain.checkpoint import load_checkpoint
from partrain.cli import main
from partrain.config import TrainConfig
from partrain.recipes import RECIPES, airbench_lr
from partrain.datasets.store import channel_stats
from partrain.nn.airbench import whitening_weights
from partrain.nn.models import build_model
from partrain.parallel.engine import ParallelRunner
from partrain.optim import PhasedOptimizer, make_optimizer
from partrain.runner import LocalRunner
from partrain.evaluate import accuracy, tta_accuracy
from partrain.train import fit
from partrain.tta import tta_logits
from synthetic import learnable_split

N_IMAGES = 300
SMALL_CNN = ("three-layer", dict(num_filters=4, hidden_dim=16, weight_scale=1e-2))
TINY_AIRBENCH = ("airbench", dict(widths=[4, 6, 8], ghost_batch=4))
LR = 0.02
SGD = ("sgd", {"momentum": 0.9})
AUG = AugmentSpec(seed=5, flip=True, translate=2)


@pytest.fixture(scope="module")
def data():
    images, labels = learnable_split(N_IMAGES, np.random.default_rng(0))
    mean, std = channel_stats(images)
    return images, labels, mean, std


def train(data, runner, model=SMALL_CNN, opt=SGD, epochs=2, steps=6, batch=25, first_epoch=0,
          **kw):
    """`epochs` epochs of `steps` steps, each epoch with its own order and number."""
    images, labels, mean, std = data
    with runner(model, opt, images, labels, mean, std, seed=3, **kw) as r:
        out, t = [], 0
        for epoch in range(epochs):
            r.set_order(np.random.default_rng([7, epoch]).permutation(N_IMAGES),
                        first_epoch + epoch)
            for s in range(steps):
                t += 1
                out.append(r.step(s * batch, (s + 1) * batch, LR, t))
        return r.params.copy(), r.state.copy(), out


def engine(n):
    return lambda *a, **kw: ParallelRunner(*a, n_workers=n, **kw)


def test_augmentation_does_not_depend_on_the_worker_count(data):
    with threadpool_limits(1):
        local = train(data, LocalRunner, augment=AUG)
        plain = train(data, LocalRunner)
    one = train(data, engine(1), augment=AUG)
    two = train(data, engine(2), augment=AUG)
    assert np.array_equal(one[0], local[0]) and one[2] == local[2]  # the same computation
    scale = np.abs(local[0]).max()
    assert np.abs(two[0] - local[0]).max() <= 1e-4 * scale
    np.testing.assert_allclose([x for x, _ in two[2]], [x for x, _ in local[2]], rtol=1e-4)
    # ...and augmentation is really on: far beyond that tolerance from the run without it
    assert np.abs(plain[0] - local[0]).max() > 100 * 1e-4 * scale
    # the epoch number reaches the workers: the same orders numbered 1, 2 instead of 0, 1 give
    # another run (the flips alternate), which LocalRunner agrees with
    later = train(data, engine(2), augment=AUG, first_epoch=1)
    with threadpool_limits(1):
        later_local = train(data, LocalRunner, augment=AUG, first_epoch=1)
    assert np.abs(later[0] - later_local[0]).max() <= 1e-4 * scale
    assert np.abs(later[0] - local[0]).max() > 100 * 1e-4 * scale


def test_init_from_data_runs_in_the_parent_on_train_indices_only(data):
    images, labels, mean, std = data
    train_idx = np.arange(50, N_IMAGES)[::-1]  # any order: the first of the sorted ones are used
    other = images.copy()
    other[:50] = 255 - other[:50]  # "validation" images: must not matter
    with threadpool_limits(1):
        local = LocalRunner(TINY_AIRBENCH, SGD, images, labels, mean, std, seed=3,
                            init_idx=train_idx)
    with ParallelRunner(TINY_AIRBENCH, SGD, other, labels, mean, std, seed=3, n_workers=2,
                        init_idx=train_idx) as r:
        assert np.array_equal(r.state, local.state) and np.array_equal(r.params, local.params)
    w = local.model.state_layout.views(local.state)["whiten.w"]
    np.testing.assert_allclose(w, whitening_weights(images[50:], mean, std), rtol=1e-5)
    # without data, the whitening filters are the random placeholder
    m = build_model(*TINY_AIRBENCH[:1], **TINY_AIRBENCH[1])
    m.bind(np.zeros(m.layout.size, np.float32), None, np.zeros(m.state_layout.size, np.float32))
    m.init_params(np.random.default_rng(3))
    assert not np.allclose(m.state, local.state)
    assert m.init_from_data(images, train_idx, mean, std)
    assert np.array_equal(m.state, local.state)
    assert not build_model("linear").init_from_data(images, None, mean, std)  # nothing to do


def test_freeze_after_steps_is_exact_and_stateless():
    m = build_model(*TINY_AIRBENCH[:1], **TINY_AIRBENCH[1])
    opt = make_optimizer(m, ("sgd", {"momentum": 0.85, "nesterov": True,
                                     "weight_decay": 1e-3, "freeze": {"whiten_bias": 2}}))
    plain = make_optimizer(m, ("sgd", {"momentum": 0.85, "nesterov": True,
                                       "weight_decay": 1e-3}))
    assert isinstance(opt, PhasedOptimizer) and opt.state_names == ("velocity",)
    lo = m.layout.offsets["whiten_bias.b"]
    bias = slice(lo, lo + 24)
    rng = np.random.default_rng(0)
    p = rng.standard_normal(m.layout.size).astype(np.float32)
    q = p.copy()
    st, st_plain = {"velocity": np.zeros_like(p)}, {"velocity": np.zeros_like(p)}
    for t in range(1, 5):
        g = rng.standard_normal(p.size).astype(np.float32)
        before = p.copy()
        opt.step(p, g, st, t, 0.1)
        plain.step(q, g, st_plain, t, 0.1)
        if t <= 2:  # trained for 2 steps: exactly the plain optimizer
            assert np.array_equal(p, q)
        else:
            assert np.array_equal(p[bias], before[bias])
            rest = np.ones(p.size, bool)
            rest[bias] = False
            assert np.array_equal(p[rest], q[rest])  # everything else as before
    with pytest.raises(ValueError, match="no such parameter"):
        make_optimizer(m, ("sgd", {"freeze": {"nope": 1}}))


def test_tta_accuracy_is_tta_logits_and_plain_accuracy(data):
    images, labels, mean, std = data
    m = build_model("vgg", widths=(4, 4), ghost_batch=2)
    m.bind(np.zeros(m.layout.size, np.float32), None, None)
    m.init_params(np.random.default_rng(1))
    from partrain.batches import make_batch, normaliser
    scale, shift = normaliser(mean, std)
    idx = np.arange(40)
    plain, with_tta = tta_accuracy(m, images, labels, scale, shift, "flip_translate", batch=16,
                                   idx=idx)
    assert plain == accuracy(m, images, labels, scale, shift, idx)[0]
    x, y = make_batch(images, labels, idx, scale, shift)
    z = tta_logits(m, x, "flip_translate")
    assert z.shape == (40, 10)
    assert with_tta == np.mean(z.argmax(axis=1) == y)


# ----------------------------------------------------------------------------- recipe and fit
def test_recipe_values():
    r = RECIPES["airbench"]
    assert r.lr == pytest.approx(1.5) and airbench_lr(512) == pytest.approx(0.75)
    # airbench's per-step decay lr·wd = 0.0153·1024 / (1024·(1 + 1/0.15)) is unchanged
    assert r.lr * r.weight_decay == pytest.approx(0.0153 / (1 + 1 / 0.15))
    assert r.batch_size == 1024 and r.epochs == 10 and r.nesterov
    assert RECIPES["airbench-short"].epochs < r.epochs
    r.check()


def test_fit_dry_run_with_recipe_and_explicit_options():
    res = CliRunner().invoke(main, ["fit", "--recipe", "airbench", "--dry-run", "--epochs", "2",
                                    "--model-option", "widths=[8,8,8]", "--no-flip"])
    assert res.exit_code == 0, res.output
    out = res.output
    assert "settings (recipe airbench):" in out and "model airbench" in out
    assert "  epochs             2" in out and "  lr                 1.5" in out
    assert "  augment_flip       False" in out and "augment_translate  2" in out
    assert "widths=[8, 8, 8]" in out and "label_smoothing=0.2" in out
    res = CliRunner().invoke(main, ["fit", "--recipe", "nope", "--dry-run"])
    assert res.exit_code == 1 and "unknown recipe 'nope'" in res.output


def _tiny_config(store, **kw):
    base = dict(model="airbench", model_options=dict(widths=[4, 6, 8], ghost_batch=10),
                optimizer="sgd", lr=0.2, momentum=0.85, nesterov=True, weight_decay=1e-3,
                schedule="onecycle", batch_size=50, epochs=2, val_size=50, data=str(store),
                log_every=4, augment_flip=True, augment_translate=2,
                freeze_after={"whiten_bias": 1}, tta="flip_translate", lookahead=True, workers=1)
    base.update(kw)
    return TrainConfig(**base)


# mid-epoch 1; at its end (the freeze); later
@pytest.mark.parametrize("stop_after", [4, pytest.param(9, marks=pytest.mark.slow),
                                        pytest.param(12, marks=pytest.mark.slow)])
def test_resume_with_augmentation_is_bit_identical(tiny_store, tmp_path, stop_after):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    full = fit(_tiny_config(tiny_store), a, quiet=True)
    assert 0 <= full["test_acc"] <= 1 and 0 <= full["test_acc_tta"] <= 1
    assert full["tta"] == "flip_translate"
    fit(_tiny_config(tiny_store), b, quiet=True, max_steps=stop_after)
    cut, _ = load_checkpoint(b / "checkpoint.h5")
    fit(_tiny_config(tiny_store), b, resume=True, quiet=True)
    pa, _ = load_checkpoint(a / "checkpoint.h5")
    pb, _ = load_checkpoint(b / "checkpoint.h5")
    for k in pa:
        np.testing.assert_array_equal(pa[k], pb[k], err_msg=k)
    # Lookahead: 18 steps; the last one sets the weights to the slow average
    assert np.array_equal(pa["params"], pa["lookahead.params"])
    assert np.array_equal(pa["state"], pa["lookahead.state"])
    if stop_after == 4:  # once: augmentation and Lookahead really act in fit; config.json
        runs = {}
        for name, change in [("no-aug", dict(augment_flip=False, augment_translate=0)),
                             ("no-lookahead", dict(lookahead=False))]:
            (tmp_path / name).mkdir()
            fit(_tiny_config(tiny_store, **change), tmp_path / name, quiet=True)
            runs[name], _ = load_checkpoint(tmp_path / name / "checkpoint.h5")
            assert not np.array_equal(pa["params"], runs[name]["params"])
        cfg = json.loads((a / "config.json").read_text())["config"]
        assert cfg["augment_flip"] and cfg["freeze_after"] == {"whiten_bias": 1}
        assert cfg["lookahead"]
        # 450 training images in batches of 50: 9 steps per epoch; the whitening bias trains in
        # epoch 1 only, so after step 9 it is final (without Lookahead, which, as airbench94's,
        # also averages frozen parameters)
        d = tmp_path / "d"
        d.mkdir()
        fit(_tiny_config(tiny_store, lookahead=False), d, quiet=True, max_steps=9)
        pd, _ = load_checkpoint(d / "checkpoint.h5")
        lo = build_model("airbench", **_tiny_config(tiny_store).model_options).layout.offsets[
            "whiten_bias.b"]
        bias = slice(lo, lo + 24)
        final = runs["no-lookahead"]["params"]
        assert np.array_equal(pd["params"][bias], final[bias])
        assert not np.array_equal(pd["params"], final)


@pytest.mark.slow
def test_cli_recipe_run_on_two_workers_resumes(tiny_store, tmp_path):
    args = ["fit", "--recipe", "airbench-short", "--model-option", "widths=[4,6,8]",
            "--model-option", "ghost_batch=10", "--batch-size", "50", "--val-size", "50",
            "--workers", "2", "--data-dir", str(tiny_store.parent), "--runs-dir",
            str(tmp_path / "runs"), "--name", "r"]
    res = CliRunner().invoke(main, args + ["--max-steps", "5"])
    assert res.exit_code == 0, res.output
    assert "recipe airbench-short" in res.output and "translate 2 px" in res.output
    run = tmp_path / "runs" / "r"
    saved = json.loads((run / "config.json").read_text())["config"]
    # an explicit batch size rescales the recipe's lr
    assert saved["recipe"] == "airbench-short" and saved["lr"] == pytest.approx(1.5 * 50 / 1024)
    assert saved["epochs"] == 3 and saved["batch_size"] == 50
    res = CliRunner().invoke(main, ["fit", "--resume", str(run)])
    assert res.exit_code == 0, res.output
    assert "done: 3 epochs" in res.output and "with TTA (flip_translate)" in res.output
    summary = json.loads((run / "summary.json").read_text())
    assert {"test_acc", "test_acc_tta", "images_per_s", "train_time_s"} <= set(summary)
    mem = summary["memory"]  # the parent and both workers, read while they were alive
    assert mem["total_pss_mib"] > 0 and mem["worker_peak_rss_mib"] > 0
    assert "memory: " in res.output and "GiB largest worker" in res.output
    res = CliRunner().invoke(main, ["evaluate", str(run), "--checkpoint", "last", "--tta",
                                    "flip_translate", "--out", str(tmp_path / "eval")])
    assert res.exit_code == 0, res.output
    assert "with TTA (flip_translate)" in res.output
    result = json.loads((tmp_path / "eval" / "evaluation.json").read_text())
    # the same parameters and the same computation as fit's final numbers (one flip allowed)
    assert abs(result["test_accuracy_tta"] - summary["test_acc_tta"]) <= 0.01
    assert abs(result["test_accuracy"] - summary["test_acc"]) <= 0.01


def test_airbench_lookahead_by_hand():
    from partrain.ema import AirbenchLookahead
    p = np.zeros(3, np.float32)
    st = np.ones(2, np.float32)
    la = AirbenchLookahead(p, st, total_steps=10)
    p[:] = 1.0
    st[:] = 3.0
    for t in range(1, 5):
        la.after_step(t)  # nothing until step 5
    assert np.all(p == 1.0) and la.arrays()["lookahead.params"].sum() == 0
    la.after_step(5)      # decay d = 0.95^5 · (5/10)^3: slow = d·0 + (1-d)·1, fast = slow
    d = 0.95 ** 5 * 0.125
    np.testing.assert_allclose(p, 1 - d, rtol=1e-6)
    np.testing.assert_allclose(st, d * 1 + (1 - d) * 3, rtol=1e-6)
    np.testing.assert_array_equal(la.arrays()["lookahead.params"], p)
    p[:] = 5.0
    la.after_step(10)     # d = 0.95^5 at step 10, then the final sync (d = 1) keeps the average
    d10 = 0.95 ** 5
    np.testing.assert_allclose(p, d10 * (1 - d) + (1 - d10) * 5, rtol=1e-6)


def test_frozen_layer_skips_its_backward_without_changing_the_run(tiny_store, monkeypatch):
    """From the freeze step on the model skips the whitening bias's backward (and conv0a's input
    gradient); the parameters after the freeze are bit-identical to computing it all."""
    import partrain.runner as R
    from partrain.datasets.store import load_store
    from partrain.runner import LocalRunner

    data = load_store(tiny_store)
    spec = ("sgd", {"momentum": 0.85, "nesterov": True, "weight_decay": 1e-3,
                    "freeze": {"whiten_bias": 2}})
    results = []
    for skip in (True, False):
        if not skip:
            monkeypatch.setattr(R, "sync_frozen", lambda *a: None)
        r = LocalRunner(TINY_AIRBENCH, spec, data.train_images, data.train_labels, data.mean,
                        data.std, seed=0)
        r.set_order(np.arange(len(data.train_labels)))
        for t in range(1, 6):
            r.step(16 * (t - 1), 16 * t, 0.1, t)
        assert ("whiten_bias" in r.model.frozen) == skip
        results.append(r.params.copy())
    np.testing.assert_array_equal(results[0], results[1])

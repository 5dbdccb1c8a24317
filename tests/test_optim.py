"""Optimizers against the textbook formulas (float64, element by element), sharding, schedules."""
from __future__ import annotations

import math
import pickle

import numpy as np
import pytest

from partrain.optim import Adam, SGD, build_optimizer, make_schedule

N = 300
DECAY = [(0, 120), (150, 230, 0.25), (230, 260)]  # weights, one part at 1/4 of the decay
#                                                     (as a BN bias's); the gaps are "biases"
SCALE = [(100, 170, 0.1), (280, 300, 3.0)]


def _rates(n=N, decay=DECAY, scale=SCALE):
    """Per-element (decay scale, 0: none; lr multiplier), written independently of
    partrain.optim."""
    d = np.zeros(n)
    s = np.ones(n)
    for lo, hi, *dc in decay:
        d[lo:hi] = dc[0] if dc else 1.0
    for lo, hi, sc in scale:
        s[lo:hi] = sc
    return d, s


def ref_adam(p, g, m, v, t, lr, b1=0.9, b2=0.999, eps=1e-8, wd=0.0, decoupled=False):
    """Textbook Adam / AdamW in float64, one element at a time."""
    d, s = _rates(len(p))
    p, m, v = p.astype(np.float64), m.astype(np.float64), v.astype(np.float64)
    for i in range(len(p)):
        lri = lr * s[i]
        gi = float(g[i])
        if d[i] and not decoupled:
            gi += wd * d[i] * p[i]
        m[i] = b1 * m[i] + (1 - b1) * gi
        v[i] = b2 * v[i] + (1 - b2) * gi * gi
        if d[i] and decoupled:
            p[i] -= lri * wd * d[i] * p[i]
        mhat = m[i] / (1 - b1 ** t)
        vhat = v[i] / (1 - b2 ** t)
        p[i] -= lri * mhat / (math.sqrt(vhat) + eps)
    return p, m, v


def ref_sgd(p, g, u, lr, mu=0.0, nesterov=False, wd=0.0, decoupled=False):
    """torch.optim.SGD's formula in float64, one element at a time."""
    d, s = _rates(len(p))
    p, u = p.astype(np.float64), u.astype(np.float64)
    for i in range(len(p)):
        lri = lr * s[i]
        gi = float(g[i])
        if d[i] and not decoupled:
            gi += wd * d[i] * p[i]
        if d[i] and decoupled:
            p[i] -= lri * wd * d[i] * p[i]
        u[i] = mu * u[i] + gi
        step = gi + mu * u[i] if nesterov else (u[i] if mu else gi)
        p[i] -= lri * step
    return p, u


def _vectors(seed=0, n=N):
    rng = np.random.default_rng(seed)
    return rng.standard_normal(n).astype(np.float32), rng


@pytest.mark.parametrize("wd,decoupled", [(0.0, False), (0.05, False), (0.05, True)])
def test_adam_matches_textbook(wd, decoupled):
    p, rng = _vectors()
    opt = Adam(weight_decay=wd, decoupled=decoupled, decay_ranges=DECAY,
               lr_scale_ranges=SCALE, chunk=37)   # chunk not dividing anything: exercises edges
    state = {k: np.zeros(N, np.float32) for k in opt.state_names}
    rp, rm, rv = p.astype(np.float64), np.zeros(N), np.zeros(N)
    for t in range(1, 6):
        g = (rng.standard_normal(N) * 10.0 ** rng.uniform(-4, 1, N)).astype(np.float32)
        lr = 0.01 * (1 - 0.1 * t)
        opt.step(p, g, state, t, lr)
        rp, rm, rv = ref_adam(rp, g, rm, rv, t, lr, wd=wd, decoupled=decoupled)
        np.testing.assert_allclose(state["m"], rm, rtol=1e-5, atol=1e-10)
        np.testing.assert_allclose(state["v"], rv, rtol=1e-5, atol=1e-14)
        np.testing.assert_allclose(p, rp, rtol=1e-6, atol=1e-6)


def test_adam_first_step_by_hand():
    """Step 1: m_hat = g and v_hat = g^2, so every parameter moves by lr*g/(|g|+eps)."""
    p = np.array([1.0, -2.0, 0.5, 0.0], np.float32)
    g = np.array([0.3, -4.0, 1e-3, 0.0], np.float32)
    opt = build_optimizer("adam")
    state = {"m": np.zeros(4, np.float32), "v": np.zeros(4, np.float32)}
    opt.step(p, g, state, 1, 0.1)
    expected = np.array([1.0 - 0.1, -2.0 + 0.1, 0.5 - 0.1 * 1e-3 / (1e-3 + 1e-8), 0.0])
    np.testing.assert_allclose(p, expected, rtol=1e-6)
    np.testing.assert_allclose(state["m"], 0.1 * g, rtol=1e-6)
    np.testing.assert_allclose(state["v"], 0.001 * g.astype(np.float64) ** 2, rtol=1e-6)


def test_adam_l2_is_the_course_regularisation():
    """Coupled decay adds reg*W to the gradient: the derivative of 0.5*reg*sum(W^2)."""
    p = np.array([2.0, 2.0], np.float32)
    g = np.zeros(2, np.float32)
    opt = Adam(weight_decay=0.1, decay_ranges=[(0, 1)])
    state = {k: np.zeros(2, np.float32) for k in opt.state_names}
    opt.step(p, g, state, 1, 0.5)
    assert state["m"][0] == pytest.approx(0.1 * 0.1 * 2.0)   # (1-b1) * reg * W
    assert p[0] == pytest.approx(1.5, rel=1e-6) and p[1] == 2.0  # moved by lr; undecayed stays


@pytest.mark.parametrize("mu,nesterov,wd,decoupled", [
    (0.0, False, 0.0, False), (0.0, False, 0.01, False), (0.9, False, 0.01, False),
    (0.9, True, 5e-4, False), (0.85, True, 0.05, True)])
def test_sgd_matches_textbook(mu, nesterov, wd, decoupled):
    p, rng = _vectors(1)
    opt = SGD(momentum=mu, nesterov=nesterov, weight_decay=wd, decoupled=decoupled,
              decay_ranges=DECAY, lr_scale_ranges=SCALE, chunk=50)
    assert opt.state_names == (("velocity",) if mu else ())
    state = {k: np.zeros(N, np.float32) for k in opt.state_names}
    rp, ru = p.astype(np.float64), np.zeros(N)
    for t in range(1, 5):
        g = rng.standard_normal(N).astype(np.float32)
        opt.step(p, g, state, t, 0.1 / t)
        rp, ru = ref_sgd(rp, g, ru, 0.1 / t, mu, nesterov, wd, decoupled)
        np.testing.assert_allclose(p, rp, rtol=1e-5, atol=1e-6)
        if mu:
            np.testing.assert_allclose(state["velocity"], ru, rtol=1e-5, atol=1e-6)


def test_sgd_first_step_by_hand():
    p = np.array([1.0, 1.0, 1.0], np.float32)
    g = np.array([2.0, 0.0, -1.0], np.float32)
    opt = SGD(momentum=0.9, nesterov=True, weight_decay=0.1, decay_ranges=[(1, 3)])
    state = {"velocity": np.zeros(3, np.float32)}
    opt.step(p, g, state, 1, 0.5)
    # g' = g + 0.1*p on [1, 3) = [2, 0.1, -0.9]; u = g'; nesterov d = g' + 0.9*u = 1.9*g'
    np.testing.assert_allclose(state["velocity"], [2.0, 0.1, -0.9], rtol=1e-6)
    np.testing.assert_allclose(p, [1 - 0.5 * 3.8, 1 - 0.5 * 0.19, 1 + 0.5 * 1.71], rtol=1e-6)


CONFIGS = [("adam", dict(weight_decay=0.01)), ("adamw", dict(weight_decay=0.05)),
           ("sgd", dict(momentum=0.9, nesterov=True, weight_decay=5e-4)),
           ("sgd", dict(momentum=0.9, weight_decay=0.05, decoupled=True)), ("sgd", {})]


@pytest.mark.parametrize("name,hyper", CONFIGS)
def test_sharded_steps_equal_one_step_bit_for_bit(name, hyper):
    """Workers stepping [0,k) and [k,n) with their own optimizers equal one full step exactly."""
    n = 5000
    decay = [(0, 1200), (1300, 3000), (3010, 4990)]
    scale = [(1100, 1350, 0.1), (4000, 4100, 2.0)]
    rng = np.random.default_rng(2)
    p0 = rng.standard_normal(n).astype(np.float32)
    make = lambda: build_optimizer(name, decay_ranges=decay, lr_scale_ranges=scale,
                                   chunk=256, **hyper)
    full = make()
    state_full = {k: np.zeros(n, np.float32) for k in full.state_names}
    p_full = p0.copy()
    cuts = [0, 1, 700, 1150, 1301, 2999, 3005, 4050, 4999, n]  # inside ranges, chunks, gaps
    shards = [make() for _ in cuts[:-1]]
    state_sh = {k: np.zeros(n, np.float32) for k in full.state_names}
    p_sh = p0.copy()
    for t in range(1, 4):
        g = rng.standard_normal(n).astype(np.float32)
        full.step(p_full, g, state_full, t, 0.01)
        for opt, lo, hi in zip(shards, cuts[:-1], cuts[1:]):
            opt.step(p_sh, g, state_sh, t, 0.01, lo, hi)
        assert np.array_equal(p_full, p_sh)
        for k in full.state_names:
            assert np.array_equal(state_full[k], state_sh[k])


@pytest.mark.parametrize("name,hyper", CONFIGS)
def test_chunk_size_does_not_change_results(name, hyper):
    rng = np.random.default_rng(3)
    p0 = rng.standard_normal(N).astype(np.float32)
    g = rng.standard_normal(N).astype(np.float32)
    out = []
    for chunk in (1, 7, 64, 100_000):
        opt = build_optimizer(name, decay_ranges=DECAY, lr_scale_ranges=SCALE, chunk=chunk, **hyper)
        st = {k: np.zeros(N, np.float32) for k in opt.state_names}
        p = p0.copy()
        opt.step(p, g, st, 1, 0.01)
        out.append(p)
    for p in out[1:]:
        assert np.array_equal(out[0], p)


@pytest.mark.parametrize("name,hyper", CONFIGS)
def test_grads_are_read_only_and_outside_slice_untouched(name, hyper):
    rng = np.random.default_rng(4)
    p = rng.standard_normal(N).astype(np.float32)
    g = rng.standard_normal(N).astype(np.float32)
    g_before, p_before = g.copy(), p.copy()
    opt = build_optimizer(name, decay_ranges=DECAY, lr_scale_ranges=SCALE, chunk=16, **hyper)
    st = {k: np.zeros(N, np.float32) for k in opt.state_names}
    opt.step(p, g, st, 1, 0.01, lo=50, hi=210)
    assert np.array_equal(g, g_before)
    assert np.array_equal(p[:50], p_before[:50]) and np.array_equal(p[210:], p_before[210:])
    assert not np.array_equal(p[50:210], p_before[50:210])
    for k in opt.state_names:
        assert not st[k][:50].any() and not st[k][210:].any()
    opt.step(p, g, st, 2, 0.01, lo=7, hi=7)  # empty slice: a no-op
    assert np.array_equal(p[:50], p_before[:50])


def test_lr_scale_ranges_scale_the_step():
    """Plain SGD moves each element by lr*scale*g, scale 1 outside the ranges."""
    p = np.zeros(10, np.float32)
    g = np.ones(10, np.float32)
    SGD(lr_scale_ranges=[(2, 4, 0.5), (8, 10, 0.0)]).step(p, g, {}, 1, 0.1)
    np.testing.assert_allclose(p, -0.1 * np.array([1, 1, .5, .5, 1, 1, 1, 1, 0, 0]), rtol=1e-6)


def test_float64_parameters():
    p = np.ones(20)
    opt = Adam(chunk=8)
    st = {k: np.zeros(20) for k in opt.state_names}
    opt.step(p, np.full(20, 0.5), st, 1, 0.1)
    np.testing.assert_allclose(p, 1 - 0.1 * 0.5 / (0.5 + 1e-8), rtol=1e-14)


def test_bad_names_and_arguments():
    with pytest.raises(ValueError, match="unknown optimizer"):
        build_optimizer("adagrad")
    with pytest.raises(ValueError, match="bad hyperparameters"):
        build_optimizer("sgd", betas=(0.9, 0.99))
    with pytest.raises(ValueError):
        Adam(betas=(1.0, 0.999))
    with pytest.raises(ValueError, match="overlap"):
        Adam(decay_ranges=[(0, 10), (5, 20)])
    with pytest.raises(ValueError, match="nesterov"):
        SGD(nesterov=True)
    opt = Adam()
    p = np.zeros(10, np.float32)
    with pytest.raises(ValueError, match="state"):
        opt.step(p, p.copy(), {"m": np.zeros(10, np.float32)}, 1, 0.1)
    with pytest.raises(ValueError, match="outside"):
        opt.step(p, p.copy(), {"m": p.copy(), "v": p.copy()}, 1, 0.1, 5, 11)
    with pytest.raises(ValueError, match="1-based"):
        opt.step(p, p.copy(), {"m": p.copy(), "v": p.copy()}, 0, 0.1)


def test_the_learning_rate_comes_only_with_the_step():
    with pytest.raises(TypeError):
        Adam(lr=0.1)
    with pytest.raises(ValueError, match="unexpected keyword argument 'lr'"):
        build_optimizer("sgd", lr=123.0)  # no second road: a spec carries no lr
    opt = build_optimizer("sgd")
    p = np.ones(4, np.float32)
    opt.step(p, np.ones(4, np.float32), {}, 1, 0.25)
    np.testing.assert_array_equal(p, 0.75)


def test_adamw_alias_and_betas():
    opt = build_optimizer("AdamW", weight_decay=0.1, beta1=0.8, beta2=0.99)
    assert isinstance(opt, Adam) and opt.decoupled and opt.betas == (0.8, 0.99)
    assert not build_optimizer("adam", weight_decay=0.1).decoupled


# -- schedules -------------------------------------------------------------------------------

def test_constant_and_step():
    f = make_schedule("constant", 0.1, 100)
    assert f(0) == f(99) == 0.1
    f = make_schedule("step", 1.0, 100, step_size=30, gamma=0.5)
    assert [f(s) for s in (0, 29, 30, 59, 60, 99, 500)] == [1, 1, .5, .5, .25, .125, .125]
    f = make_schedule("step", 1.0, 90)   # default: drop 10x after each third of training
    assert [f(s) for s in (0, 29, 30, 60, 89)] == pytest.approx([1, 1, .1, .01, .01])


def test_cosine():
    f = make_schedule("cosine", 1.0, 100, final_lr=0.1)
    assert f(0) == pytest.approx(1.0)
    assert f(50) == pytest.approx(0.55)
    assert f(25) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 4)))
    assert f(100) == pytest.approx(0.1) and f(1000) == pytest.approx(0.1)
    assert make_schedule("cosine", 2.0, 10)(10) == pytest.approx(0.0)


def test_linear_decay():
    f = make_schedule("linear", 1.0, 10, final_lr=0.5)
    assert [f(s) for s in (0, 5, 10, 20)] == pytest.approx([1.0, 0.75, 0.5, 0.5])


def test_warmup_on_top_of_any_kind():
    f = make_schedule("constant", 0.4, 100, warmup_steps=4)
    assert [f(s) for s in range(6)] == pytest.approx([0.1, 0.2, 0.3, 0.4, 0.4, 0.4])
    g = make_schedule("cosine", 1.0, 100, warmup_steps=10)
    assert g(4) == pytest.approx(0.5 * 0.5 * (1 + math.cos(math.pi * 0.04)))
    assert g(50) == pytest.approx(0.5)


def test_onecycle_triangle():
    f = make_schedule("onecycle", 2.0, 100, start_frac=0.2, peak_frac=0.25, end_frac=0.07)
    assert f(0) == pytest.approx(0.4)
    assert f(25) == pytest.approx(2.0)
    assert f(10) == pytest.approx(2.0 * (0.2 + 0.8 * 10 / 25))
    assert f(60) == pytest.approx(2.0 * (1 - 0.93 * 35 / 75))
    assert f(100) == pytest.approx(0.14) and f(150) == pytest.approx(0.14)
    t = make_schedule("triangular", 1.0, 1000)   # airbench94 defaults: 0.2 -> 1 at 23% -> 0.07
    assert t(0) == pytest.approx(0.2) and t(230) == pytest.approx(1.0)
    assert t(1000) == pytest.approx(0.07)


def test_schedules_pickle_and_reject_bad_input():
    f = pickle.loads(pickle.dumps(make_schedule("cosine", 1.0, 10, warmup_steps=2)))
    assert f(0) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="unknown schedule"):
        make_schedule("exponential", 1.0, 10)
    with pytest.raises(ValueError, match="takes no"):
        make_schedule("cosine", 1.0, 10, gamma=0.5)
    with pytest.raises(ValueError, match="step_size"):
        make_schedule("step", 1.0, 10, step_size=0)
    with pytest.raises(ValueError):
        make_schedule("constant", 1.0, 0)

"""EMA and Lookahead of the flat parameter vector against hand-computed values."""
import numpy as np
import pytest

from partrain.ema import Lookahead, ParamEMA


def test_ema_hand_values():
    ema = ParamEMA(0.9)
    p = np.array([1.0, 2.0, 0.0], np.float32)
    ema.update(p)  # first call starts the average at p
    np.testing.assert_allclose(ema.ema, [1, 2, 0])
    p[:] = [2.0, 2.0, 10.0]
    assert ema.update(p) == 0.9
    np.testing.assert_allclose(ema.ema, [1.1, 2.0, 1.0], rtol=1e-6)
    p[:] = 0
    ema.update(p)
    np.testing.assert_allclose(ema.ema, [0.99, 1.8, 0.9], rtol=1e-6)
    assert ema.ema.dtype == np.float32 and not np.shares_memory(ema.ema, p)


def test_ema_chunks_equal_one_pass():
    rng = np.random.default_rng(0)
    p0, p1, p2 = (rng.standard_normal(1000) for _ in range(3))
    a, b = ParamEMA(0.8, chunk=7), ParamEMA(0.8, chunk=10_000)
    for e in (a, b):
        e.init(p0)
        e.update(p1)
        e.update(p2)
    np.testing.assert_array_equal(a.ema, b.ema)
    np.testing.assert_allclose(a.ema, 0.64 * p0 + 0.16 * p1 + 0.2 * p2, rtol=1e-12)


def test_ema_warmup_decay():
    e = ParamEMA(0.99, warmup=True)
    assert e.decay_at(0) == pytest.approx(0.1)
    assert e.decay_at(10) == pytest.approx(11 / 20)
    assert e.decay_at(10_000) == 0.99
    e.init(np.zeros(2))
    assert e.update(np.ones(2), step=0) == pytest.approx(0.1)
    np.testing.assert_allclose(e.ema, [0.9, 0.9])


def test_swap_and_copy():
    e = ParamEMA(0.5, chunk=3)
    p = np.arange(8.0)
    e.init(p)
    e.update(np.zeros(8))                 # ema = p / 2
    with e.swapped(p):
        np.testing.assert_allclose(p, np.arange(8.0) / 2)
    np.testing.assert_allclose(p, np.arange(8.0))
    np.testing.assert_allclose(e.copy_to(np.empty(8)), np.arange(8.0) / 2)
    e.swap_in(p)
    e.swap_out(p)
    np.testing.assert_allclose(p, np.arange(8.0))


def test_ema_into_given_array():
    out = np.empty(4)
    e = ParamEMA(0.5)
    e.init(np.ones(4), out=out)
    e.update(np.full(4, 3.0))
    np.testing.assert_allclose(out, 2.0)


def test_lookahead_hand_values():
    la = Lookahead(0.5, chunk=2)
    fast = np.array([0.0, 4.0, -2.0])
    la.update(fast)                       # first call: slow = fast
    fast += [2.0, 2.0, 2.0]               # some optimizer steps
    la.update(fast)
    np.testing.assert_allclose(la.slow, [1.0, 5.0, -1.0])
    np.testing.assert_allclose(fast, la.slow)
    fast[:] = [3.0, 5.0, 3.0]
    la.update(fast, alpha=0.25)
    np.testing.assert_allclose(fast, [1.5, 5.0, 0.0])


def test_bad_arguments():
    with pytest.raises(ValueError):
        ParamEMA(1.0)
    with pytest.raises(ValueError):
        Lookahead(0.0)

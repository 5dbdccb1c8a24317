"""Lookahead of the flat parameter vector against hand-computed values."""
import numpy as np
import pytest

from partrain.ema import Lookahead


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
        Lookahead(0.0)

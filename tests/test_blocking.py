"""The elementwise kernels run a block of channels at a time (nn/blocking.py): whatever the block
size, every output and gradient must be bit-identical to the one-block computation."""
import numpy as np
import pytest

from partrain.nn import batchnorm as BN
from partrain.nn import blocking
from partrain.nn import functional as F
from partrain.nn import gelu as G
from partrain.nn.blocking import channel_blocks
from partrain.nn.workspace import Workspace


def test_channel_blocks_cover_the_channels_once():
    for shape in [(1, 4, 4, 2), (7, 3, 5, 8), (256, 14, 14, 64)]:
        blocks = channel_blocks(shape)
        covered = np.concatenate([np.arange(shape[0])[s] for s in blocks])
        np.testing.assert_array_equal(covered, np.arange(shape[0]))
        assert len({s.stop - s.start for s in blocks[:-1]}) <= 1


def _all_kernels(x, d_pool, d_map, groups):
    ws = Workspace()
    out = {}
    p, pc = F.maxpool_forward(x, ws=ws)
    out["pool"] = p.copy()
    out["pool_dx"] = F.maxpool_backward(d_pool, pc, ws).copy()
    g, gc = G.gelu_forward(x, ws)
    out["gelu"] = g.copy()
    out["gelu_dx"] = G.gelu_backward(d_map, gc, ws).copy()
    g, gc = G.gelu_erf_forward(x, ws, key="erf")
    out["gelu_erf"] = g.copy()
    out["gelu_erf_dx"] = G.gelu_backward(d_map, gc, ws, key="erf").copy()
    C = x.shape[0]
    gamma = np.linspace(0.5, 1.5, C).astype(x.dtype)
    beta = np.linspace(-1, 1, C).astype(x.dtype)
    b, bc, (ms, vs) = BN.batchnorm_forward(x, gamma, beta, groups, 1e-5, ws)
    out["bn"], out["bn_mean"], out["bn_var"] = b.copy(), ms.copy(), vs.copy()
    dg, db = np.empty(C, x.dtype), np.empty(C, x.dtype)
    dx, _, _ = BN.batchnorm_backward(d_map, bc, dg, db, ws)
    out["bn_dx"], out["bn_dgamma"], out["bn_dbeta"] = dx.copy(), dg.copy(), db.copy()
    return out


@pytest.mark.parametrize("groups", [[(0, 8)], [(0, 3), (3, 8)]])
def test_blocked_kernels_give_the_same_bits(monkeypatch, groups):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((9, 6, 4, 8)).astype(np.float32)
    d_pool = rng.standard_normal((9, 3, 2, 8)).astype(np.float32)
    d_map = rng.standard_normal(x.shape).astype(np.float32)
    monkeypatch.setattr(blocking, "BLOCK_BYTES", 1 << 30)   # one block
    whole = _all_kernels(x, d_pool, d_map, groups)
    monkeypatch.setattr(blocking, "BLOCK_BYTES", 2 * 6 * 4 * 8 * 4)  # 2 channels: 5 blocks
    assert len(channel_blocks(x.shape)) == 5
    blocked = _all_kernels(x, d_pool, d_map, groups)
    for k in whole:
        assert whole[k].tobytes() == blocked[k].tobytes(), k

"""Chunked passes (Model.chunk_size) and the workspaces they rely on: a shard done chunk after
chunk gives the gradient, loss, accuracy, batch-norm statistics and logits of one whole pass (up to
float round-off), whatever the chunk, and a workspace reuses its memory for smaller requests."""
import numpy as np
import pytest

from partrain.nn.models import build_model
from partrain.nn.workspace import Workspace

RNG = np.random.default_rng(3)


def bound(chunk_size, dtype=np.float64, **options):
    m = build_model("airbench", dtype=dtype, widths=(8, 12, 16), ghost_batch=4, **options)
    params = np.zeros(m.layout.size, dtype)
    m.bind(params, np.zeros_like(params), np.zeros(m.state_layout.size, dtype))
    m.init_params(np.random.default_rng(0))
    m.chunk_size = chunk_size
    return m


@pytest.mark.parametrize("chunk", [4, 8, 12])
def test_chunked_step_equals_one_pass(chunk):
    x = RNG.standard_normal((20, 3, 32, 32))   # 20 = 5 groups: the last chunk is shorter
    y = RNG.integers(0, 10, 20)
    whole, chunked = bound(None), bound(chunk)
    stats_whole = np.zeros(whole.stats_size)
    stats_chunked = np.full(chunked.stats_size, np.nan)  # must be overwritten, not added to
    chunked.grads[:] = np.nan
    loss_w, right_w = whole.train_step(x, y, 1 / 20, stats_whole)
    loss_c, right_c = chunked.train_step(x, y, 1 / 20, stats_chunked)
    assert right_c == right_w
    assert loss_c == pytest.approx(loss_w, rel=1e-12)
    np.testing.assert_allclose(chunked.grads, whole.grads, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(stats_chunked, stats_whole, rtol=1e-9, atol=1e-12)
    assert np.abs(whole.grads).max() > 0
    # Again: nothing of the first step (the sums put aside) leaks into the second.
    loss_c2, _ = chunked.train_step(x, y, 1 / 20, stats_chunked)
    assert loss_c2 == pytest.approx(loss_w, rel=1e-12)
    np.testing.assert_allclose(chunked.grads, whole.grads, rtol=1e-9, atol=1e-12)


def test_chunked_logits_equal_one_pass():
    x = RNG.standard_normal((70, 3, 32, 32)).astype(np.float32)
    one = bound(None, np.float32)
    one.chunk_size = 200  # inference in one pass
    np.testing.assert_allclose(bound(8, np.float32).logits(x), one.logits(x), rtol=1e-4,
                               atol=1e-5)
    assert bound(None, np.float32).logits(x).shape == (70, 10)  # INFERENCE_CHUNK: 64 + 6


def test_chunk_size_must_be_whole_groups():
    m = build_model("airbench", widths=(8, 12, 16), ghost_batch=4)
    assert m.chunk_size == 64 and m.chunk_size % m.group_size == 0
    assert build_model("airbench", ghost_batch=48).chunk_size == 96
    assert build_model("three-layer").chunk_size is None
    from partrain.nn.model import Model
    with pytest.raises(ValueError, match="multiple of the group size"):
        Model("m", m.layers, group_size=4, chunk_size=6)


def test_workspace_reuses_memory_and_shares_scratch():
    ws, other = Workspace(), Workspace()
    a = ws.get("k", (4, 8), np.float32)
    b = ws.get("k", (2, 8), np.float32)   # smaller: a view of the same store
    assert b.base is a.base and ws.nbytes == 4 * 8 * 4
    c = ws.get("k", (8, 8), np.float32)   # larger: a new store
    assert c.base is not a.base and ws.nbytes == 8 * 8 * 4
    assert ws.get("k", (8, 8), np.float64).dtype == np.float64
    pool = Workspace()
    ws.scratch = other.scratch = pool
    t1 = ws.temp("tiles", (16,), np.float32)
    t2 = other.temp("tiles", (8,), np.float32)
    assert t2.base is t1.base and pool.nbytes == 64 and other.nbytes == 0
    assert Workspace().temp("x", (3,), np.float32).shape == (3,)  # without a pool: its own


def test_a_model_shares_one_scratch_pool():
    m = bound(8, np.float32)
    pools = {id(l.ws.scratch) for l in m.layers if hasattr(l, "ws")}
    assert pools == {id(m.scratch)}

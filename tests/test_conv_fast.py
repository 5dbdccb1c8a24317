"""The fast conv paths against the im2col reference: equality, float32 round-off, gradient checks,
and the shape rule that picks them."""
import numpy as np
import pytest

from partrain.nn import functional as F
from partrain.nn import winograd
from partrain.nn.workspace import Workspace
from partrain.nn.models import build_model

from gradcheck import check_model_gradient, numerical_grad, rel_error

RNG = np.random.default_rng(0)


def both(x, w, b, dout, need_dx=True, ws=None, m=4):
    """(out, dx, dw, db) of the im2col reference and of the Winograd F(m x m, 3x3) path."""
    res = []
    for method in ("im2col", f"winograd{m}"):
        out, cache = F.conv_forward(x, w, b, 1, 1, ws, method=method)
        out = out.copy()
        if method != "im2col":
            assert cache[0] == "winograd" and cache[-1] == m
        dx, dw, db = F.conv_backward(dout, cache, need_dx, ws=ws)
        res.append((out, None if dx is None else dx.copy(), dw.copy(),
                    None if db is None else db.copy()))
    return res


def assert_close(v, r, tol=1e-12):
    """Equal up to float64 round-off, relative to the largest value."""
    assert np.max(np.abs(v - r)) <= tol * np.max(np.abs(r))


@pytest.mark.parametrize("m", [2, 4])
@pytest.mark.parametrize("C,Fo,N,H,W", [(3, 4, 2, 5, 5), (2, 3, 3, 6, 6), (4, 5, 2, 7, 4),
                                         (3, 2, 1, 3, 3), (2, 2, 2, 1, 2), (2, 3, 2, 9, 10)])
@pytest.mark.parametrize("bias", [True, False])
def test_winograd_equals_im2col_float64(C, Fo, N, H, W, bias, m):
    x = RNG.standard_normal((C, H, W, N))
    w = RNG.standard_normal((Fo, C, 3, 3))
    b = RNG.standard_normal(Fo) if bias else None
    dout = RNG.standard_normal((Fo, H, W, N))
    ref, win = both(x, w, b, dout, m=m)
    for r, v in zip(ref, win):
        if r is None:
            assert v is None
        else:
            assert_close(v, r)


@pytest.mark.parametrize("m", [2, 4])
def test_winograd_workspace_and_need_dx(m):
    """Reused Workspace buffers give the same result again; need_dx=False skips dx only."""
    x = RNG.standard_normal((3, 6, 7, 5))
    w = RNG.standard_normal((4, 3, 3, 3))
    dout = RNG.standard_normal((4, 6, 7, 5))
    ref, _ = both(x, w, None, dout, m=m)
    ws = Workspace()
    for _ in range(2):
        _, win = both(x, w, None, dout, ws=ws, m=m)
        for r, v in zip(ref[:3], win[:3]):
            assert_close(v, r)
    _, win = both(x, w, None, dout, need_dx=False, ws=ws, m=m)
    assert win[1] is None
    assert_close(win[2], ref[2])


@pytest.mark.parametrize("m", [2, 4])
def test_winograd_channel_blocks(monkeypatch, m):
    """The gathers, scatters and transforms in channel blocks (here one channel per block,
    uneven maps) change nothing."""
    monkeypatch.setattr(winograd, "BLOCK_BYTES", 1)
    x = RNG.standard_normal((3, 7, 6, 2))
    w = RNG.standard_normal((5, 3, 3, 3))
    dout = RNG.standard_normal((5, 7, 6, 2))
    ref, win = both(x, w, None, dout, m=m)
    for r, v in zip(ref[:3], win[:3]):
        assert_close(v, r)


@pytest.mark.parametrize("m", [2, 4])
@pytest.mark.parametrize("C,Fo,H", [(64, 64, 15), (256, 256, 7), (256, 256, 3)])
def test_winograd_float32_roundoff(C, Fo, H, m):
    """Relative to the largest value, Winograd's extra float32 round-off stays below 1e-5."""
    x = RNG.standard_normal((C, H, H, 4)).astype(np.float32)
    w = (RNG.standard_normal((Fo, C, 3, 3)) / np.sqrt(9 * C)).astype(np.float32)
    dout = RNG.standard_normal((Fo, H, H, 4)).astype(np.float32)
    x64, w64, d64 = (a.astype(np.float64) for a in (x, w, dout))
    exact, _ = both(x64, w64, None, d64, m=m)
    ref, win = both(x, w, None, dout, m=m)
    for e, r, v in zip(exact[:3], ref[:3], win[:3]):
        scale = np.max(np.abs(e))
        assert np.max(np.abs(v - e)) / scale < 1e-5
        assert np.max(np.abs(v - r)) / scale < 1e-5


@pytest.mark.parametrize("m", [2, 4])
@pytest.mark.parametrize("H,W", [(5, 5), (4, 6)])
def test_winograd_gradient(H, W, m):
    x = RNG.standard_normal((3, H, W, 2))
    w = RNG.standard_normal((4, 3, 3, 3))
    b = RNG.standard_normal(4)
    dout = RNG.standard_normal((4, H, W, 2))

    def loss():
        return float(np.sum(F.conv_forward(x, w, b, 1, 1, method=f"winograd{m}")[0] * dout))

    _, cache = F.conv_forward(x, w, b, 1, 1, method=f"winograd{m}")
    dx, dw, db = (a.copy() for a in F.conv_backward(dout, cache))
    for v, g in ((x, dx), (w, dw), (b, db)):
        assert rel_error(g, numerical_grad(loss, v)) < 1e-6


def test_shape_rule():
    ok = F.winograd_eligible
    assert ok((64, 15, 15, 64), (256, 64, 3, 3), 1, 1)
    assert ok((256, 7, 7, 64), (256, 256, 3, 3), 1, 1)
    assert ok((256, 3, 3, 64), (256, 256, 3, 3), 1, 1)         # one 6x6 tile: 36 vs 81 multiplies
    assert not ok((256, 3, 3, 64), (256, 256, 3, 3), 1, 1, m=2)  # four 4x4 tiles: 64 vs 81
    assert not ok((256, 5, 5, 64), (256, 256, 3, 3), 1, 1)     # 8x8 outputs for 5x5: 144 vs 225
    assert not ok((3, 32, 32, 64), (32, 3, 7, 7), 1, 3)        # the course model's 7x7 conv
    assert not ok((64, 15, 15, 64), (64, 64, 3, 3), 2, 1)      # strided
    assert not ok((64, 15, 15, 64), (64, 64, 3, 3), 1, 0)      # unpadded
    assert not ok((8, 15, 15, 64), (64, 8, 3, 3), 1, 1)        # too few channels
    assert ok((24, 31, 31, 64), (64, 24, 3, 3), 1, 1)          # airbench's conv0a
    assert not ok((16, 31, 31, 64), (64, 16, 3, 3), 1, 1)      # ...too few for the forward alone,
    assert ok((16, 31, 31, 64), (64, 16, 3, 3), 1, 1, need_dx=True)  # not with dx,
    assert not ok((8, 31, 31, 64), (64, 8, 3, 3), 1, 1, need_dx=True)  # but 8 are too few
    assert not ok((256, 3, 3, 16), (256, 256, 3, 3), 1, 1)     # 16 GEMM columns: too thin
    assert ok((256, 7, 7, 16), (256, 256, 3, 3), 1, 1)         # 4 tiles x 16 samples
    x = RNG.standard_normal((3, 32, 32, 2)).astype(np.float32)
    w = RNG.standard_normal((32, 3, 7, 7)).astype(np.float32)
    _, cache = F.conv_forward(x, w, None, 1, 3)
    assert cache[0] == "im2col"                                # im2col, as before


def test_auto_path_matches_reference_on_airbench_shape(monkeypatch):
    x = RNG.standard_normal((64, 15, 15, 4)).astype(np.float32)
    w = (RNG.standard_normal((64, 64, 3, 3)) / 24).astype(np.float32)
    auto, cache = F.conv_forward(x, w, None, 1, 1)
    assert isinstance(cache[0], str) and cache[0] == "winograd"
    monkeypatch.setattr(F, "WINOGRAD", False)
    ref, cache = F.conv_forward(x, w, None, 1, 1)
    assert cache[0] == "im2col"
    assert np.max(np.abs(auto - ref)) / np.max(np.abs(ref)) < 1e-5


def test_airbench_gradient_through_winograd(monkeypatch):
    """Whole-model float64 gradient check of a tiny airbench with every eligible 3x3 conv on the
    Winograd path (channel and column thresholds lowered so that the tiny model qualifies): the
    gradient equals the im2col model's, and centred differences (away from max-pool kinks) agree."""
    monkeypatch.setattr(F, "WINOGRAD_MIN_CHANNELS", 1)
    monkeypatch.setattr(F, "WINOGRAD_MIN_COLUMNS", 1)
    rng = np.random.default_rng(5)
    m = build_model("airbench", dtype=np.float64, widths=(4, 6, 8), ghost_batch=2)
    params = np.zeros(m.layout.size)
    m.bind(params, np.zeros_like(params), np.zeros(m.state_layout.size))
    m.init_params(np.random.default_rng(0))
    params += 0.05 * rng.standard_normal(params.shape)
    x = rng.standard_normal((4, 3, 32, 32))
    y = rng.integers(0, 10, 4)
    monkeypatch.setattr(F, "WINOGRAD", False)
    loss_ref, g_ref = m.loss_and_grad(x, y)
    monkeypatch.setattr(F, "WINOGRAD", True)
    loss, g = m.loss_and_grad(x, y)
    convs = [l for l in m.layers if type(l).__name__ == "DiracConv"]
    assert sum(isinstance(l.cache[0], str) for l in convs) == 6
    assert abs(loss - loss_ref) < 1e-12
    np.testing.assert_allclose(g, g_ref, rtol=1e-10, atol=1e-13)
    check_model_gradient(m, params, x, y, g, rng, per_tensor=3)


@pytest.mark.parametrize("k,stride,pad", [(3, 1, 1), (7, 2, 3), (2, 2, 0)])
def test_input_gradient_in_row_blocks(monkeypatch, k, stride, pad):
    """im2col's columns made one output row at a time (forward, and again in backward for the
    weight and input gradients, whose rows overlap when the kernel is taller than the stride)
    give what one block of all rows gives, also with a reused workspace."""
    x = RNG.standard_normal((3, 9, 8, 5))
    w = RNG.standard_normal((4, 3, k, k))
    out, cache = F.conv_forward(x, w, None, stride, pad, method="im2col")
    dout = RNG.standard_normal(out.shape)
    whole = F.conv_backward(dout, cache)
    assert cache[-1] is not None  # small: the columns were kept
    monkeypatch.setattr(F, "COL_BLOCK_BYTES", 1)
    monkeypatch.setattr(F, "COL_KEEP_BYTES", 0)
    ws = Workspace()
    for _ in range(2):
        out_b, cache_b = F.conv_forward(x, w, None, stride, pad, ws, method="im2col")
        np.testing.assert_allclose(out_b, out, rtol=1e-12, atol=1e-12)
        for got, ref in zip(F.conv_backward(dout, cache_b, ws=ws)[:2], whole[:2]):
            np.testing.assert_allclose(got, ref, rtol=1e-12, atol=1e-12)


def test_transformed_filters_are_kept_only_while_the_version_stays():
    """Winograd's U is reused for the same parameters version (the chunks of one step) and made
    again for a new one, so a step sees its own parameters and the cache cannot go stale."""
    from partrain.nn import winograd
    from partrain.nn.workspace import Workspace
    x = RNG.standard_normal((32, 8, 8, 4)).astype(np.float32)
    w = RNG.standard_normal((32, 32, 3, 3)).astype(np.float32)
    ws = Workspace()
    first, _ = winograd.conv_forward(x, w, None, 4, ws, version=1)
    first = first.copy()
    w *= 2
    same, _ = winograd.conv_forward(x, w, None, 4, ws, version=1)
    np.testing.assert_array_equal(same, first)              # kept: computed from the old w
    new, _ = winograd.conv_forward(x, w, None, 4, ws, version=2)
    np.testing.assert_allclose(new, 2 * first, rtol=1e-5, atol=1e-5)
    fresh, _ = winograd.conv_forward(x, w, None, 4, None, version=2)  # no workspace: made
    np.testing.assert_array_equal(fresh, new)

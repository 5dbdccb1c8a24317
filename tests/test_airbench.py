"""The airbench model: whole-model gradient check, frozen whitening, whitening weights, layers."""
import numpy as np
import pytest
from click.testing import CliRunner

from partrain.cli import main
from partrain.nn import functional as F
from partrain.nn.airbench import (DiracConv, FloorMaxPool, init_whitening, patch_covariance,
                                  whitening_weights)
from partrain.nn.layers import StepContext
from partrain.nn.models import MODELS, build_model
from partrain.optim import make_optimizer

from gradcheck import check_model_gradient

RNG = np.random.default_rng(0)


def correlated_images(n, rng, size=32):
    """uint8 images with strong neighbour and channel correlations (like photographs, unlike
    independent noise), so that whitening has something to undo."""
    base = rng.standard_normal((n, 1, size + 1, size + 1))
    smooth = base[:, :, :-1, :-1] + base[:, :, 1:, :-1] + base[:, :, :-1, 1:] + base[:, :, 1:, 1:]
    x = smooth * np.array([1.0, 0.8, 0.6]).reshape(1, 3, 1, 1)
    x = x + 0.5 * rng.standard_normal((n, 3, size, size))
    return np.clip(120 + 25 * x, 0, 255).astype(np.uint8)


def bound_model(dtype=np.float64, **options):
    m = build_model("airbench", dtype=dtype, **options)
    params = np.zeros(m.layout.size, dtype)
    m.bind(params, np.zeros_like(params), np.zeros(m.state_layout.size, dtype))
    m.init_params(np.random.default_rng(0))
    return m, params


TINY = dict(widths=(4, 6, 8), ghost_batch=2)


def test_registered_and_shapes():
    assert "airbench" in MODELS
    m, _ = bound_model(np.float32)
    # The frozen whitening filters are state, not parameters.
    assert "whiten.w" in m.state_layout.offsets and "whiten.w" not in m.layout.offsets
    first = m.state_layout.specs[0]
    assert (first.name, first.shape, first.size) == ("whiten.w", (24, 3, 2, 2), 288)
    names = [s.name for s in m.layout.specs]
    assert not any("gamma" in n for n in names)          # BN scale frozen at 1
    assert m.layout.size == 1_971_352
    # BN biases (and only they) learn 64x faster; weights and head decay, biases do not.
    scaled = {n for n, s in zip(names, m.layout.specs) if s.lr_scale != 1}
    assert scaled == {n for n in names if n.startswith("bn")}
    assert all(s.lr_scale == 64.0 for s in m.layout.specs if s.name in scaled)
    decayed = {s.name for s in m.layout.specs if s.decay}
    assert decayed == {n for n in names if n.endswith(".w")}
    assert m.label_smoothing == 0.2 and m.group_size == 64
    x = RNG.standard_normal((3, 3, 32, 32)).astype(np.float32)
    assert m.logits(x).shape == (3, 10)
    # spatial sizes: 32 -> 31 (whiten) -> 15 -> 7 -> 3 -> global max
    shape, sizes = m.input_shape, []
    for layer in m.layers:
        shape = layer.output_shape(shape)
        sizes.append(shape)
    assert (24, 31, 31) in sizes and (64, 15, 15) in sizes and (256, 7, 7) in sizes
    assert (256, 3, 3) in sizes and sizes[-1] == (10,)


@pytest.mark.parametrize("gelu", ["tanh", "erf"])
def test_whole_model_gradient(gelu):
    rng = np.random.default_rng(5)  # its own generator: the same draws whichever tests run
    m, params = bound_model(**TINY, gelu=gelu)
    init_whitening(m, correlated_images(20, rng), [120] * 3, [40] * 3)
    # BN biases at 0 and dirac init would leave some paths symmetric; perturb everything a bit.
    params += 0.05 * rng.standard_normal(params.shape)
    n = 4
    x = rng.standard_normal((n, 3, 32, 32))
    y = rng.integers(0, 10, n)
    state_before = m.state.copy()
    _, g = m.loss_and_grad(x, y)
    # The erf GELU's backward is the exact derivative, its forward a polynomial within 1.5e-7
    # (gelu.py): they disagree by ~3e-6 relative here, a wrong gradient by orders more.
    check_model_gradient(m, params, x, y, g, rng, per_tensor=5,  # ~20 ms a coordinate
                         rtol=1e-6 if gelu == "tanh" else 2e-5)
    # Training steps never write the state vector (only merge_stats updates running stats).
    np.testing.assert_array_equal(m.state, state_before)


def test_bias_decay_is_airbenchs_per_step_shrink():
    """bias_decay: the BN biases get 1/64 of the weight decay (their learning rate is 64x, so
    they shrink per step as much as the weights), the whitening bias the weights' decay; the
    gradient of loss_and_grad and reg_loss agree with those scales."""
    m, params = bound_model(np.float64, bias_decay=True, **TINY)
    off = m.layout.offsets
    scales = {lo: sc for lo, hi, sc in m.layout.decay_ranges() for lo in range(lo, hi)}
    for s in m.layout.specs:
        want = 1 / 64 if s.name.startswith("bn") else 1.0
        assert scales.get(off[s.name]) == want, s.name
    m.weight_decay = 0.5
    params[:] = np.random.default_rng(1).standard_normal(params.shape)
    beta = slice(off["bn0a.beta"], off["bn0a.beta"] + 4)
    x, y = np.random.default_rng(2).standard_normal((2, 3, 32, 32)), np.array([1, 2])
    _, g = m.loss_and_grad(x, y)
    m.weight_decay = 0.0
    _, g0 = m.loss_and_grad(x, y)
    np.testing.assert_allclose(g[beta] - g0[beta], 0.5 / 64 * params[beta], rtol=1e-9)
    m.weight_decay = 0.5
    sq = lambda name: float(np.sum(m.layout.views(params)[name] ** 2))
    assert m.reg_loss() == pytest.approx(0.25 * (sum(sq(s.name) for s in m.layout.specs
                                                     if not s.name.startswith("bn"))
                                                 + sum(sq(s.name) for s in m.layout.specs
                                                       if s.name.startswith("bn")) / 64))


@pytest.mark.parametrize("bias_decay", [False, True])
def test_frozen_bn_biases_still_build(bias_decay):
    """bias_lr_scale=0 (BN biases frozen) builds, with or without bias decay (no 1/0 scale)."""
    res = CliRunner().invoke(main, ["fit", "--model", "airbench", "--model-option",
                                    "bias_lr_scale=0", "--model-option",
                                    f"bias_decay={str(bias_decay).lower()}", "--dry-run"])
    assert res.exit_code == 0, res.output
    beta = next(l for l in res.output.splitlines() if l.strip().startswith("bn0a.beta"))
    assert beta.split()[-2:] == (["yes", "0"] if bias_decay else ["no", "0"])


def test_whitening_is_never_trained():
    m, params = bound_model(np.float32, **TINY)
    w0 = m.state_layout.views(m.state)["whiten.w"].copy()
    opt = make_optimizer(m, ("sgd", dict(momentum=0.9, nesterov=True, weight_decay=0.01,
                                         decoupled=True)))
    st = {"velocity": np.zeros_like(params)}
    stats = np.zeros(m.stats_size, np.float32)
    x = RNG.standard_normal((4, 3, 32, 32)).astype(np.float32)
    y = RNG.integers(0, 10, 4)
    p0 = params.copy()
    for t in (1, 2):
        m.train_step(x, y, 0.25, stats)
        m.merge_stats(stats, 2)
        opt.step(params, m.grads, st, t, 0.1)
    assert not np.array_equal(params, p0)
    np.testing.assert_array_equal(m.state_layout.views(m.state)["whiten.w"], w0)


def test_whitening_weights_whiten():
    imgs = correlated_images(60, np.random.default_rng(1))
    mean = imgs.mean(axis=(0, 2, 3))
    std = imgs.std(axis=(0, 2, 3))
    w = whitening_weights(imgs, mean, std, kernel=2, eps=5e-4)
    assert w.shape == (24, 3, 2, 2)
    np.testing.assert_array_equal(w[12:], -w[:12])
    x = ((imgs - mean.reshape(1, 3, 1, 1)) / std.reshape(1, 3, 1, 1)).transpose(1, 2, 3, 0)
    out, _ = F.conv_forward(np.ascontiguousarray(x), w[:12], None, 1, 0)   # (12, 31, 31, N)
    flat = out.reshape(12, -1)
    cov = flat @ flat.T / flat.shape[1]
    # Identity up to the eps regulariser: λ/(λ+eps) for the smallest eigenvalue is > 0.97 here.
    np.testing.assert_allclose(cov, np.eye(12), atol=0.03)
    # ...while the raw patches were far from white.
    raw = patch_covariance(imgs, mean, std, 2)
    assert np.max(np.abs(raw - np.diag(np.diag(raw)))) > 0.5
    # Largest eigenvalue first (airbench's order): filter norms are 1/√(λ+eps), smallest first.
    norms = np.linalg.norm(w[:12].reshape(12, -1), axis=1)
    assert np.all(np.diff(norms) >= 0)


def test_patch_covariance_by_hand():
    img = RNG.integers(0, 256, (2, 3, 3, 3), dtype=np.uint8)
    cov = patch_covariance(img, [0, 0, 0], [1, 1, 1], kernel=2, chunk=1)
    rows = [img[n, :, i:i + 2, j:j + 2].astype(np.float64).ravel()
            for n in range(2) for i in range(2) for j in range(2)]
    p = np.array(rows)
    np.testing.assert_allclose(cov, p.T @ p / len(p))


def test_floor_maxpool_matches_general_kernel():
    x = RNG.permutation(2 * 3 * 7 * 7).reshape(2, 7, 7, 3).astype(np.float64)  # (C, H, W, N)
    pool = FloorMaxPool()
    out = pool.forward(x, StepContext(train=True))
    ref, cache = F.maxpool_forward(x, 2, 2)  # odd size: the general path
    np.testing.assert_array_equal(out, ref)
    d = RNG.standard_normal(out.shape)
    np.testing.assert_array_equal(pool.backward(d), F.maxpool_backward(d, cache))
    assert pool.output_shape((3, 7, 7)) == (3, 3, 3)
    # The reused gradient buffer: a second step gives the same as a fresh kernel (border zeroed).
    pool.ws.get("floor_dx", x.shape, x.dtype).fill(np.nan)
    x2 = RNG.permutation(x.size).reshape(x.shape).astype(np.float64)
    pool.forward(x2, StepContext(train=True))
    _, cache2 = F.maxpool_forward(x2, 2, 2)
    d2 = RNG.standard_normal(out.shape)
    np.testing.assert_array_equal(pool.backward(d2), F.maxpool_backward(d2, cache2))


def test_dirac_conv_starts_as_identity():
    conv = DiracConv("c", 3, 5)
    w = np.zeros((5, 3, 3, 3))
    conv.bind({"w": w}, {"w": np.zeros_like(w)}, {})
    conv.init(np.random.default_rng(0))
    x = RNG.standard_normal((3, 2, 6, 6))
    out = conv.forward(x, StepContext(train=True))
    np.testing.assert_allclose(out[:3], x)
    assert np.all(np.abs(w[3:]) <= 1 / np.sqrt(27)) and np.any(w[3:] != 0)


def test_init_whitening_writes_state():
    m, _ = bound_model(np.float32, **TINY)
    imgs = correlated_images(10, RNG)
    w = init_whitening(m, imgs, [120] * 3, [40] * 3, n=8)
    np.testing.assert_allclose(m.state_layout.views(m.state)["whiten.w"], w, rtol=1e-6)
    np.testing.assert_allclose(w, whitening_weights(imgs[:8], [120] * 3, [40] * 3))


def test_dry_run_prints_parameter_counts():
    result = CliRunner().invoke(main, ["fit", "--model", "airbench", "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "model airbench: 1,971,352 parameters" in result.output
    assert "conv1b.w" in result.output and "whiten.w" not in result.output  # frozen: state


@pytest.mark.parametrize("options", [dict(whiten_bias=False), dict(widths=(8, 8, 8))])
def test_options(options):
    m = build_model("airbench", **options)
    assert m.options["widths"] == list(options.get("widths", (64, 256, 256)))
    assert ("whiten_bias.b" in m.layout.offsets) == options.get("whiten_bias", True)


def test_frozen_whitening_bias_skips_conv_input_gradient():
    """set_frozen('whiten_bias'): conv0a needs no input gradient, every other gradient is the
    same, the bias gradient is zero; unfreezing restores the full backward pass."""
    m, params = bound_model(**TINY)
    params += 0.05 * np.random.default_rng(7).standard_normal(params.shape)
    x = RNG.standard_normal((4, 3, 32, 32))
    y = RNG.integers(0, 10, 4)
    _, g_full = m.loss_and_grad(x, y)
    conv0a = m.layers[m.layer_names.index("conv0a")]
    assert conv0a.need_dx
    assert m.frozen == frozenset()
    m.set_frozen("whiten_bias")
    assert not conv0a.need_dx and m.backward_from == m.layer_names.index("conv0a")
    assert m.frozen == {"whiten_bias"} and isinstance(m.frozen, frozenset)
    _, g = m.loss_and_grad(x, y)
    lo, hi = m.layout.offsets["whiten_bias.b"], m.layout.offsets["whiten_bias.b"] + 24
    assert not g[lo:hi].any() and g_full[lo:hi].any()
    mask = np.ones(g.shape, bool)
    mask[lo:hi] = False
    np.testing.assert_array_equal(g[mask], g_full[mask])
    m.set_frozen("whiten_bias", False)
    assert conv0a.need_dx and not m.frozen
    np.testing.assert_array_equal(m.loss_and_grad(x, y)[1], g_full)
    with pytest.raises(ValueError):
        m.set_frozen("nope")

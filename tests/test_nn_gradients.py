"""Every layer's backward pass against a centred numerical gradient, in float64."""
import math

import numpy as np
import pytest

from partrain.nn import batchnorm as BN
from partrain.nn import functional as F
from partrain.nn import gelu as G
from partrain.nn.models import build_model

from gradcheck import check_model_gradient, numerical_grad, rel_error

RNG = np.random.default_rng(0)


def check(forward, backward, inputs, dout_shape=None):
    """forward(*inputs) -> (out, cache); backward(dout, cache) -> grads for each input."""
    out, _ = forward(*inputs)
    dout = RNG.standard_normal(out.shape)
    _, cache = forward(*inputs)
    analytic = backward(dout.copy(), cache)
    for x, ga in zip(inputs, analytic):
        if ga is None:
            continue
        gn = numerical_grad(lambda: float(np.sum(forward(*inputs)[0] * dout)), x)
        assert rel_error(ga, gn) < 1e-6, rel_error(ga, gn)


@pytest.mark.parametrize("stride,pad,k", [(1, 1, 3), (2, 1, 3), (1, 3, 7), (2, 0, 2), (1, 0, 1)])
def test_conv(stride, pad, k):
    x = RNG.standard_normal((3, 7, 7, 2))  # (C, H, W, N)
    w = RNG.standard_normal((4, 3, k, k))
    b = RNG.standard_normal(4)

    def fwd(x, w, b):
        return F.conv_forward(x, w, b, stride, pad)

    def bwd(d, cache):
        dx, dw, db = F.conv_backward(d, cache)
        return dx, dw, db

    check(fwd, bwd, [x, w, b])


def test_conv_matches_direct_sum():
    """The im2col result equals the convolution written as a plain loop (CHWN layout)."""
    x = RNG.standard_normal((2, 5, 6, 3))
    w = RNG.standard_normal((4, 2, 3, 3))
    out, _ = F.conv_forward(x, w, None, 1, 1)
    xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    ref = np.zeros((4, 5, 6, 3))
    for f in range(4):
        for n in range(3):
            for i in range(5):
                for j in range(6):
                    ref[f, i, j, n] = np.sum(xp[:, i:i + 3, j:j + 3, n] * w[f])
    np.testing.assert_allclose(out, ref, rtol=1e-12, atol=1e-12)


def test_relu():
    x = RNG.standard_normal((3, 2, 4, 4))
    x[np.abs(x) < 1e-3] = 0.1  # keep away from the kink
    check(lambda x: F.relu_forward(x), lambda d, c: (F.relu_backward(d, c),), [x])


def test_gelu():
    x = RNG.standard_normal((3, 2, 4, 4))
    check(lambda x: G.gelu_forward(x), lambda d, c: (G.gelu_backward(d, c),), [x])


def test_gelu_erf():
    """The backward pass is the exact derivative Φ(x) + x·φ(x), while the forward's erf is a
    polynomial within 1.5e-7: their derivatives differ by ~1e-7, too much for check()'s
    elementwise relative error near zero, so compared here to the largest gradient."""
    x = RNG.standard_normal((3, 2, 4, 4)) * 2
    dout = RNG.standard_normal(x.shape)
    analytic = G.gelu_backward(dout, G.gelu_erf_forward(x)[1])
    numeric = numerical_grad(lambda: float(np.sum(G.gelu_erf_forward(x)[0] * dout)), x)
    assert np.abs(analytic - numeric).max() < 2e-6 * np.abs(numeric).max()


@pytest.mark.parametrize("dtype, tol", [(np.float64, 2e-7), (np.float32, 1e-6)])
def test_gelu_forms_against_math_erf(dtype, tol):
    """The erf form is x·Φ(x) to within its polynomial's 1.5e-7 (plus float32 rounding); the tanh
    form stays within its documented 4.7e-4 of it, and is not the same function."""
    x = np.linspace(-8, 8, 4001).reshape(1, 1, 1, -1).astype(dtype)
    exact = 0.5 * x.astype(np.float64) * (1 + np.vectorize(math.erf)(x / math.sqrt(2)))
    erf_form, _ = G.gelu_erf_forward(x)
    tanh_form, _ = G.gelu_forward(x)
    assert erf_form.dtype == dtype
    assert np.abs(erf_form - exact).max() < tol * np.maximum(1, np.abs(exact)).max()
    assert 1e-4 < np.abs(tanh_form - exact).max() < 4.8e-4
    deriv = G.gelu_backward(np.ones_like(x), G.gelu_erf_forward(x)[1])
    exact_deriv = (0.5 * (1 + np.vectorize(math.erf)(x / math.sqrt(2)))
                   + x * np.exp(-x.astype(np.float64) ** 2 / 2) / math.sqrt(2 * math.pi))
    assert np.abs(deriv - exact_deriv).max() < 5 * tol


@pytest.mark.parametrize("forward", [G.gelu_forward, G.gelu_erf_forward])
def test_gelu_without_grad_keeps_nothing(forward):
    """Evaluation passes (need_grad=False) compute the same output and no derivative."""
    x = RNG.standard_normal((2, 3, 3, 2))
    out, cache = forward(x, need_grad=False)
    assert cache is None
    np.testing.assert_array_equal(out, forward(x)[0])
    with pytest.raises(ValueError, match="need_grad"):
        G.gelu_backward(out, cache)


@pytest.mark.parametrize("size,stride", [(2, 2), (3, 2), (3, 1)])
def test_maxpool(size, stride):
    x = RNG.permutation(3 * 2 * 8 * 8).reshape(3, 8, 8, 2).astype(np.float64) / 10.0  # no ties
    check(lambda x: F.maxpool_forward(x, size, stride), lambda d, c: (F.maxpool_backward(d, c),), [x])


def test_maxpool_ties_go_to_one_input():
    x = np.zeros((1, 2, 2, 1))
    out, cache = F.maxpool_forward(x)
    dx = F.maxpool_backward(np.ones_like(out), cache)
    assert dx.sum() == 1.0 and dx[0, 0, 0, 0] == 1.0


def test_global_pools():
    x = RNG.permutation(3 * 2 * 4 * 4).reshape(3, 4, 4, 2).astype(np.float64)
    check(F.global_avgpool_forward, lambda d, c: (F.global_avgpool_backward(d, c),), [x])
    check(F.global_maxpool_forward, lambda d, c: (F.global_maxpool_backward(d, c),), [x])


def test_affine_and_flatten():
    x = RNG.standard_normal((5, 6))
    w = RNG.standard_normal((3, 6))  # (out, in)
    b = RNG.standard_normal(3)
    check(F.affine_forward, lambda d, c: F.affine_backward(d, c, True, None, np.empty(3)), [x, w, b])
    x4 = RNG.standard_normal((3, 2, 4, 5))  # (C, H, W, N)
    check(F.flatten_forward, lambda d, c: (F.flatten_backward(d, c),), [x4])
    flat, _ = F.flatten_forward(x4)
    assert flat.shape == (5, 24)
    np.testing.assert_array_equal(flat[1], x4[..., 1].ravel())  # (C, H, W) order per sample


@pytest.mark.parametrize("groups", [[(0, 4)], [(0, 2), (2, 4)], [(0, 3), (3, 4)]])
def test_batchnorm(groups):
    x = RNG.standard_normal((3, 2, 2, 4)) * 2 + 1  # (C, H, W, N): groups of samples
    gamma = RNG.standard_normal(3)
    beta = RNG.standard_normal(3)

    def fwd(x, gamma, beta):
        out, cache, _ = BN.batchnorm_forward(x, gamma, beta, groups)
        return out, cache

    check(fwd, lambda d, c: BN.batchnorm_backward(d, c, np.empty(3), np.empty(3)), [x, gamma, beta])


def test_batchnorm_groups_are_independent():
    x = RNG.standard_normal((2, 3, 3, 4))
    whole, _, _ = BN.batchnorm_forward(x, None, None, [(0, 2), (2, 4)])
    first, _, _ = BN.batchnorm_forward(x[..., :2].copy(), None, None, [(0, 2)])
    np.testing.assert_allclose(whole[..., :2], first, rtol=1e-12)
    # one group of all samples of a non-contiguous view: the 4-D path gives the 2-D path's result
    view = np.asfortranarray(x)
    np.testing.assert_allclose(BN.batchnorm_forward(view, None, None, [(0, 4)])[0],
                               BN.batchnorm_forward(x, None, None, [(0, 4)])[0], rtol=1e-12)


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_softmax_cross_entropy(smoothing):
    logits = RNG.standard_normal((6, 10))
    y = RNG.integers(0, 10, 6)
    _, _, d = F.softmax_cross_entropy(logits, y, 0.5, smoothing)
    gn = numerical_grad(lambda: 0.5 * F.softmax_cross_entropy(logits, y, 1.0, smoothing)[0], logits)
    assert rel_error(d, gn) < 1e-6


def model_gradcheck(name, per_tensor=12, **options):
    model = build_model(name, dtype=np.float64, **options)
    params = np.zeros(model.layout.size)
    grads = np.zeros_like(params)
    model.bind(params, grads, None)
    model.init_params(np.random.default_rng(0))
    n = 4
    x = RNG.standard_normal((n,) + model.input_shape)
    y = RNG.integers(0, 10, n)
    _, g = model.loss_and_grad(x, y)
    check_model_gradient(model, params, x, y, g, RNG, per_tensor)


def test_three_layer_model_gradient():
    # The course model with a larger init so that every path carries signal.
    model_gradcheck("three-layer", num_filters=4, hidden_dim=8, weight_scale=0.1, reg=0.05)


def test_vgg_model_gradient():
    model_gradcheck("vgg", per_tensor=4, widths=(3, 4, 5), ghost_batch=2)


def test_course_model_shapes_and_flops():
    m = build_model("three-layer")
    assert m.layout.size == 32 * 3 * 49 + 32 + 8192 * 512 + 512 + 512 * 10 + 10
    assert abs(m.flops_per_image()["train"] / 1e6 - 54.1) < 0.05
    sizes = {s.name: s.size for s in m.layout.specs}
    assert sizes == {"conv1.w": 4704, "conv1_bias.b": 32, "fc1.w": 8192 * 512, "fc1.b": 512,
                     "fc2.w": 5120, "fc2.b": 10}
    decayed = sum(hi - lo for lo, hi, _ in m.layout.decay_ranges())
    assert decayed == 4704 + 8192 * 512 + 5120  # weights only, no biases


def test_three_layer_equals_textbook_order():
    """conv+bias -> ReLU -> pool (the course order) equals our conv -> pool -> bias+ReLU."""
    m = build_model("three-layer", dtype=np.float64, num_filters=4, hidden_dim=8, weight_scale=0.1)
    params = np.zeros(m.layout.size)
    m.bind(params, np.zeros_like(params), None)
    m.init_params(np.random.default_rng(0))
    v = m.layout.views(params)
    v["conv1_bias.b"][...] = RNG.standard_normal(4)
    x = RNG.standard_normal((3, 3, 32, 32))
    conv, _ = F.conv_forward(x.transpose(1, 2, 3, 0), v["conv1.w"], v["conv1_bias.b"], 1, 3)
    pooled = np.maximum(conv, 0).reshape(4, 16, 2, 16, 2, 3).max(axis=(2, 4))   # (C, H, W, N)
    h = np.maximum(pooled.transpose(3, 0, 1, 2).reshape(3, -1) @ v["fc1.w"].T + v["fc1.b"], 0)
    ref = h @ v["fc2.w"].T + v["fc2.b"]
    np.testing.assert_allclose(m.logits(x), ref, rtol=1e-10, atol=1e-12)


def test_affine_on_flattened_maps():
    """Flatten's output is a transposed view, which affine reads with the other GEMM orientation
    (w @ x.T, output in the same layout): its forward and backward against the numerical
    gradient, and the same values as the contiguous input gives. Last in the module, with its
    own generator: drawing from the module's earlier would move the random points of the tests
    after it (the VGG model's check then met a kink of ReLU or max-pool)."""
    rng = np.random.default_rng(12)
    x4 = rng.standard_normal((3, 2, 4, 5))
    w = rng.standard_normal((7, 24))
    b = rng.standard_normal(7)

    def forward(x4, w, b):
        flat, shape = F.flatten_forward(x4)
        out, cache = F.affine_forward(flat, w, b)
        return out, (cache, shape)

    def backward(d, c):
        cache, shape = c
        dx, dw, db = F.affine_backward(d, cache, True, None, np.empty(7))
        return F.flatten_backward(dx, shape), dw, db

    check(forward, backward, [x4, w, b])
    flat = F.flatten_forward(x4)[0]
    assert not flat.flags.c_contiguous
    out, cache = F.affine_forward(flat, w, b)
    out_c, cache_c = F.affine_forward(np.ascontiguousarray(flat), w, b)
    np.testing.assert_allclose(out, out_c, rtol=1e-12)
    d = rng.standard_normal(out.shape)
    for got, ref in zip(F.affine_backward(d, cache, True, None, np.empty(7)),
                        F.affine_backward(d, cache_c, True, None, np.empty(7))):
        np.testing.assert_allclose(got, ref, rtol=1e-12)

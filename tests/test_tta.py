"""TTA: output shape, and the averaging checked with toy models whose logits are known."""
import numpy as np
import pytest

from partrain.nn.models import build_model
from partrain.tta import tta_logits, tta_views

RNG = np.random.default_rng(0)


class Linear:
    """logits = A · vec(x): linear in the input, so the TTA average is A · (mean of views)."""
    n_classes = 10

    def __init__(self, shape):
        self.a = RNG.standard_normal((10, int(np.prod(shape))))

    def logits(self, x):
        return x.reshape(len(x), -1) @ self.a.T


class Probe:
    """Logit k = pixel value at a fixed position: each view's contribution is readable."""
    n_classes = 10

    def logits(self, x):
        out = np.zeros((len(x), 10))
        out[:, 0] = x[:, 0, 0, 0]      # top-left pixel
        out[:, 1] = x[:, 0, 0, -1]     # top-right pixel
        out[:, 2] = x[:, 0, 1, 1]
        return out


@pytest.mark.parametrize("mode", ["none", "flip", "flip_translate"])
def test_shape_and_linear_average(mode):
    x = RNG.standard_normal((7, 3, 8, 8))
    m = Linear(x.shape[1:])
    got = tta_logits(m, x, mode)
    assert got.shape == (7, 10) and got.dtype == np.float64
    views = tta_views(x, mode)
    assert sum(w for w, _ in views) == pytest.approx(1.0)
    mean_view = sum(w * v for w, v in views)
    np.testing.assert_allclose(got, m.logits(mean_view), rtol=1e-10, atol=1e-12)


def test_flip_translate_by_hand():
    x = np.arange(16.0).reshape(1, 1, 4, 4)
    # rows [0 1 2 3] [4 5 6 7] [8 9 10 11] [12 13 14 15]
    got = tta_logits(Probe(), x, "flip_translate")[0]
    # views (weight, top-left, top-right, pixel (1,1)):
    #   identity          1/4   0   3   5
    #   mirrored          1/4   3   0   6
    #   up-left (reflect: row -1 -> 1, col -1 -> 1)        1/8   5   6   0
    #   up-left mirrored  1/8   6   5   1   (its row 0 = [5 4 5 6] reversed -> [6 5 4 5])
    #   down-right        1/8   5   6  10
    #   down-right mirr.  1/8   6   5  11   (its row 1 = [9 10 11 10] reversed)
    top_left = 0.25 * 0 + 0.25 * 3 + 0.125 * (5 + 6 + 5 + 6)
    top_right = 0.25 * 3 + 0.25 * 0 + 0.125 * (6 + 5 + 6 + 5)
    p11 = 0.25 * 5 + 0.25 * 6 + 0.125 * (0 + 1 + 10 + 11)
    np.testing.assert_allclose(got[:3], [top_left, top_right, p11])
    np.testing.assert_allclose(tta_logits(Probe(), x, "flip")[0][:3], [1.5, 1.5, 5.5])
    np.testing.assert_allclose(tta_logits(Probe(), x, "none")[0][:3], [0, 3, 5])


def test_given_logits_of_the_image_replace_its_pass():
    x = RNG.standard_normal((3, 3, 8, 8))
    m = Linear(x.shape[1:])
    mine = np.full((3, 10), 8.0)  # stands in for the first view (the image itself)
    got = tta_logits(m, x, "flip", logits=mine)
    np.testing.assert_allclose(got, 0.5 * mine + 0.5 * m.logits(x[..., ::-1]), rtol=1e-12)


def test_flip_invariant_model_is_unchanged_by_flip_tta():
    x = RNG.standard_normal((4, 3, 6, 6))
    sym = x + x[..., ::-1]  # mirror-symmetric images: the flipped view equals the image
    m = Linear(x.shape[1:])
    np.testing.assert_allclose(tta_logits(m, sym, "flip"), m.logits(sym), rtol=1e-10)


def test_with_a_real_model_and_bad_mode():
    m = build_model("vgg", widths=(4, 4, 4), ghost_batch=2)
    params = np.zeros(m.layout.size, np.float32)
    m.bind(params, None, None)
    m.init_params(np.random.default_rng(0))
    x = RNG.standard_normal((5, 3, 32, 32)).astype(np.float32)
    out = tta_logits(m, x)
    assert out.shape == (5, 10) and np.all(np.isfinite(out))
    with pytest.raises(ValueError):
        tta_logits(m, x, "rotate")

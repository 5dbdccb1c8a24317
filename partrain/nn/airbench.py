"""`airbench`: Keller Jordan's airbench94 network for CIFAR-10, on our numpy kernels.

    whiten: conv 2×2, 3 -> 24, no padding (32 -> 31), FROZEN, initialised from the eigenvectors
            of the training set's 2×2 patch covariance; + bias; GELU
    3 × group(w):  conv 3×3 pad 1 -> max-pool 2 -> BN -> GELU -> conv 3×3 pad 1 -> BN -> GELU
            widths 64 / 256 / 256; spatial 31 -> 15 -> 7 -> 3
    global max-pool (airbench's MaxPool2d(3) on a 3×3 map) -> linear 256 -> 10, no bias, × 1/9

Differences from airbench94, each for a reason:
- The whitening weights live in the model's STATE vector, not its parameters: they are never seen
  by the optimizer (no gradient, no decay, no momentum), every worker reads them from the shared
  state, and checkpoints save them with the batch-norm statistics. The model is built with random
  whitening weights; the parent overwrites them from data with the model's `init_from_data` after
  `init_params` (data are not a model option: options must be small and JSON-able).
- Batch-norm statistics are per ghost batch of `ghost_batch` samples (airbench: the whole batch of
  1024), because our shards are made of whole groups so that results do not depend on the worker
  count; 64 lets a 1024 batch split over up to 16 workers. The small groups add some noise, but
  statistics over each worker's 512 images (ghost_batch=512) got 90.88 / 90.33 % with TTA on seeds
  0 / 1 against 90.56 / 90.71 %, at 5x the memory (BENCHMARKS.md, 2026-12-02): no gain measured.
- BN biases and the whitening bias are weight-decayed only with `bias_decay=True`. airbench94
  decays them (its wd/lr parametrisation shrinks them per step as much as the weights); with
  bias_decay the BN biases get 1/64 of the weight decay (`ParamSpec.decay_scale`), since their
  learning rate is 64x, and the whitening bias the weights' decay, which is airbench94's. Off by
  default: the full recipe with it, seeds 0 / 1, got 90.67 / 90.51 % with TTA against 90.56 /
  90.71 % without (BENCHMARKS.md, 2026-12-02): no gain measured.
- GELU is the tanh approximation by default (gelu.py, within 4.7e-4 of x·Φ(x)); `gelu="erf"` is
  airbench's exact form (erf by a 1.5e-7 polynomial: numpy has no erf). Measured: the erf form's
  kernels take 1.5x the tanh form's, its runs 90.56 / 90.58 % with TTA on seeds 0 / 1 against
  90.56 / 90.71 % (BENCHMARKS.md, 2026-12-02): no gain, so tanh stays the default.
  BN variance is the biased one.
- Max-pools over odd maps (31 -> 15, 15 -> 7, 7 -> 3) drop the last row and column, exactly as a
  floor-mode pool does, but first crop them so that the fast 2×2 kernel applies (the general one
  uses np.add.at in backward).
- Training-recipe pieces that are not the network (label smoothing 0.2 is a model option here; the
  whitening bias trained only for the first 3 epochs, lr/wd schedule, flips, translations, TTA)
  belong to the training loop: see partrain.augment, partrain.tta, partrain.ema, partrain.optim.
  Once the whitening bias stops training, `model.set_frozen("whiten_bias")` lets the backward pass
  stop at conv0a (no input gradient for it: ~1/3 of that conv's work, plus the whitening GELU).
- Every 3×3 conv runs as Winograd F(4×4, 3×3), conv0a's 24 input channels included
  (functional.conv_forward picks it by shape; float32 results within ~3e-6 of the largest value
  of the im2col ones); the 2×2 whitening conv is im2col.
"""
from __future__ import annotations

import numpy as np

from . import functional as F
from .layers import (Affine, BatchNorm, ChannelBias, Conv, GELU, GlobalMaxPool, MaxPool,
                     ToChannelsFirst)
from .model import Model
from .params import ParamSpec


WHITENING_IMAGES = 5000  # airbench94 computes its whitening filters from 5000 training images
CHUNK_IMAGES = 64  # at least this many images per pass (Model.chunk_size), in whole ghost
                   # batches: one thread ran batch 64 at 149 images/s, 128 at 135, 512 at 126


class WhiteningConv(Conv):
    """A convolution whose weights are model state (frozen): no ParamSpec, no gradient."""

    def __init__(self, name, c_in, c_out, k):
        super().__init__(name, c_in, c_out, k, pad=0, bias=False, decay=False)

    def params(self):
        return []

    def state(self):
        return [ParamSpec("w", (self.c_out, self.c_in, self.k, self.k))]

    def init(self, rng):
        # Placeholder until init_whitening: He-scaled random filters, so an un-whitened model
        # still trains (and gradient checks see signal).
        fan_in = self.c_in * self.k * self.k
        self.s["w"][...] = rng.standard_normal(self.s["w"].shape) * np.sqrt(2.0 / fan_in)

    def forward(self, x, ctx):
        out, self.cache = F.conv_forward(x, self.s["w"], None, self.stride, self.pad, self.ws)
        return out

    def backward(self, dout):
        # Only reached if a trainable layer came before it; the weights get no gradient.
        dx, _, _ = F.conv_backward(dout, self.cache, True, np.empty_like(self.s["w"]), None,
                                   self.ws)
        return dx


class DiracConv(Conv):
    """3×3 conv initialised as airbench's: PyTorch's default uniform(±1/√fan_in), then the first
    min(c_in, c_out) filters set to the identity (torch.nn.init.dirac_), so each group starts
    close to passing its input through."""

    def __init__(self, name, c_in, c_out, k=3):
        super().__init__(name, c_in, c_out, k, bias=False)

    def init(self, rng):
        w = self.p["w"]
        bound = 1.0 / np.sqrt(self.c_in * self.k * self.k)
        w[...] = rng.uniform(-bound, bound, w.shape)
        m = min(self.c_in, self.c_out)
        w[:m] = 0
        w[np.arange(m), np.arange(m), self.k // 2, self.k // 2] = 1


class FloorMaxPool(MaxPool):
    """2×2 max-pool that first crops an odd last row/column (floor mode): the fast kernel runs."""

    def __init__(self):
        super().__init__(2, 2)

    def forward(self, x, ctx):
        self.in_shape = x.shape
        h, w = x.shape[1] // 2 * 2, x.shape[2] // 2 * 2
        self.cropped = (h, w) != x.shape[1:3]
        return super().forward(x[:, :h, :w] if self.cropped else x, ctx)

    def backward(self, dout):
        if not self.cropped:
            return super().backward(dout)
        # Write the pooled gradient straight into a reused full-size buffer and zero only the
        # cropped row and column (no fresh zeroed array and copy per step).
        h, w = self.in_shape[1] // 2 * 2, self.in_shape[2] // 2 * 2
        dx = self.ws.get("floor_dx", self.in_shape, dout.dtype)
        dx[:, h:] = 0
        dx[:, :h, w:] = 0
        F.maxpool_backward(dout, self.cache, self.ws, dx_out=dx[:, :h, :w])
        return dx


class AirbenchModel(Model):
    """airbench's network: a `Model` whose data-dependent initialisation sets the whitening filters."""

    def init_from_data(self, images, idx, mean, std) -> bool:
        """Whitening filters from the first WHITENING_IMAGES of the training images
        `images[sorted(idx)]` (idx None: all), as airbench94 whitens with its first 5000 training
        images; `idx` is the training split, so validation images never shape the model."""
        idx = np.arange(len(images)) if idx is None else np.sort(np.asarray(idx))
        init_whitening(self, np.asarray(images[idx[:WHITENING_IMAGES]]), mean, std)
        return True


def airbench(dtype=np.float32, widths=(64, 256, 256), ghost_batch=64, whiten_kernel=2,
             whiten_bias=True, head_scale=1 / 9, label_smoothing=0.2, bn_momentum=0.4,
             bn_eps=1e-12, bias_lr_scale=64.0, bias_decay=False, gelu="tanh", num_classes=10,
             input_size=32, **_):
    """airbench94's network (see the module docstring). bn_momentum is the weight of the new batch
    statistics (airbench's batchnorm_momentum 0.6 is PyTorch's momentum 1 - 0.6 = 0.4);
    bias_lr_scale multiplies the BN biases' learning rate (airbench's bias_scaler 64); bias_decay
    decays the BN and whitening biases as airbench94 does (per step by as much as the weights:
    BN biases at 1/bias_lr_scale of the weight decay, as their learning rate is that much higher);
    gelu is the GELU's form, "tanh" or airbench94's exact "erf" (gelu.py)."""
    from .models import _positive_ints, _shape_options  # models.py imports this module
    _positive_ints(num_classes=num_classes, input_size=input_size)
    c_whiten = 2 * 3 * whiten_kernel ** 2
    layers = [ToChannelsFirst(), WhiteningConv("whiten", 3, c_whiten, whiten_kernel)]
    if whiten_bias:
        layers.append(ChannelBias("whiten_bias", c_whiten, decay=bias_decay))
    layers.append(GELU(gelu))
    c_in = c_whiten
    bn = dict(momentum=bn_momentum, eps=bn_eps, affine_weight=False, bias_lr_scale=bias_lr_scale,
              bias_decay=bias_decay)
    for i, w in enumerate(widths):
        layers += [DiracConv(f"conv{i}a", c_in, w), FloorMaxPool(), BatchNorm(f"bn{i}a", w, **bn),
                   GELU(gelu),
                   DiracConv(f"conv{i}b", w, w), BatchNorm(f"bn{i}b", w, **bn), GELU(gelu)]
        c_in = w
    # PyTorch's default Linear init, uniform(±1/√fan_in), has this standard deviation.
    layers += [GlobalMaxPool(),
               Affine("head", c_in, num_classes, bias=False, init_std=1.0 / np.sqrt(3.0 * c_in),
                      scale=head_scale)]
    return AirbenchModel("airbench", layers, input_shape=(3, input_size, input_size),
                         n_classes=num_classes, dtype=dtype, group_size=ghost_batch,
                         label_smoothing=label_smoothing,
                         chunk_size=ghost_batch * -(-CHUNK_IMAGES // ghost_batch),
                         options=dict(widths=list(widths), ghost_batch=ghost_batch,
                                      whiten_kernel=whiten_kernel, whiten_bias=whiten_bias,
                                      head_scale=head_scale, label_smoothing=label_smoothing,
                                      bn_momentum=bn_momentum, bn_eps=bn_eps,
                                      bias_lr_scale=bias_lr_scale, bias_decay=bias_decay,
                                      **_gelu_option(gelu),
                                      **_shape_options(num_classes, input_size)))


def _gelu_option(gelu: str) -> dict:
    """{"gelu": form} unless it is the default tanh: runs saved before the option existed have
    config.json files (and digests) without it, and so have the runs that keep the default."""
    return {} if gelu == "tanh" else {"gelu": gelu}


# ------------------------------------------------------------------------------- whitening
def _patches(x: np.ndarray, k: int) -> np.ndarray:
    """(N, C, H, W) -> all k×k patches as rows of C·k·k values, (c, i, j) order as conv weights."""
    n, c, h, w = x.shape
    win = np.lib.stride_tricks.sliding_window_view(x, (k, k), axis=(2, 3))  # n c H' W' k k
    return win.transpose(0, 2, 3, 1, 4, 5).reshape(-1, c * k * k)


def patch_covariance(images_uint8: np.ndarray, mean, std, kernel: int = 2,
                     chunk: int = 500) -> np.ndarray:
    """E[p pᵀ] over all kernel×kernel patches of the normalised images (uncentred, as airbench:
    normalised images have mean ≈ 0), accumulated in float64 chunk by chunk."""
    mean, std = (np.asarray(v, np.float64) for v in (mean, std))  # per channel or per pixel
    mean, std = (v.reshape(1, -1, 1, 1) if v.ndim <= 1 else v[None] for v in (mean, std))
    d = images_uint8.shape[1] * kernel * kernel
    cov = np.zeros((d, d))
    count = 0
    for lo in range(0, len(images_uint8), chunk):
        x = (images_uint8[lo:lo + chunk].astype(np.float64) - mean) / std
        p = _patches(x, kernel)
        cov += p.T @ p
        count += p.shape[0]
    return cov / max(count, 1)


def whitening_weights(images_uint8: np.ndarray, mean, std, kernel: int = 2,
                      eps: float = 5e-4) -> np.ndarray:
    """airbench94's whitening filters, (2·C·k·k, C, k, k) float64.

    Eigen-decomposition of the patch covariance; filter i is eigenvector i / √(eigenvalue i + eps)
    (largest eigenvalue first), so the first C·k·k outputs have ≈ identity covariance; the next
    C·k·k are their negatives (so that the GELU after them keeps both signs of each direction).
    """
    c = images_uint8.shape[1]
    cov = patch_covariance(images_uint8, mean, std, kernel)
    evals, evecs = np.linalg.eigh(cov)               # ascending
    evals, evecs = evals[::-1], evecs[:, ::-1]       # largest first, as airbench's flip(0)
    w = (evecs.T / np.sqrt(evals + eps)[:, None]).reshape(-1, c, kernel, kernel)
    return np.concatenate([w, -w])


def init_whitening(model: Model, images_uint8: np.ndarray, mean, std, n: int = WHITENING_IMAGES,
                   eps: float = 5e-4) -> np.ndarray:
    """Write whitening weights from the first `n` images into the bound model's state (call after
    `init_params`, in the parent, before workers start stepping). Returns the weights."""
    layer = next(l for l in model.layers if isinstance(l, WhiteningConv))
    w = whitening_weights(np.asarray(images_uint8[:n]), mean, std, layer.k, eps)
    model.state_layout.views(model.state)[f"{layer.name}.w"][...] = w
    return w

"""Layers: the functional kernels plus the parameters they own.

A layer declares its tensors (`params()`, `state()`), is bound to views into the model's flat
vectors (`bind`), keeps its forward cache between `forward` and `backward`, and writes its
gradients straight into its views of the flat gradient vector — nothing is copied afterwards.
Feature maps are (C, H, W, N); see functional.py for why.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from . import batchnorm as BN
from . import functional as F
from . import gelu as G
from .params import ParamSpec
from .workspace import Workspace


@dataclass
class StepContext:
    """What a forward pass needs beyond its input: mode, batch-norm groups, statistics output."""

    train: bool
    groups: list[tuple[int, int]] = field(default_factory=list)
    stats_out: dict[str, np.ndarray] | None = None
    # The same value in two passes means unchanged parameters (the chunks of one train_step or
    # of one logits call), so what is computed from them alone may be kept; None: unknown.
    version: int | None = None


class Layer:
    name: str = ""
    need_dx: bool = True  # the first layer with parameters skips its input gradient

    def params(self) -> list[ParamSpec]:
        return []

    def state(self) -> list[ParamSpec]:
        return []

    def stats_size(self) -> int:
        return 0

    def bind(self, p: dict, g: dict, s: dict) -> None:
        self.p, self.g, self.s = p, g, s

    def init(self, rng: np.random.Generator) -> None:
        pass

    def forward(self, x, ctx: StepContext):
        raise NotImplementedError

    def backward(self, dout):
        raise NotImplementedError

    def merge_stats(self, stats: np.ndarray, n_groups: int) -> None:
        pass

    def output_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """Per-sample output shape (C, H, W) or (D,) from the per-sample input shape."""
        return shape


class ToChannelsFirst(Layer):
    """(N, C, H, W) images -> (C, H, W, N) feature maps (a view; the next conv copies anyway)."""

    def forward(self, x, ctx):
        return x.transpose(1, 2, 3, 0)

    def backward(self, dout):
        return dout.transpose(3, 0, 1, 2)


class Conv(Layer):
    def __init__(self, name, c_in, c_out, k, stride=1, pad=None, bias=True, init_std=None,
                 decay=True):
        self.name, self.c_in, self.c_out, self.k, self.stride = name, c_in, c_out, k, stride
        self.pad = (k - 1) // 2 if pad is None else pad
        self.bias, self.init_std, self.decay = bias, init_std, decay
        self.ws = Workspace()

    def params(self):
        specs = [ParamSpec("w", (self.c_out, self.c_in, self.k, self.k), decay=self.decay)]
        if self.bias:
            specs.append(ParamSpec("b", (self.c_out,)))
        return specs

    def init(self, rng):
        fan_in = self.c_in * self.k * self.k
        std = self.init_std if self.init_std is not None else np.sqrt(2.0 / fan_in)  # He init
        self.p["w"][...] = rng.standard_normal(self.p["w"].shape) * std
        if self.bias:
            self.p["b"][...] = 0

    def forward(self, x, ctx):
        out, self.cache = F.conv_forward(x, self.p["w"], self.p.get("b"), self.stride, self.pad,
                                         self.ws, version=ctx.version,
                                         need_dx=ctx.train and self.need_dx)
        return out

    def backward(self, dout):
        dx, _, _ = F.conv_backward(dout, self.cache, self.need_dx, self.g["w"], self.g.get("b"),
                                   self.ws)
        return dx

    def output_shape(self, shape):
        _, h, w = shape
        return (self.c_out, F.conv_out_size(h, self.k, self.stride, self.pad),
                F.conv_out_size(w, self.k, self.stride, self.pad))


class ChannelBias(Layer):
    """Adds a per-channel bias to (C, H, W, N) maps.

    Lets a model move a convolution's bias past a max-pool (a per-channel constant commutes with a
    max), where it touches a quarter of the data; `fused_relu` applies ReLU in the same pass.
    """

    def __init__(self, name, channels, fused_relu=False, decay=False):
        self.name, self.c, self.fused_relu, self.decay = name, channels, fused_relu, decay

    def params(self):
        return [ParamSpec("b", (self.c,), decay=self.decay)]

    def init(self, rng):
        self.p["b"][...] = 0

    def forward(self, x, ctx):
        out = x + self.p["b"].reshape(-1, 1, 1, 1)
        if self.fused_relu:
            np.maximum(out, 0, out=out)
            self.out = out
        return out

    def backward(self, dout):
        if self.fused_relu:
            dout = F.relu_backward(dout, self.out)
        np.sum(dout, axis=(1, 2, 3), out=self.g["b"])
        return dout


class ReLU(Layer):
    def forward(self, x, ctx):
        out, self.cache = F.relu_forward(x)
        return out

    def backward(self, dout):
        return F.relu_backward(dout, self.cache)


class GELU(Layer):
    """x·Φ(x) in `form` "tanh" (the approximation) or "erf" (exact): see gelu.py."""

    def __init__(self, form: str = "tanh"):
        if form not in G.FORMS:
            raise ValueError(f"GELU form must be one of {', '.join(G.FORMS)}, got {form!r}")
        self.form = form
        self.ws = Workspace()

    def forward(self, x, ctx):
        forward = G.gelu_erf_forward if self.form == "erf" else G.gelu_forward
        out, self.cache = forward(x, self.ws, need_grad=ctx.train)
        return out

    def backward(self, dout):
        return G.gelu_backward(dout, self.cache, self.ws)


class MaxPool(Layer):
    def __init__(self, size=2, stride=None):
        self.size, self.stride = size, stride or size
        self.ws = Workspace()

    def forward(self, x, ctx):
        out, self.cache = F.maxpool_forward(x, self.size, self.stride, self.ws)
        return out

    def backward(self, dout):
        return F.maxpool_backward(dout, self.cache, self.ws)

    def output_shape(self, shape):
        c, h, w = shape
        return (c, (h - self.size) // self.stride + 1, (w - self.size) // self.stride + 1)


class GlobalAvgPool(Layer):
    def forward(self, x, ctx):
        out, self.cache = F.global_avgpool_forward(x)
        return out

    def backward(self, dout):
        return F.global_avgpool_backward(dout, self.cache)

    def output_shape(self, shape):
        return (shape[0],)


class GlobalMaxPool(Layer):
    def forward(self, x, ctx):
        out, self.cache = F.global_maxpool_forward(x)
        return out

    def backward(self, dout):
        return F.global_maxpool_backward(dout, self.cache)

    def output_shape(self, shape):
        return (shape[0],)


class Flatten(Layer):
    def forward(self, x, ctx):
        out, self.cache = F.flatten_forward(x)
        return out

    def backward(self, dout):
        return F.flatten_backward(dout, self.cache)

    def output_shape(self, shape):
        return (int(np.prod(shape)),)


class Affine(Layer):
    deferred = None  # a parallel.rowgrad.DeferredWeight: the weight gradient is made row-parallel

    def __init__(self, name, d_in, d_out, bias=True, init_std=None, decay=True, scale=1.0):
        self.name, self.d_in, self.d_out, self.bias = name, d_in, d_out, bias
        self.init_std, self.decay, self.scale = init_std, decay, scale

    def params(self):
        specs = [ParamSpec("w", (self.d_out, self.d_in), decay=self.decay)]
        if self.bias:
            specs.append(ParamSpec("b", (self.d_out,)))
        return specs

    def init(self, rng):
        std = self.init_std if self.init_std is not None else np.sqrt(2.0 / self.d_in)
        self.p["w"][...] = rng.standard_normal(self.p["w"].shape) * std
        if self.bias:
            self.p["b"][...] = 0

    def forward(self, x, ctx):
        out, self.cache = F.affine_forward(x, self.p["w"], self.p.get("b"))
        if self.scale != 1.0:
            out *= self.scale
        return out

    def backward(self, dout):
        if self.scale != 1.0:
            dout = dout * self.scale
        deferred = self.deferred
        dx, _, _ = F.affine_backward(dout, self.cache, self.need_dx, self.g["w"], self.g.get("b"),
                                     need_dw=deferred is None)
        if deferred is not None:  # its input and output gradient only: see parallel/rowgrad.py
            deferred.put(self.cache[0], dout)
        return dx

    def output_shape(self, shape):
        return (self.d_out,)


class BatchNorm(Layer):
    """Batch norm over (C, H, W, N) with per-ghost-batch statistics.

    In training, each group of samples given by the step context is normalised with its own
    statistics, so results do not depend on how a minibatch is split over workers. The sums of the
    groups' means and variances go to `stats_out`; `merge_stats` turns the sum over all workers into
    one momentum update of the running statistics.
    """

    def __init__(self, name, channels, momentum=0.1, eps=1e-5, affine_weight=True,
                 affine_bias=True, bias_lr_scale=1.0, bias_decay=False):
        self.name, self.c, self.momentum, self.eps = name, channels, momentum, eps
        self.affine_weight, self.affine_bias, self.bias_lr_scale = affine_weight, affine_bias, bias_lr_scale
        self.bias_decay = bias_decay  # decayed as the weights are per step: 1/bias_lr_scale of wd
        self.ws = Workspace()

    def params(self):
        specs = []
        if self.affine_weight:
            specs.append(ParamSpec("gamma", (self.c,)))
        if self.affine_bias:
            # With a learning-rate scale of 0 (biases frozen) the decay cannot move them either.
            scale = 1.0 / self.bias_lr_scale if self.bias_lr_scale else 1.0
            specs.append(ParamSpec("beta", (self.c,), lr_scale=self.bias_lr_scale,
                                   decay=self.bias_decay, decay_scale=scale))
        return specs

    def state(self):
        return [ParamSpec("running_mean", (self.c,)), ParamSpec("running_var", (self.c,))]

    def stats_size(self):
        return 2 * self.c

    def init(self, rng):
        if self.affine_weight:
            self.p["gamma"][...] = 1
        if self.affine_bias:
            self.p["beta"][...] = 0
        self.s["running_mean"][...] = 0
        self.s["running_var"][...] = 1

    def forward(self, x, ctx):
        gamma, beta = self.p.get("gamma"), self.p.get("beta")
        if not ctx.train:
            return BN.batchnorm_eval(x, gamma, beta, self.s["running_mean"], self.s["running_var"],
                                    self.eps)
        groups = ctx.groups or [(0, x.shape[-1])]
        out, self.cache, (mean_sum, var_sum) = BN.batchnorm_forward(x, gamma, beta, groups, self.eps,
                                                                   self.ws)
        if ctx.stats_out is not None:
            st = ctx.stats_out[self.name]
            st[:self.c] = mean_sum
            st[self.c:] = var_sum
        return out

    def backward(self, dout):
        dx, _, _ = BN.batchnorm_backward(dout, self.cache, self.g.get("gamma"), self.g.get("beta"),
                                        self.ws)
        return dx

    def merge_stats(self, stats, n_groups):
        m = self.momentum
        rm, rv = self.s["running_mean"], self.s["running_var"]
        rm *= 1 - m
        rm += (m / n_groups) * stats[:self.c].astype(rm.dtype)
        rv *= 1 - m
        rv += (m / n_groups) * stats[self.c:].astype(rv.dtype)


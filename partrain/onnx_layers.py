"""partrain's layers as ONNX nodes: the network part of the graph `export_onnx` writes.

Each layer type has one translation into standard ONNX operators (opset 17) that computes in
evaluation mode what the layer's `forward(x, StepContext(train=False))` computes:

- the graph keeps (N, C, H, W) throughout, ONNX's own layout: partrain's (C, H, W, N) maps are an
  inner layout for its GEMMs, so `ToChannelsFirst` is no node, and `Flatten` (C, H, W order per
  sample) and the global pools ((N, C)) give what partrain's give;
- batch norm is `BatchNormalization` with the running statistics (no gamma: ones; no beta: zeros);
- GELU is written out in the layer's form, in partrain's order of operations: the tanh form with
  `Tanh`, the erf form (airbench's `gelu=erf`) as 0.5·x·(1 + Erf(x/√2)) (the `Gelu` operator is
  opset 20);
- max-pools are `MaxPool` in floor mode, as partrain's (airbench's FloorMaxPool crops an odd last
  row and column: the same windows);
- an `Affine` is `Gemm` with the (out, in) weights transposed, then × its scale (airbench's head
  × 1/9) as partrain does it, after the bias.

Lookup is by exact type: a new layer subclass may compute something else, so it is refused by
name (`PartrainError`) until it has a translation here, never exported quietly wrong.
"""
from __future__ import annotations

import math

import numpy as np

from .errors import PartrainError
from .nn.airbench import DiracConv, FloorMaxPool, WhiteningConv
from .nn.layers import (GELU, Affine, BatchNorm, ChannelBias, Conv, Flatten, GlobalAvgPool,
                        GlobalMaxPool, MaxPool, ReLU, ToChannelsFirst)

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)  # gelu.gelu_forward's constants
_GELU_CUBIC = 0.044715


class Graph:
    """The nodes and initializers (float32 constants) of one ONNX graph being built, with unique
    value names. `onnx` is the module, imported by the caller (it is an optional extra)."""

    def __init__(self, onnx):
        self.onnx = onnx
        self.nodes: list = []
        self.initializers: list = []
        self._used: set[str] = set()
        self._scalars: dict[float, str] = {}

    def name(self, base: str) -> str:
        """`base`, or base_2, base_3, ... when taken."""
        name, i = base, 1
        while name in self._used:
            i += 1
            name = f"{base}_{i}"
        self._used.add(name)
        return name

    def const(self, base: str, array) -> str:
        """A float32 initializer holding a copy of `array`; returns its name."""
        name = self.name(base)
        value = np.ascontiguousarray(np.asarray(array, np.float32))
        self.initializers.append(self.onnx.numpy_helper.from_array(value, name))
        return name

    def scalar(self, value: float) -> str:
        """A float32 0-d constant, one per value for the whole graph."""
        if value not in self._scalars:
            self._scalars[value] = self.const(f"c{len(self._scalars)}", np.float32(value))
        return self._scalars[value]

    def op(self, op_type: str, inputs: list[str], base: str, **attrs) -> str:
        """Add one node with one output; returns the output's name."""
        out = self.name(base)
        self.nodes.append(self.onnx.helper.make_node(op_type, inputs, [out], name=out, **attrs))
        return out


def _identity(g: Graph, name: str, layer, x: str) -> str:
    return x


def _conv(g, name, layer, x):
    # Trained weights are parameters; airbench's frozen whitening filters are model state.
    w = layer.p["w"] if "w" in layer.p else layer.s["w"]
    inputs = [x, g.const(f"{name}.w", w)]
    if layer.p.get("b") is not None:
        inputs.append(g.const(f"{name}.b", layer.p["b"]))
    return g.op("Conv", inputs, name, kernel_shape=[layer.k, layer.k],
                strides=[layer.stride, layer.stride], pads=[layer.pad] * 4)


def _channel_bias(g, name, layer, x):
    out = g.op("Add", [x, g.const(f"{name}.b", layer.p["b"].reshape(-1, 1, 1))], name)
    return g.op("Relu", [out], f"{name}_relu") if layer.fused_relu else out


def _batchnorm(g, name, layer, x):
    c = layer.c
    gamma = layer.p.get("gamma", np.ones(c))
    beta = layer.p.get("beta", np.zeros(c))
    inputs = [x, g.const(f"{name}.gamma", gamma), g.const(f"{name}.beta", beta),
              g.const(f"{name}.running_mean", layer.s["running_mean"]),
              g.const(f"{name}.running_var", layer.s["running_var"])]
    return g.op("BatchNormalization", inputs, name, epsilon=float(layer.eps))


def _relu(g, name, layer, x):
    return g.op("Relu", [x], name)


def _gelu(g, name, layer, x):
    """0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³))), in gelu_forward's order of operations; the
    erf form 0.5·x·(1 + erf(x/√2)) (partrain's erf is a polynomial within 1.5e-7 of Erf's)."""
    if layer.form == "erf":
        t = g.op("Mul", [x, g.scalar(1.0 / math.sqrt(2.0))], f"{name}_scaled")
        t = g.op("Erf", [t], f"{name}_erf")
        t = g.op("Add", [t, g.scalar(1.0)], f"{name}_one_plus")
        t = g.op("Mul", [t, x], f"{name}_times_x")
        return g.op("Mul", [t, g.scalar(0.5)], name)
    t = g.op("Mul", [x, x], f"{name}_sq")
    t = g.op("Mul", [t, g.scalar(_GELU_CUBIC * _SQRT_2_OVER_PI)], f"{name}_cubic")
    t = g.op("Add", [t, g.scalar(_SQRT_2_OVER_PI)], f"{name}_poly")
    t = g.op("Mul", [t, x], f"{name}_u")
    t = g.op("Tanh", [t], f"{name}_tanh")
    t = g.op("Add", [t, g.scalar(1.0)], f"{name}_one_plus")
    t = g.op("Mul", [t, x], f"{name}_times_x")
    return g.op("Mul", [t, g.scalar(0.5)], name)


def _maxpool(g, name, layer, x):
    return g.op("MaxPool", [x], name, kernel_shape=[layer.size, layer.size],
                strides=[layer.stride, layer.stride])


def _global_pool(op_type: str):
    def translate(g, name, layer, x):
        pooled = g.op(op_type, [x], f"{name}_nc11")  # (N, C, 1, 1)
        return g.op("Flatten", [pooled], name, axis=1)
    return translate


def _flatten(g, name, layer, x):
    return g.op("Flatten", [x], name, axis=1)


def _affine(g, name, layer, x):
    inputs = [x, g.const(f"{name}.w", layer.p["w"])]
    if layer.p.get("b") is not None:
        inputs.append(g.const(f"{name}.b", layer.p["b"]))
    out = g.op("Gemm", inputs, name if layer.scale == 1.0 else f"{name}_unscaled", transB=1)
    if layer.scale != 1.0:
        out = g.op("Mul", [out, g.scalar(float(layer.scale))], name)
    return out


TRANSLATIONS = {
    ToChannelsFirst: _identity,
    Conv: _conv, DiracConv: _conv, WhiteningConv: _conv,
    ChannelBias: _channel_bias,
    BatchNorm: _batchnorm,
    ReLU: _relu,
    GELU: _gelu,
    MaxPool: _maxpool, FloorMaxPool: _maxpool,
    GlobalAvgPool: _global_pool("GlobalAveragePool"),
    GlobalMaxPool: _global_pool("GlobalMaxPool"),
    Flatten: _flatten,
    Affine: _affine,
}


def add_layers(g: Graph, model, x: str) -> str:
    """The nodes of every layer of `model` (bound to its parameters) after value `x`; returns
    the last value's name. PartrainError for a layer type without a translation."""
    for name, layer in zip(model.layer_names, model.layers):
        translate = TRANSLATIONS.get(type(layer))
        if translate is None:
            raise PartrainError(f"cannot export model {model.name} to ONNX: layer {name} "
                                f"({type(layer).__name__}) has no ONNX translation yet")
        x = translate(g, name, layer, x)
    return x

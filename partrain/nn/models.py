"""Models by name. `build_model(name, **options)` is deterministic, so every worker process can
build the same model and bind it to the shared flat vectors.
"""
from __future__ import annotations

import inspect

from typing import Callable

import numpy as np

from .airbench import airbench
from .layers import (Affine, BatchNorm, ChannelBias, Conv, Flatten, GlobalAvgPool, Layer, MaxPool, ReLU,
                     ToChannelsFirst)
from .model import Model


def linear(dtype=np.float32, weight_decay=0.0, num_classes=10, input_size=32, **_):
    """Softmax regression on raw pixels: the smallest model, for tests of the machinery."""
    _positive_ints(num_classes=num_classes, input_size=input_size)
    layers = [ToChannelsFirst(), Flatten(),
              Affine("fc", 3 * input_size * input_size, num_classes, init_std=1e-3)]
    return Model("linear", layers, input_shape=(3, input_size, input_size),
                 n_classes=num_classes, dtype=dtype, weight_decay=weight_decay,
                 options=_shape_options(num_classes, input_size))


def three_layer(dtype=np.float32, num_filters=32, filter_size=7, hidden_dim=512,
                weight_scale=1e-3, reg=1e-3, input_size=32, num_classes=10, **_):
    """The cs231n course model: conv - relu - 2x2 max pool - affine - relu - affine - softmax.

    Pooling runs before the conv bias and the ReLU: a per-channel constant and a monotone function
    both commute with a max, so the result and the gradient are identical, and bias and ReLU then
    touch a quarter of the data (one fused pass).
    """
    _positive_ints(num_filters=num_filters, filter_size=filter_size, hidden_dim=hidden_dim,
                   input_size=input_size, num_classes=num_classes)
    if filter_size % 2 == 0:  # "same" padding needs an odd size
        raise ValueError(f"filter_size must be odd (the conv keeps the image size), got "
                         f"{filter_size}")
    pad = (filter_size - 1) // 2
    half = input_size // 2
    layers = [
        ToChannelsFirst(),
        Conv("conv1", 3, num_filters, filter_size, pad=pad, init_std=weight_scale, bias=False),
        MaxPool(2),
        ChannelBias("conv1_bias", num_filters, fused_relu=True),
        Flatten(),
        Affine("fc1", num_filters * half * half, hidden_dim, init_std=weight_scale),
        ReLU(),
        Affine("fc2", hidden_dim, num_classes, init_std=weight_scale),
    ]
    return Model("three-layer", layers, input_shape=(3, input_size, input_size), dtype=dtype,
                 n_classes=num_classes, weight_decay=reg,
                 options=dict(num_filters=num_filters, filter_size=filter_size,
                              hidden_dim=hidden_dim, weight_scale=weight_scale, reg=reg,
                              **_shape_options(num_classes, input_size)))


def vgg(dtype=np.float32, widths=(64, 128, 256), ghost_batch=32, weight_decay=5e-4,
        label_smoothing=0.0, num_classes=10, input_size=32, **_):
    """A VGG-style stack with batch norm: [conv3x3-BN-ReLU ×2, max-pool] per width, global
    average pool, linear head. Batch statistics per ghost batch of `ghost_batch` samples."""
    _positive_ints(ghost_batch=ghost_batch, num_classes=num_classes, input_size=input_size,
                   **{f"widths[{i}]": w for i, w in enumerate(widths)})
    layers: list[Layer] = [ToChannelsFirst()]
    c_in = 3
    for i, w in enumerate(widths):
        for j in range(2):
            layers += [Conv(f"conv{i}{j}", c_in, w, 3, bias=False), BatchNorm(f"bn{i}{j}", w), ReLU()]
            c_in = w
        layers.append(MaxPool(2))
    layers += [GlobalAvgPool(), Affine("fc", c_in, num_classes, init_std=0.01)]
    return Model("vgg", layers, input_shape=(3, input_size, input_size), n_classes=num_classes,
                 dtype=dtype, group_size=ghost_batch, weight_decay=weight_decay,
                 label_smoothing=label_smoothing,
                 options=dict(widths=list(widths), ghost_batch=ghost_batch,
                              **_shape_options(num_classes, input_size)))


MODELS: dict[str, Callable[..., Model]] = {
    "linear": linear,
    "three-layer": three_layer,
    "vgg": vgg,
    "airbench": airbench,
}


SHAPE_OPTIONS = ("input_size", "num_classes")  # every model has them; fit sets them from the store


def _shape_options(num_classes: int, input_size: int) -> dict:
    """The shape options a model records where they differ from CIFAR's 10 classes of 32 x 32
    (a CIFAR-10 model's options, and so its run's config.json, stay as they were)."""
    return {k: v for k, v, d in (("num_classes", num_classes, 10), ("input_size", input_size, 32))
            if v != d}


def _positive_ints(**values) -> None:
    for key, v in values.items():
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise ValueError(f"{key} must be a whole number >= 1, got {v!r}")


def _like_default(key: str, value, default) -> None:
    """An option takes values of its default's kind: a finite number for a number (a whole one
    for an int), numbers for a tuple, a bool for a bool, text for text (else the factory fails
    obscurely: weight_scale='x' in numpy's init)."""
    def number(v, whole):
        ok = (not isinstance(v, bool) and isinstance(v, (int, float, np.integer, np.floating))
              and np.isfinite(v))
        return ok and (not whole or float(v).is_integer())
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, (int, float)):
        ok = number(value, isinstance(default, int))
    elif isinstance(default, (tuple, list)):
        ok = isinstance(value, (tuple, list)) and all(
            number(v, all(isinstance(d, int) for d in default)) for v in value)
    elif isinstance(default, str):
        ok = isinstance(value, str)
    else:
        return
    if not ok:
        kind = {bool: "true or false", int: "a whole number", float: "a finite number",
                str: "text", tuple: "a list of numbers", list: "a list of numbers"}
        raise ValueError(f"{key} must be {kind.get(type(default), 'like ' + repr(default))}, "
                         f"got {value!r}")


def build_model(name: str, **options) -> Model:
    """The model `name` with `options`; ValueError for an option it does not have (the
    factories' own **_ would swallow a misspelt one silently) or a value it cannot take."""
    try:
        factory = MODELS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; choose from {', '.join(MODELS)}") from None
    known = [p.name for p in inspect.signature(factory).parameters.values()
             if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name != "dtype"]
    unknown = sorted(set(options) - set(known) - {"dtype"})
    if unknown:
        raise ValueError(f"model {name} has no option {', '.join(unknown)} "
                         f"(its options: {', '.join(known)})")
    defaults = {p.name: p.default for p in inspect.signature(factory).parameters.values()}
    for key, value in options.items():
        if key in defaults:
            _like_default(key, value, defaults[key])
        if isinstance(value, bool) or not isinstance(value, (int, float, list, tuple, str)):
            continue
        values = value if isinstance(value, (list, tuple)) else [value]
        if key != "dtype" and any(isinstance(v, (int, float)) and v < 0 for v in values):
            raise ValueError(f"{key} must not be negative, got {value!r}")
    return factory(**options)

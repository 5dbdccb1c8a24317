"""A new training run: its store checked, its model fitted to the store's images and classes, its
folder created. The one path of `partrain fit` and `api.fit` (and what `partrain bench` uses to
fit a model to a store).

Every model takes the options `input_size` and `num_classes` (nn/models.py SHAPE_OPTIONS). They
are set here from the store, where they differ from CIFAR's 32 x 32 and 10 classes, into the run's
settings: config.json then says which model was built, and every later step (workers, resume,
evaluate, predict, export) builds the same one from it without reading the store first.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

from .config import TrainConfig
from .datasets.store import CifarData, inspect_store
from .errors import PartrainError
from .nn.models import build_model
from .rundir import RunDir

CIFAR_SHAPE = {"input_size": 32, "num_classes": 10}  # every model's defaults


def shape_options(data: CifarData) -> dict:
    """The model options that fit a model to the images and classes of store `data`."""
    c, h, w = data.image_shape
    if h != w:
        raise PartrainError(f"{data.path}: the models take square images, the store holds "
                            f"{h}x{w}; rebuild it with `partrain prepare --size N`")
    return {"input_size": int(h), "num_classes": data.num_classes}


def fit_options(model: str, options: dict, data: CifarData) -> dict:
    """`options` for `model` with the store's shape options added (those equal to the model's
    own defaults left out: a CIFAR-10 run's settings stay as they were). A shape option the user
    gave must agree with the store; a model that cannot take the store's images or classes is
    one line naming the model and the size."""
    out = dict(options)
    for key, value in shape_options(data).items():
        if key in out and out[key] != value:
            raise PartrainError(f"--model-option {key}={out[key]!r}, but {data.path} holds "
                                f"{_described(data)}; leave {key} out (fit sets it)")
        if value != CIFAR_SHAPE[key]:
            out[key] = value
        else:
            out.pop(key, None)
    try:
        build_model(model, **out)
    except (TypeError, ValueError) as e:
        raise PartrainError(f"model {model} cannot take {_described(data)} of {data.path}: "
                            f"{e}") from None
    return out


def fitted_config(cfg: TrainConfig, data: CifarData) -> TrainConfig:
    """`cfg` with its model options fitted to store `data` (`fit_options`)."""
    return dataclasses.replace(cfg, model_options=fit_options(cfg.model, cfg.model_options, data))


def create_run(cfg: TrainConfig, root, name: str | None,
               missing_hint: str = "") -> tuple[TrainConfig, RunDir]:
    """(the settings fitted to the store, the new run folder) for checked settings `cfg`: the
    store must be there and readable and fit the model before any folder exists, so bad data
    leaves none. missing_hint: appended to the "not found" message (the API names its argument)."""
    if not Path(cfg.data).exists():
        raise PartrainError(f"{cfg.data} not found; run `partrain prepare` first" + missing_hint)
    cfg = fitted_config(cfg, inspect_store(cfg.data))
    return cfg, RunDir.create(root, name, cfg.model)


def _described(data: CifarData) -> str:
    _, h, w = data.image_shape
    return f"{h}x{w} images of {data.num_classes} classes"

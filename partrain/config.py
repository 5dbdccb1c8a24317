"""The settings of a run, each declared once: `TrainConfig`, its presets (`RECIPES`), and what
the optimizer is built from (`optimizer_spec`).

A field's metadata is its whole description: help, choices, CLI flag, metavar. `partrain fit`
generates its options from it and `TrainConfig.check` validates against it, so a choice the code
adds (a schedule in `optim.SCHEDULES`, a mode in `tta.MODES`) reaches the command line by itself.
Choices come from the code's own tables, never from a copy.
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import json
import math
import numbers
import reprlib
import typing
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .augment import AugmentSpec
from .batches import NORMALIZATIONS
from .errors import PartrainError
from .nn.models import MODELS, build_model
from .optim import OPTIMIZERS, SCHEDULES
from .parallel.reduce import REDUCTIONS
from .tta import MODES


def parse_pairs(pairs, flag: str, metavar: str, value) -> dict:
    """{KEY: value(VALUE)} from repeated KEY=VALUE options; a bad pair is one clean error."""
    out = {}
    for item in pairs:
        key, sep, text = item.partition("=")
        try:
            if not key or not sep:
                raise ValueError
            out[key] = value(text)
        except ValueError:
            raise PartrainError(f"{flag} wants {metavar}, got {item!r}") from None
    return out


def parse_model_options(pairs) -> dict:
    """--model-option KEY=VALUE...: VALUE is JSON when it parses (numbers, lists), else text."""
    def value(text):
        try:
            return json.loads(text)
        except ValueError:
            return text
    return {k.replace("-", "_"): v
            for k, v in parse_pairs(pairs, "--model-option", "KEY=VALUE", value).items()}


def parse_freeze_after(pairs) -> dict:
    """--freeze-after NAME=EPOCHS...: EPOCHS may be fractional (turned into steps later)."""
    return parse_pairs(pairs, "--freeze-after", "NAME=EPOCHS", float)


def setting(default, help: str | None = None, **meta):
    """A TrainConfig field with the metadata its CLI option and its check are made from.

    meta: choices (the valid values), minimum, above (a strict lower bound), maximum, below (a
    strict upper bound); flag ("--name", or "--x/--no-x" for a boolean
    pair; default --field-name), metavar, type (when the default does not tell it); multiple (a
    repeatable option); cli_default and parse, when the option's value is not the field's (the
    field data is the file DIR/cifar10.h5 of --data-dir DIR); cli=False: cli.fit writes it by hand.
    """
    meta["help"] = help
    if isinstance(default, dict):
        return field(default_factory=lambda: dict(default), metadata=meta)
    return field(default=default, metadata=meta)


def flag_spelling(f: dataclasses.Field) -> str:
    """The command-line flag of field f: "--field-name" unless its metadata spells it."""
    return f.metadata.get("flag", "--" + f.name.replace("_", "-"))


@dataclass
class TrainConfig:
    """Every setting of a run; saved as config.json (in this order) and compared on resume."""

    # MODELS is a registry that may grow at run time: checked in check(), not a fixed choice.
    model: str = setting("three-layer", "Model name: three-layer (the course model), vgg, "
                                        "linear, airbench.")
    model_options: dict = setting({}, "Model setting, e.g. hidden_dim=256 (repeatable).",
                                  flag="--model-option", metavar="KEY=VALUE",
                                  multiple=True, parse=parse_model_options)
    optimizer: str = setting("adam", choices=OPTIMIZERS)
    lr: float = setting(1e-3, "Learning rate.", above=0)
    momentum: float = setting(0.9, "SGD momentum.", minimum=0, below=1)
    nesterov: bool = setting(False, "Nesterov momentum (SGD).")
    weight_decay: float | None = setting(
        None, "L2 regularisation strength [default: the model's own; 1e-3 for three-layer].",
        type=float, minimum=0)
    clip_norm: float | None = setting(
        None, "Clip each step's gradient to global L2 norm C: g *= C / max(|g|, C), on the "
              "mean gradient before weight decay; history logs the norm (grad_norm) and the "
              "share of steps clipped (clipped_frac). The same bits for any --workers with "
              "--micro-batch [default: off].", type=float, above=0, metavar="C")
    schedule: str = setting("constant", "Learning-rate schedule.", choices=SCHEDULES)
    warmup_epochs: float = setting(0.0, minimum=0)
    batch_size: int = setting(50, "Global minibatch size (the same whatever --workers is).",
                              minimum=1)
    accumulate: int = setting(1, "Optimizer steps of K batches of --batch-size, their gradients "
                                 "summed (the mean over K x B samples), computed one batch at a "
                                 "time: a large batch in the memory of a small one. Steps, "
                                 "--log-every and the schedule count optimizer steps; an epoch "
                                 "has ceil(batches / K) of them.", minimum=1, metavar="K")
    epochs: int = setting(3, minimum=1)
    early_stop: int | None = setting(
        None, "Stop when the --early-stop-on value has not improved for PATIENCE epochs "
              "[default: off].", type=int, minimum=1, metavar="PATIENCE")
    early_stop_on: str = setting("val_acc", "What --early-stop watches and best.h5 keeps the "
                                            "best epoch of: the validation accuracy (higher is "
                                            "better) or loss (lower).",
                                 choices=("val_acc", "val_loss"))
    seed: int = setting(0, minimum=0)
    val_size: int = setting(1000, "Training images held out for validation.", minimum=0)
    workers: int = setting(1, "Worker processes [default: usable cores]; 1 trains in this "
                              "process.", cli_default=None, minimum=1)
    reduction: str = setting("sharded", "How gradients are summed and the optimizer stepped.",
                             choices=tuple(REDUCTIONS))
    micro_batch: int | None = setting(
        None, "Sum the gradient over fixed micro-batches of M samples in one fixed order, so "
              "that every --workers count (and number of machines) gives the same bits, and "
              "--resume may change --workers; 0: off. A multiple of the model's batch-norm "
              "group; workers beyond a step's micro-batches idle [default: the model's chunk "
              "where it has one (airbench: 64, at no measurable cost), else off (three-layer "
              "at batch 256: 5 % slower with M=128, 7-11 % with 64)].", metavar="M", type=int,
        minimum=0)
    on_worker_failure: str = setting(
        "stop", "What a lost worker process does to the run: stop it (with a message naming the "
                "worker), or restart: fresh workers do that step again from its start, and the "
                "run ends with the bits of an undisturbed one (one machine only; costs a copy "
                "of the optimizer's vectors per step).", choices=("stop", "restart"))
    data: str = setting("data/cifar10.h5", "Folder holding cifar10.h5 (made by partrain "
                                           "prepare).", flag="--data-dir", type=Path,
                        cli_default="data", parse=lambda folder: str(Path(folder) / "cifar10.h5"))
    log_every: int = setting(20, "Steps per history row.", minimum=1)
    # --recipe is applied before the other options are resolved, so cli.fit writes it by hand.
    recipe: str | None = setting(None, cli=False)
    normalize: str = setting("channel", "How images are normalised: channel (each channel's "
                                        "train mean and std) or mean-image (subtract the mean "
                                        "training image, divide by nothing: the cs231n course's "
                                        "preprocessing).", choices=NORMALIZATIONS)
    augment_flip: bool = setting(False, "Augment: mirror each training image every other epoch "
                                        "(alternating flips).", flag="--flip/--no-flip")
    augment_translate: int = setting(0, "Augment: shift each training image by up to PX pixels "
                                        "(reflect padding).", flag="--translate", metavar="PX",
                                     minimum=0, maximum=32)  # past the 32-pixel image: no image
    freeze_after: dict = setting({}, "Stop training parameter (or layer) NAME after EPOCHS "
                                     "epochs (repeatable).", metavar="NAME=EPOCHS",
                                 multiple=True, parse=parse_freeze_after)
    tta: str = setting("none", "Also report the final test accuracy with test-time "
                               "augmentation.", choices=MODES)
    lookahead: bool = setting(False, "airbench94's Lookahead: every 5 steps, pull the weights "
                                     "toward a slow average (0.95^5·(t/T)^3); end on the average.",
                              flag="--lookahead/--no-lookahead")

    def micro_batch_of(self, model=None) -> int | None:
        """The micro-batch the run sums its gradients over (`step.micro_gradients`), or None:
        --micro-batch M; 0: none; unset: the chunk of `model` (built from the settings when not
        given) where it has one. airbench runs its 64-image chunks anyway, so rows of its own
        for each cost nothing; the course model's would re-read its 16 MB affine weights per
        micro-batch."""
        if self.micro_batch is not None:
            return self.micro_batch or None
        if model is None:
            try:
                model = build_model(self.model, **self.model_options)
            except (TypeError, ValueError, KeyError):
                return None
        return getattr(model, "chunk_size", None)

    # Settings that may differ on resume without changing the result (tta: only the final test).
    FREE_ON_RESUME = ("log_every", "data", "tta", "on_worker_failure")

    def check(self) -> None:
        """Raise PartrainError, naming the option, for the first setting that is not valid.

        The types come first: a config.json edited by hand can hold any JSON value, and every
        later comparison must be able to trust them."""
        for f in dataclasses.fields(self):
            _check_type(f, getattr(self, f.name))
        if self.model not in MODELS:
            raise PartrainError(f"unknown model {self.model!r}; choose from {', '.join(MODELS)}")
        from .recipes import RECIPES  # recipes.py builds on this module
        if self.recipe is not None and self.recipe not in RECIPES:
            raise PartrainError(f"unknown recipe {self.recipe!r}; choose from {', '.join(RECIPES)}")
        for f in dataclasses.fields(self):
            _check_value(f, getattr(self, f.name))
        if self.workers > self.batch_size:
            raise PartrainError(f"--workers {self.workers} exceeds --batch-size {self.batch_size}")
        if self.early_stop and not self.val_size:
            raise PartrainError("--early-stop needs a validation set: --val-size must be more "
                                "than 0")
        if self.warmup_epochs > self.epochs:  # 1e308 epochs of steps overflowed the schedule
            raise PartrainError(f"--warmup-epochs {self.warmup_epochs:g} exceeds --epochs "
                                f"{self.epochs}")
        for k, v in self.freeze_after.items():
            if not _is_number(v) or not math.isfinite(v) or v < 0:
                raise PartrainError(f"--freeze-after {k}={short_repr(v)}: want a number of "
                                    f"epochs >= 0")
        if "\0" in self.data:
            raise PartrainError(f"--data-dir must not contain a NUL character: "
                                f"{short_repr(self.data)}")
        self.build_model()

    def build_model(self):
        """The run's model, or PartrainError naming the bad --model-option (an unknown name, a
        value of the wrong type or range): before any run folder or worker exists."""
        try:
            with np.errstate(all="raise"):  # nonsense sizes overflow in the layout's arithmetic
                model = build_model(self.model, **self.model_options)
            return model  # whether it fits the store: new_run.fit_options
        except (TypeError, ValueError, ArithmeticError) as e:
            options = " ".join(f"{k}={short_repr(v)}"
                               for k, v in self.model_options.items())
            raise PartrainError(f"--model-option: cannot build {self.model}"
                                + (f" with {cut(options)}" if options else "")
                                + f": {cut(str(e))}") from None

    def augment_spec(self) -> AugmentSpec | None:
        """The AugmentSpec the runners apply, or None when augmentation is off."""
        spec = AugmentSpec(self.seed, bool(self.augment_flip), int(self.augment_translate))
        return spec if spec.active else None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    @classmethod
    def from_saved(cls, d, where) -> "TrainConfig":
        """The settings a run folder's config.json (`where`) holds, checked as the command
        line's are (`check`): PartrainError naming the file and the setting for any value a
        hand edit or a damaged disk can leave. A missing setting takes its default (an older
        partrain did not have it); an unknown one is refused, since a resume that ignored it
        might not be the run that was started."""
        if not isinstance(d, dict):
            raise PartrainError(f"{where} is not a valid run config: its settings are not a "
                                f"JSON object")
        unknown = sorted(set(d) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise PartrainError(f"{where} is not a valid run config: unknown setting "
                                f"{short_repr(unknown[0])} (written by a newer partrain?)")
        cfg = cls.from_dict(d)
        try:
            for f in dataclasses.fields(cfg):  # named as in the file, not as on the command line
                _check_type(f, getattr(cfg, f.name), f"setting {f.name!r}")
            cfg.check()
        except PartrainError as e:
            raise PartrainError(f"{where} is not a valid run config: {e}") from None
        return cfg

    def changes(self) -> dict:
        """The fields that differ from the defaults (what a recipe sets), as copies."""
        default = TrainConfig()
        return {k: copy.deepcopy(v) for k, v in self.to_dict().items()
                if v != getattr(default, k)}


def resumed(saved: TrainConfig, given: dict) -> TrainConfig:
    """The settings of a resumed run: the saved ones, with the `given` ones (from the command
    line) on top where they cannot change the result; PartrainError naming every other change.

    More epochs of a constant schedule extend the same run exactly; the settings in
    FREE_ON_RESUME only change the log or the final test; anything else would not be the run
    that was started.
    """
    conflicts = []
    for k, v in given.items():
        if k in TrainConfig.FREE_ON_RESUME or v is None:
            continue
        if k == "epochs" and saved.schedule == "constant" and v >= saved.epochs:
            continue
        if k == "workers" and saved.micro_batch_of():  # any worker count sums the same rows
            continue
        if getattr(saved, k) != v:
            conflicts.append(f"{k} ({getattr(saved, k)!r} -> {v!r})")
    if conflicts:
        why = ("; the run was made without --micro-batch, so another worker count sums its "
               "gradients in another order (other bits)"
               if any(c.startswith("workers ") for c in conflicts) else "")
        raise PartrainError("cannot resume exactly with changed settings: " + ", ".join(conflicts)
                            + why)
    return TrainConfig.from_dict({**saved.to_dict(), **{k: v for k, v in given.items()
                                                          if v is not None}})


@functools.cache
def _field_types() -> dict:
    return typing.get_type_hints(TrainConfig)


# What a value of each annotated type may be: ints are numbers, but a bool is neither.
_KINDS = {float: "a number", int: "a whole number", bool: "true or false", str: "text",
          dict: "an object of NAME: VALUE", type(None): "null"}


def _is_number(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, (bool, str))


def _has_type(value, kind) -> bool:
    if kind is float:
        return _is_number(value)
    if kind is int:
        return _is_number(value) and isinstance(value, numbers.Integral)
    if kind is dict:
        return isinstance(value, dict) and all(isinstance(k, str) for k in value)
    return isinstance(value, kind)


def _check_type(f: dataclasses.Field, value, label: str | None = None) -> None:
    """PartrainError unless value has field f's annotated type; named by `label` (default:
    the option's flag)."""
    kinds = typing.get_args(_field_types()[f.name]) or (_field_types()[f.name],)
    if not any(_has_type(value, kind) for kind in kinds):
        want = " or ".join(_KINDS[kind] for kind in kinds)
        raise PartrainError(f"{label or flag_spelling(f).split('/')[0]} must be {want}, got "
                            f"{short_repr(value)}")


def short_repr(value, limit: int = 80) -> str:
    """A value for a one-line message: a file can hold a megabyte where a number belongs (and
    reprlib stops early, so a million-item list costs no million-item repr)."""
    return cut(_REPR.repr(value), limit)


def cut(text: str, limit: int = 200) -> str:
    """`text` on one line of at most `limit` characters."""
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


_REPR = reprlib.Repr()
_REPR.maxstring = _REPR.maxother = 60


def _check_value(f: dataclasses.Field, value) -> None:
    meta, flag = f.metadata, flag_spelling(f).split("/")[0]
    if value is None:
        return
    choices = meta.get("choices")
    if choices is not None and value not in choices:
        raise PartrainError(f"{flag} must be one of {', '.join(choices)}, got "
                            f"{short_repr(value)}")
    if meta.get("type", type(f.default)) is int and int(value) != value:
        raise PartrainError(f"{flag} must be a whole number, got {value!r}")
    if isinstance(value, float) and not math.isfinite(value):
        raise PartrainError(f"{flag} must be a finite number, got {value!r}")
    if "minimum" in meta and value < meta["minimum"]:
        raise PartrainError(f"{flag} must be at least {meta['minimum']}, got {value!r}")
    if "above" in meta and value <= meta["above"]:
        raise PartrainError(f"{flag} must be more than {meta['above']}, got {value!r}")
    if "maximum" in meta and value > meta["maximum"]:
        raise PartrainError(f"{flag} must be at most {meta['maximum']}, got {value!r}")
    if "below" in meta and value >= meta["below"]:
        raise PartrainError(f"{flag} must be less than {meta['below']}, got {value!r}")

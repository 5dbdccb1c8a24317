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
from .datasets.store import IMAGE_SHAPE
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
    schedule: str = setting("constant", "Learning-rate schedule.", choices=SCHEDULES)
    warmup_epochs: float = setting(0.0, minimum=0)
    batch_size: int = setting(50, "Global minibatch size (the same whatever --workers is).",
                              minimum=1)
    epochs: int = setting(3, minimum=1)
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
        if self.recipe is not None and self.recipe not in RECIPES:
            raise PartrainError(f"unknown recipe {self.recipe!r}; choose from {', '.join(RECIPES)}")
        for f in dataclasses.fields(self):
            _check_value(f, getattr(self, f.name))
        if self.workers > self.batch_size:
            raise PartrainError(f"--workers {self.workers} exceeds --batch-size {self.batch_size}")
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
            if model.input_shape != IMAGE_SHAPE:  # e.g. input_size=7: no CIFAR-10 image fits
                raise ValueError(f"it takes {'x'.join(map(str, model.input_shape))} images, not "
                                 f"CIFAR-10's {'x'.join(map(str, IMAGE_SHAPE))}")
            return model
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


def optimizer_spec(cfg: TrainConfig, model, steps_per_epoch: int = 1) -> tuple[str, dict]:
    """(name, hyper) for `runner.make_optimizer`; freeze_after's epochs become step counts."""
    wd = model.weight_decay if cfg.weight_decay is None else cfg.weight_decay
    hyper = {"weight_decay": wd}  # the learning rate goes with every step (the schedule)
    if cfg.freeze_after:
        names = [s.name for s in model.layout.specs]
        for key in cfg.freeze_after:
            if not any(n == key or n.startswith(key + ".") for n in names):
                raise PartrainError(f"--freeze-after {key}: model {cfg.model} has no such "
                                    f"parameter or layer (see partrain fit --dry-run)")
        hyper["freeze"] = {k: int(round(v * steps_per_epoch)) for k, v in cfg.freeze_after.items()}
    if cfg.optimizer == "sgd":
        hyper.update(momentum=cfg.momentum, nesterov=cfg.nesterov)
    return cfg.optimizer, hyper  # adam, adamw: optim.build_optimizer's own betas


# ----------------------------------------------------------------------------------- recipes
# `partrain fit --recipe NAME` fills in these settings where the command line does not give them;
# config.json records the result (with the recipe's name), so --resume needs no recipe.
#
# `airbench` is Keller Jordan's airbench94 (github.com/KellerJordan/airbench, 94 % on CIFAR-10 in
# ~3.8 s on an A100) for the model `airbench`, in our conventions:
# - Loss: airbench SUMS the batch's losses, we average them. Its PyTorch SGD (momentum μ = 0.85)
#   has lr_torch = 11.5 / (1024·(1 + 1/(1-μ))) on the sum, a step of (lr_torch·bs)·mean gᵢ: on
#   the mean loss lr = 11.5·bs / (1024·(1 + 1/0.15)) = 1.5 for bs = 1024 (`airbench_lr`).
# - Weight decay: airbench's weight_decay = 0.0153·bs/11.5 is coupled (added to the summed-loss
#   gradient before momentum, as our SGD's default); divided by bs for our mean-loss gradient it is
#   0.0153/11.5 ≈ 1.33e-3 for any bs, and lr·wd is airbench's per-step shrink. It decays the conv
#   and head weights only (the model's decay ranges; nn/airbench.py says why not the BN biases).
# - From the model: BN biases learn 64× faster (airbench's bias_scaler), label smoothing 0.2.
# - Schedule `onecycle`: 0.2 → 1 at 23 % of the steps → 0.07 at the end (airbench's triangle).
# - Epochs: airbench94 trains 9.9 epochs; ours are whole, so 10 (480 steps of 1024 on the 49,000
#   images left by the 1,000-image validation split).
# - Whitening: the first conv's filters come from the training images (the airbench model's `init_from_data`);
#   its bias trains for 3 epochs, then is frozen (learning-rate scale 0, as requires_grad=False).
# - Alternating flips, translation by up to 2 px, TTA `flip_translate`, and Lookahead every 5 steps
#   with decay 0.95⁵·(t/T)³, ending on the average (`train.AirbenchLookahead`).
# - Not here: the fractional last epoch; BN statistics over ghost batches of 64 (nn/airbench.py).
# A different --batch-size rescales the lr (∝ batch size) unless --lr is given; the weight decay
# needs no change. `airbench-short` is the same in 3 epochs, for minutes on a few CPU cores.

AIRBENCH_MOMENTUM, AIRBENCH_BATCH = 0.85, 1024


def airbench_lr(batch_size: int = AIRBENCH_BATCH, lr_per_1024: float = 11.5,
                momentum: float = AIRBENCH_MOMENTUM) -> float:
    """airbench's learning rate for our mean-reduced loss (see the derivation above)."""
    return lr_per_1024 * batch_size / (1024 * (1 + 1 / (1 - momentum)))


_AIRBENCH = TrainConfig(
    model="airbench", optimizer="sgd", lr=airbench_lr(), momentum=AIRBENCH_MOMENTUM, nesterov=True,
    weight_decay=0.0153 / 11.5, schedule="onecycle", batch_size=AIRBENCH_BATCH, epochs=10,
    augment_flip=True, augment_translate=2, freeze_after={"whiten_bias": 3}, tta="flip_translate",
    lookahead=True, recipe="airbench")

RECIPES: dict[str, TrainConfig] = {
    "airbench": _AIRBENCH,
    "airbench-short": dataclasses.replace(_AIRBENCH, epochs=3, freeze_after={"whiten_bias": 1},
                                          recipe="airbench-short"),
}


def apply_recipe(name: str, settings: dict, explicit: set[str]) -> dict:
    """`settings` (TrainConfig fields) with the recipe's changes filled in where not `explicit`ly
    given; model_options merge, the command line's on top of the recipe's."""
    try:
        preset = RECIPES[name].changes()
    except KeyError:
        raise PartrainError(f"unknown recipe {name!r}; choose from {', '.join(RECIPES)}") from None
    out = dict(settings)
    for key, value in preset.items():
        if key == "model_options":
            out[key] = {**value, **settings.get(key, {})}
        elif key not in explicit:
            out[key] = value
    if name.startswith("airbench") and "batch_size" in explicit and "lr" not in explicit:
        out["lr"] = airbench_lr(out["batch_size"])
    out["recipe"] = name
    return out

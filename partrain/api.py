"""The Python API: what a notebook calls instead of `partrain prepare | fit | evaluate | predict`.

    from partrain import api
    data = api.open_store(api.prepare("data"))
    result = api.fit(model="three-layer", epochs=1, workers=4)
    run = api.load_run(result.run)
    labels, probabilities = run.predict(data.test_images[:8])
    run.evaluate()["accuracy"]

Nothing here prepares, trains, reads a checkpoint or normalises by itself, so that a notebook and
the command line cannot drift apart: both are thin layers over the same functions (cli.py only
parses and prints). `prepare` is the command's own function; `fit` is `train.fit` with the
command line's defaults, recipe handling, checks (`TrainConfig.check`) and new run folder
(`new_run.create_run`: the model fitted to the store), so a run made here is the run `partrain
fit` makes with the same settings, bit for bit, and `partrain plot | evaluate | predict |
fit --resume` take it as theirs. `Run` is `RunDir.load_for_eval` with the run's own normalisation
and the one inference loop (`evaluate.batched_logits`). Every bad input is one `PartrainError`, as
on the command line; a Ctrl-C (a notebook's interrupt) during `fit` stops at the next step with a
checkpoint and raises `interrupt.Interrupted`, a KeyboardInterrupt; `fit(resume=...)` continues.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .batches import split_train_val
from .config import TrainConfig, _check_type, short_repr
from .recipes import apply_recipe
from .datasets.store import FILENAME, IMAGE_SHAPE, CifarData, inspect_store, load_store
from .errors import PartrainError
from .evaluate import (accuracy, batched_logits, check_store_fits, confusion_matrix, data_path,
                       per_class_accuracy, run_scale_shift, tta_accuracy)
from .evaluate import load_run as _load_checkpointed
from .nn.models import build_model as _build_model
from .parallel.engine import usable_cores
from .predict import softmax
from .hooks import Hooks
from .new_run import create_run, fit_options
from .rundir import RunDir, file_sha256
from .train import fit as _train_fit
from .tta import MODES

__all__ = ["SETTINGS", "FitResult", "PartrainError", "Run", "build_model", "fit", "history",
           "load_run", "make_config", "open_store", "prepare"]

# The keyword settings of `fit`: TrainConfig's fields but two, which `fit` names as the command
# line does: the store is `data_dir` (--data-dir), and `recipe` is applied before the others.
SETTINGS = tuple(f.name for f in dataclasses.fields(TrainConfig)
                 if f.name not in ("data", "recipe"))
_FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}


# ------------------------------------------------------------------------------ data, models
def store_file(path_or_dir) -> Path:
    """The store a path names: DIR/cifar10.h5 for a folder (what --data-dir means, and what a
    missing path without .h5 is taken for), else the file itself."""
    path = Path(_path(path_or_dir, "data_dir"))
    if path.is_dir() or (not path.exists() and path.suffix != ".h5"):
        return path / FILENAME
    return path


def open_store(path_or_dir="data") -> CifarData:
    """The store `partrain prepare` made (the folder holding cifar10.h5, or the file), checked
    and read into memory by `store.load_store`: test_images, uint8 (N, 3, H, W) (32 x 32 for
    CIFAR), are what `Run.predict` takes; class_names name its labels."""
    return load_store(store_file(path_or_dir))


def prepare(data_dir="data", source=None, *, images=None, csv=None, images_test=None,
            csv_test=None, test_fraction=None, size: int = 32, seed: int = 0,
            skip_bad: bool = False, labels: str = "fine", force: bool = False,
            quiet: bool = True) -> Path:
    """`partrain prepare` (the same function the command runs): DATA_DIR/cifar10.h5 from
    CIFAR-10 (downloaded, or `source`), CIFAR-100 (`source`, `labels` fine or coarse), or your
    own images (`images`: a folder of class subfolders, or `csv`: path,label rows; the test split
    from `images_test` / `csv_test` or `test_fraction` of each class, centre-cropped and resized
    to `size`). Returns the store's path, for `open_store`. quiet: print nothing but notes."""
    echo = (lambda text: None) if quiet else print
    own = (images, csv, images_test, csv_test, test_fraction)
    if any(v is not None for v in own):
        if source is not None:
            raise PartrainError("source reads CIFAR; images / csv read your own: give one")
        from .prepare_images import prepare_images
        return prepare_images(data_dir, images, csv, images_test, csv_test, test_fraction, size,
                              seed, skip_bad, force, quiet, echo=echo)
    from .prepare import prepare as _prepare
    return _prepare(data_dir, source, force, echo=echo, labels=labels, progress=not quiet)


def build_model(name: str, data: CifarData | None = None, **options):
    """`nn.models.build_model` (the model `fit(model=name, model_options=options)` trains, with
    fresh parameters), with a bad name or option as the one PartrainError of the command line.
    data: a store (`open_store`) whose image size and class count the model is built for, as
    `fit` builds it (`new_run.fit_options`)."""
    if data is not None:
        options = fit_options(name, options, data)
    try:
        return _build_model(name, **options)
    except (TypeError, ValueError) as e:
        raise PartrainError(f"cannot build model {short_repr(name)}: {e}") from None


# ------------------------------------------------------------------------------------ fitting
@dataclass
class FitResult:
    """What `fit` returns: the run folder (for `load_run`, `partrain plot | evaluate`), the
    summary (summary.json's numbers: test_acc, best_val_acc, images_per_s, ...), history.csv's
    rows (`history`) and the settings the run trained with."""

    run: Path
    summary: dict
    history: list[dict]
    config: TrainConfig


def fit(*, recipe: str | None = None, data_dir=None, runs_dir="runs", name: str | None = None,
        resume=None, quiet: bool = True, step_timeout: float | None = None,
        on_log_row=None, on_epoch_end=None, on_checkpoint=None, **settings) -> FitResult:
    """Train a run as `partrain fit` does and return its FitResult.

    settings: TrainConfig fields (`SETTINGS`: model, model_options, epochs, batch_size, workers,
    lr, ...) as Python values; what is not given takes the command line's default (workers: the
    usable cores). recipe: a preset (`recipes.RECIPES`) applied first; settings given win over it.
    data_dir: the folder holding cifar10.h5, or the file [default: data; a resumed run: its own].
    runs_dir, name: the run folder RUNS_DIR/NAME [default name: MODEL-DATE-TIME]. resume: a run
    folder to continue exactly where it stopped; settings given then must keep the run exact
    (`config.resumed`). quiet: print nothing (False: the command line's progress lines).
    step_timeout: as --step-timeout. A bad setting is a PartrainError before any folder exists.
    on_log_row(row), on_epoch_end(row), on_checkpoint(path, which, meta): hooks, called in this
    process as history.csv's rows (dicts of its filled columns, plus "time") and the checkpoints
    are written (partrain.hooks says in which order); one that raises stops the run there, and
    `fit(resume=run)` continues it. The rows also go to RUN/metrics.jsonl, one JSON line each.
    """
    hooks = Hooks(on_log_row, on_epoch_end, on_checkpoint)
    hooks.check()
    given = _given(settings, data_dir)
    if resume is None:
        cfg, run = _new_run_folder(_new_config(given, recipe), runs_dir, name)
    else:
        run = Path(_path(resume, "resume"))
        extra = {} if recipe is None else {"recipe": recipe}
        cfg = RunDir.open(run).resume_config({**given, **extra})
    summary = _train_fit(cfg, run, resume=resume is not None, quiet=quiet,
                         step_timeout=step_timeout, hooks=hooks)
    return FitResult(run, summary, history(run), cfg)


def make_config(*, recipe: str | None = None, data_dir=None, **settings) -> TrainConfig:
    """The checked settings `fit` would train a new run with (what `partrain fit --dry-run`
    prints), from the same arguments; nothing is created."""
    return _new_config(_given(settings, data_dir), recipe)


def history(run) -> list[dict]:
    """history.csv of a run folder as rows in the file's order, each {"kind": "step" or
    "epoch", column: int or float} with only its filled columns: `RunDir.read_history`'s two
    lists merged back (an epoch's row comes after the row of its last step, at the same step)."""
    steps, epochs = RunDir(_path(run, "run")).read_history()
    rows = [{"kind": "step", **r} for r in steps] + [{"kind": "epoch", **r} for r in epochs]
    return sorted(rows, key=lambda r: (r.get("step", 0), r["kind"] == "epoch"))


def _given(settings: dict, data_dir) -> dict:
    """The settings given to fit, each a known field of the right type (named by its key, not by
    the command line's flag), as config.json will hold them."""
    out = {}
    for key, value in settings.items():
        if key not in SETTINGS:
            close = difflib.get_close_matches(key, SETTINGS + ("data_dir", "recipe"), n=1)
            hint = (f"did you mean {close[0]!r}?" if close
                    else f"the settings: {', '.join(SETTINGS)}")
            raise PartrainError(f"unknown setting {key!r}; {hint}")
        _check_type(_FIELDS[key], value, f"setting {key!r}")
        out[key] = _as_saved(key, value)
    if data_dir is not None:
        out["data"] = str(store_file(data_dir))
    return out


def _as_saved(key: str, value):
    """`value` as config.json holds it (numpy numbers as Python ones, tuples as lists): the
    TrainConfig trained with then equals the one a resume or `load_run` reads back."""
    def numpy_value(v):
        if isinstance(v, (np.generic, np.ndarray)):
            return v.tolist()
        raise TypeError(f"{type(v).__name__} is not a JSON value")
    try:
        return json.loads(json.dumps(value, default=numpy_value))
    except (TypeError, ValueError, RecursionError) as e:
        raise PartrainError(f"setting {key!r}: {short_repr(value)} cannot be saved in "
                            f"config.json ({e})") from None


def _new_config(given: dict, recipe) -> TrainConfig:
    """The command line's resolution (cli.fit): its defaults (workers: the usable cores), the
    recipe filled in where a setting is not given (`recipes.apply_recipe`), then `check`."""
    settings = {**TrainConfig().to_dict(), "workers": usable_cores(), **given}
    if recipe is not None:
        if not isinstance(recipe, str):
            raise PartrainError(f"recipe must be a name (text), got {short_repr(recipe)}")
        settings = apply_recipe(recipe, settings, set(given))
    cfg = TrainConfig(**settings)
    cfg.check()
    return cfg


def _new_run_folder(cfg: TrainConfig, runs_dir, name) -> tuple[TrainConfig, Path]:
    """(settings fitted to the store, a new run folder) as the command line makes them
    (`new_run.create_run`: the store checked first, so bad data leaves no folder; a used name
    refused)."""
    if name is not None and not isinstance(name, str):
        raise PartrainError(f"name must be text, got {short_repr(name)}")
    cfg, rd = create_run(cfg, _path(runs_dir, "runs_dir"), name,
                         missing_hint=", or give data_dir=")
    return cfg, rd.path


def _path(value, key: str):
    if not isinstance(value, (str, os.PathLike)):
        raise PartrainError(f"{key} must be a path (text or pathlib.Path), got {short_repr(value)}")
    return value


# ---------------------------------------------------------------------------------- a run
@dataclass
class Run:
    """A trained run ready for inference (`load_run`): its settings, class names and model,
    bound to one checkpoint's parameters; images are normalised as the run trained on them."""

    path: Path
    config: TrainConfig
    class_names: list[str]
    model: object
    checkpoint: dict           # {"path", "epoch", "position", "best_val"} of the file bound
    data_path: Path            # the store whose statistics normalise (and that evaluate reads)
    data_sha256: str | None    # of the store the run was trained on (config.json)
    scale: np.ndarray = field(repr=False)
    shift: np.ndarray = field(repr=False)

    def predict(self, images) -> tuple:
        """(labels, probabilities): each image's most probable class (its name:
        class_names[label]) and the softmax of the model's outputs, float64 (N, classes), the
        numbers of `partrain predict`. images: uint8 pixels (N, 3, S, S) as in the store (S:
        the model's input size, 32 for CIFAR), or (N, S, S, 3) as PIL and matplotlib hold them,
        or one image of either shape (then one int label and one row of probabilities)."""
        x, single = as_images(images, tuple(self.model.input_shape))
        logits = [z for _, z, _ in batched_logits(self.model, x, np.arange(len(x)), self.scale,
                                                  self.shift)]
        probs = (softmax(np.concatenate(logits)) if logits
                 else np.empty((0, len(self.class_names))))
        labels = probs.argmax(axis=1)
        return (int(labels[0]), probs[0]) if single else (labels, probs)

    def evaluate(self, split: str = "test", tta: str = "none") -> dict:
        """`partrain evaluate`'s numbers, without its files: {"accuracy", "n", "n_correct",
        "per_class": {name: {"correct", "total", "accuracy"}}, "confusion" (rows: true class,
        columns: predicted), "class_names", "split", "checkpoint", "epoch"}, with tta (a
        `tta.MODES` name) also "accuracy_tta". split: "test", or "val": the held-out training
        images the run validated on (its history's val_acc)."""
        if tta not in MODES:
            raise PartrainError(f"tta must be one of {', '.join(MODES)}, got {short_repr(tta)}")
        images, labels = self._split(split)
        acc, preds = accuracy(self.model, images, labels, self.scale, self.shift)
        matrix = confusion_matrix(labels, preds, len(self.class_names))
        result = {"split": split, "checkpoint": self.checkpoint["path"],
                  "epoch": self.checkpoint["epoch"], "accuracy": acc, "n": int(len(labels)),
                  "n_correct": int(np.trace(matrix)), "confusion": matrix,
                  "class_names": list(self.class_names),
                  "per_class": per_class_accuracy(matrix, self.class_names)}
        if tta != "none":
            result.update(tta=tta, accuracy_tta=tta_accuracy(
                self.model, images, labels, self.scale, self.shift, tta)[1])
        return result

    def _split(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        """(images, labels) of the split, read from the store (a warning if it is not the file
        the run trained on, as `partrain evaluate` warns)."""
        if split not in ("test", "val"):
            raise PartrainError(f"split must be test or val, got {short_repr(split)}")
        data = load_store(self.data_path, splits=("test",) if split == "test" else ("train",))
        if self.data_sha256 is not None and file_sha256(self.data_path) != self.data_sha256:
            warnings.warn(f"{self.data_path} is not the file this run was trained on (its "
                          f"sha256 differs)", stacklevel=3)
        if split == "test":
            return data.test_images, data.test_labels
        val = split_train_val(len(data.train_labels), self.config.val_size, self.config.seed)[1]
        return data.train_images[val], data.train_labels[val]


def load_run(path, checkpoint: str = "best", data_dir=None) -> Run:
    """The run in folder `path` for inference: its model bound to best.h5 (the best validation
    accuracy; the last checkpoint when no epoch has finished) or, with checkpoint="last", to
    checkpoint.h5 (`RunDir.load_for_eval`). data_dir: the store whose statistics normalise the
    images [default: the file the run was trained on, named in config.json]."""
    path = Path(_path(path, "path"))
    model, config, meta = _load_checkpointed(path, checkpoint)
    store = data_path(config, None) if data_dir is None else store_file(data_dir)
    header = inspect_store(store)
    check_store_fits(header, meta, model, store, path)
    names = list(header.class_names)
    scale, shift = run_scale_shift(config, store, header)  # run_normaliser, as fit trained
    return Run(path, TrainConfig.from_dict(config), names, model, meta["checkpoint"], store,
               meta.get("data_sha256"), scale, shift)


def as_images(images, shape=IMAGE_SHAPE) -> tuple[np.ndarray, bool]:
    """(uint8 (N, *shape), whether it was one image) from any layout `Run.predict` takes.
    Only uint8 is taken: floats would be a guess (0..1, or 0..255?), and a wrong guess predicts
    quietly wrong classes."""
    try:
        x = np.asarray(images)
    except (TypeError, ValueError) as e:  # a ragged list
        raise PartrainError(f"images must be an array of uint8 pixels: {e}") from None
    if x.dtype != np.uint8:
        raise PartrainError(f"images must be uint8 pixels 0..255, got dtype {x.dtype} (floats "
                            f"in 0..1: (x * 255).round().astype(np.uint8))")
    single = x.ndim == 3
    x = x[None] if single else x
    hwc = shape[1:] + shape[:1]
    if x.ndim == 4 and x.shape[1:] == hwc:
        x = x.transpose(0, 3, 1, 2)
    if x.ndim != 4 or x.shape[1:] != shape:
        c, h, w = shape
        raise PartrainError(f"images must be (N, {c}, {h}, {w}) or (N, {h}, {w}, {c}), or one image "
                            f"({c}, {h}, {w}) or ({h}, {w}, {c}); got shape {np.shape(images)}")
    return np.ascontiguousarray(x), single

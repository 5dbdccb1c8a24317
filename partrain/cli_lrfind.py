"""`partrain lr-find`: the learning-rate range test with fit's settings (lr_find.py).

It takes fit's training settings, generated from TrainConfig as fit's are, less those the sweep
replaces or never uses (the learning rate and its schedule, the epochs, the history and the
final test): the curve is measured with the model, optimizer, batch size, workers, data and
seed that `partrain fit` would train with.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import click
from click.core import ParameterSource

from .cli_support import SETTINGS, setting_option, user_errors
from .config import TrainConfig
from .recipes import RECIPES, apply_recipe
from .errors import PartrainError
from .lr_find import Sweep, run_sweep, write_outputs
from .parallel.engine import usable_cores

# TrainConfig fields the sweep sets itself (lr) or has no use for.
NOT_SWEPT = ("lr", "schedule", "warmup_epochs", "epochs", "log_every", "tta")


def _lrfind_options(fn):
    """The sweep's own options, then fit's --recipe and settings (less NOT_SWEPT)."""
    options = [
        click.option("--start-lr", type=float, default=Sweep.start_lr, show_default=True,
                     help="Learning rate of the first step."),
        click.option("--end-lr", type=float, default=Sweep.end_lr, show_default=True,
                     help="Learning rate of the last step (the sweep is exponential)."),
        click.option("--steps", type=int, default=Sweep.steps, show_default=True,
                     help="Optimizer steps of the sweep (fewer if the loss explodes)."),
        click.option("--beta", type=float, default=Sweep.beta, show_default=True,
                     help="Smoothing of the loss: exponential moving average with bias "
                          "correction (lags about beta/(1-beta) steps)."),
        click.option("--diverge", type=float, default=Sweep.diverge, show_default=True,
                     help="Stop once the smoothed loss exceeds this many times its minimum."),
        click.option("--out", type=click.Path(path_type=Path), default=Path("lr-find"),
                     show_default=True,
                     help="Folder for lr_find.csv, lr_find.json and lr_find.png."),
        click.option("--quiet", is_flag=True, help="Print only the suggestion and the files."),
        click.option("--recipe", default=None, metavar="NAME",
                     help=f"A preset of fit's settings ({', '.join(RECIPES)}); options given "
                          "on the command line win over it."),
    ]
    options += [setting_option(f.name) for f in dataclasses.fields(TrainConfig)
                if f.metadata.get("cli", True) and f.name not in NOT_SWEPT]
    for option in reversed(options):
        fn = option(fn)
    return fn


def _settings(ctx, options: dict, recipe: str | None) -> TrainConfig:
    """fit's settings from the option values (parsed as each field's metadata says)."""
    out = {}
    for name, value in options.items():
        parse = SETTINGS[name].metadata.get("parse")
        out[name] = parse(value) if parse else value
    if out["workers"] is None:  # as fit: the usable cores
        out["workers"] = usable_cores()
    if recipe is not None:
        explicit = {k for k in out if ctx.get_parameter_source(k) == ParameterSource.COMMANDLINE}
        out = apply_recipe(recipe, {**out, "recipe": recipe}, explicit)
    cfg = TrainConfig(**out)
    cfg.check()
    return cfg


@click.command("lr-find")
@_lrfind_options
@click.pass_context
@user_errors
def lr_find(ctx, start_lr, end_lr, steps, beta, diverge, out, quiet, recipe, **options):
    """Learning-rate range test: an exponential sweep of the learning rate over a few hundred
    steps with fit's settings; writes the loss curve and suggests a learning rate.

    \b
    partrain lr-find --model three-layer --optimizer sgd --workers 2
    partrain lr-find --recipe airbench-short --start-lr 1e-4 --end-lr 100

    The suggestion is the learning rate where the smoothed loss falls fastest per decade of
    learning rate, before its minimum. No run folder is made and no parameters are kept.
    """
    sweep = Sweep(start_lr, end_lr, steps, beta, diverge)
    sweep.check()  # before the data is read
    if out.exists() and not out.is_dir():  # found before the sweep, not after it
        raise PartrainError(f"--out {out} is a file, not a folder")
    cfg = _settings(ctx, options, recipe)
    curve = run_sweep(cfg, sweep, echo=None if quiet else click.echo)
    if curve.stopped is not None and curve.interrupt is None and not quiet:
        click.echo(f"stopped early: {curve.stopped}")
    s = curve.suggestion
    if s is None:
        click.echo("no suggestion: the smoothed loss never clearly fell; try a lower --start-lr, "
                   "a higher --end-lr or more --steps")
    else:
        click.echo(f"suggested lr: {s['lr']:.3g} (steepest descent of the smoothed loss, at "
                   f"step {s['step']}; the smoothed loss is lowest at lr "
                   f"{s['lr_min_smoothed']:.3g}, a tenth of which is {s['lr_min_over_10']:.3g})")
    kept = {k: v for k, v in cfg.to_dict().items() if k not in NOT_SWEPT}
    for path in write_outputs(curve, kept, out):
        click.echo(f"wrote {path}")
    if curve.interrupt is not None:
        raise curve.interrupt

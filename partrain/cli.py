"""Command line: `partrain prepare | fit | evaluate | predict | plot | bench`.

Every command turns a PartrainError (or an OSError from the user's files) into one line on stderr
and a non-zero exit; tracebacks are for bugs only.
"""
from __future__ import annotations

import functools
import sys
from pathlib import Path

import click

from . import __version__
from .errors import PartrainError


def user_errors(fn):
    """Run a command body, reporting PartrainError as one clean line (exit 1)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except PartrainError as e:
            raise click.ClickException(str(e)) from None

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="partrain")
def main():
    """Data-parallel CNN training on CPU cores, from scratch in numpy."""


@main.command()
@click.option("--data-dir", default="data", show_default=True, type=click.Path(path_type=Path),
              help="Folder for cifar10.h5 (and the downloaded archive).")
@click.option("--source", type=click.Path(path_type=Path), default=None,
              help="Local cifar-10-binary.tar.gz or cifar-10-python.tar.gz, or an extracted "
                   "folder of either; skips the download.")
@click.option("--force", is_flag=True, help="Rebuild cifar10.h5 even if a valid one exists.")
@click.option("--url", default=None, hidden=True, help="Archive URL (tests use a local server).")
@click.option("--md5", default=None, hidden=True, help="Expected md5 of the downloaded archive.")
@user_errors
def prepare(data_dir, source, force, url, md5):
    """Download or read CIFAR-10 and write DATA_DIR/cifar10.h5 (verified, atomic)."""
    from .datasets import cifar10
    from .prepare import prepare as run_prepare

    run_prepare(data_dir, source, force, url=url or cifar10.URL, md5=md5 or cifar10.MD5,
                echo=click.echo)


def _usable_cores() -> int:
    import os
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def _model_options(pairs) -> dict:
    import json
    out = {}
    for item in pairs:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise PartrainError(f"--model-option wants KEY=VALUE, got {item!r}")
        try:
            out[key.replace("-", "_")] = json.loads(value)
        except ValueError:
            out[key.replace("-", "_")] = value
    return out


@main.command()
@click.option("--recipe", default=None, metavar="NAME",
              help="A preset of the settings below (airbench, airbench-short); options given "
                   "on the command line win over it. See --dry-run.")
@click.option("--model", default="three-layer", show_default=True,
              help="Model name: three-layer (the course model), vgg, linear, airbench.")
@click.option("--model-option", "model_option", multiple=True, metavar="KEY=VALUE",
              help="Model setting, e.g. hidden_dim=256 (repeatable).")
@click.option("--optimizer", type=click.Choice(["adam", "sgd"]), default="adam", show_default=True)
@click.option("--lr", type=float, default=1e-3, show_default=True, help="Learning rate.")
@click.option("--momentum", type=float, default=0.9, show_default=True, help="SGD momentum.")
@click.option("--nesterov", is_flag=True, help="Nesterov momentum (SGD).")
@click.option("--weight-decay", type=float, default=None,
              help="L2 regularisation strength [default: the model's own; 1e-3 for three-layer].")
@click.option("--schedule", type=click.Choice(["constant", "step", "cosine", "linear", "onecycle"]),
              default="constant", show_default=True, help="Learning-rate schedule.")
@click.option("--warmup-epochs", type=float, default=0.0, show_default=True)
@click.option("--batch-size", type=int, default=50, show_default=True,
              help="Global minibatch size (the same whatever --workers is).")
@click.option("--epochs", type=int, default=3, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--val-size", type=int, default=1000, show_default=True,
              help="Training images held out for validation.")
@click.option("--workers", type=int, default=None,
              help="Worker processes [default: usable cores]; 1 trains in this process.")
@click.option("--reduction", type=click.Choice(["sharded", "parent"]), default="sharded",
              show_default=True, help="How gradients are summed and the optimizer stepped.")
@click.option("--flip/--no-flip", default=False, show_default=True,
              help="Augment: mirror each training image every other epoch (alternating flips).")
@click.option("--translate", type=int, default=0, show_default=True, metavar="PX",
              help="Augment: shift each training image by up to PX pixels (reflect padding).")
@click.option("--freeze-after", "freeze_after", multiple=True, metavar="NAME=EPOCHS",
              help="Stop training parameter (or layer) NAME after EPOCHS epochs (repeatable).")
@click.option("--tta", type=click.Choice(["none", "flip", "flip_translate"]), default="none",
              show_default=True,
              help="Also report the final test accuracy with test-time augmentation.")
@click.option("--lookahead/--no-lookahead", default=False, show_default=True,
              help="airbench94's Lookahead: every 5 steps, pull the weights toward a slow "
                   "average (0.95^5·(t/T)^3); end on the average.")
@click.option("--data-dir", default="data", show_default=True, type=click.Path(path_type=Path),
              help="Folder holding cifar10.h5 (made by partrain prepare).")
@click.option("--runs-dir", default="runs", show_default=True, type=click.Path(path_type=Path))
@click.option("--name", default=None, help="Run folder name [default: MODEL-DATE-TIME].")
@click.option("--resume", type=click.Path(path_type=Path), default=None,
              help="Continue the run in this folder exactly where it stopped.")
@click.option("--log-every", type=int, default=20, show_default=True, help="Steps per history row.")
@click.option("--quiet", is_flag=True, help="Print only the final summary.")
@click.option("--dry-run", is_flag=True, help="Print the settings and the model's parameters "
                                               "and exit.")
@click.option("--max-steps", type=int, default=None, hidden=True,
              help="Stop (with a checkpoint) after this many steps; for tests.")
@click.pass_context
@user_errors
def fit(ctx, recipe, model, model_option, optimizer, lr, momentum, nesterov, weight_decay,
        schedule, warmup_epochs, batch_size, epochs, seed, val_size, workers, reduction, flip,
        translate, freeze_after, tta, lookahead, data_dir, runs_dir, name, resume, log_every, quiet,
        dry_run, max_steps):
    """Train a model on DATA_DIR/cifar10.h5 with N worker processes.

    \b
    partrain fit --recipe airbench            airbench94's recipe (see README, Recipes)
    partrain fit --recipe airbench --dry-run  what it sets
    """
    from click.core import ParameterSource

    from .interrupt import Interrupted
    from .train import TrainConfig, fit as run_fit, new_run_dir, read_run_config, resume_conflicts

    settings = dict(model=model, model_options=_model_options(model_option), optimizer=optimizer,
                    lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay,
                    schedule=schedule, warmup_epochs=warmup_epochs, batch_size=batch_size,
                    epochs=epochs, seed=seed, val_size=val_size,
                    workers=workers or _usable_cores(), reduction=reduction,
                    data=str(data_dir / "cifar10.h5"), log_every=log_every, recipe=recipe,
                    augment_flip=flip, augment_translate=translate,
                    freeze_after=_freeze_after(freeze_after), tta=tta, lookahead=lookahead)

    def on_command_line(key: str) -> bool:
        return ctx.get_parameter_source(_CLI_NAME.get(key, key)) == ParameterSource.COMMANDLINE

    if recipe is not None and resume is None:
        from .recipes import apply_recipe
        settings = apply_recipe(recipe, settings, {k for k in settings if on_command_line(k)})
    if dry_run:
        cfg = TrainConfig(**settings)
        cfg.check()
        _print_settings(cfg)
        _print_model(settings["model"], settings["model_options"])
        return
    if resume is not None:
        saved = TrainConfig.from_dict(read_run_config(resume)["config"])
        given = {k: v for k, v in settings.items() if on_command_line(k)}
        if workers is None:
            given.pop("workers", None)
        conflicts = resume_conflicts(saved, given)
        if conflicts:
            raise PartrainError("cannot resume exactly with changed settings: " + ", ".join(conflicts))
        cfg = TrainConfig.from_dict({**saved.to_dict(), **given})
        run = resume
    else:
        cfg = TrainConfig(**settings)
        cfg.check()
        if not Path(cfg.data).exists():
            raise PartrainError(f"{cfg.data} not found; run `partrain prepare` first")
        run = new_run_dir(runs_dir, name, cfg.model)
    try:
        summary = run_fit(cfg, run, resume=resume is not None, quiet=quiet, max_steps=max_steps)
    except Interrupted as e:
        click.echo(str(e), err=True)
        ctx.exit(130)
    if quiet:
        click.echo(" ".join(f"{k}={v}" for k, v in summary.items()))


_CLI_NAME = {"model_options": "model_option", "data": "data_dir", "augment_flip": "flip",
             "augment_translate": "translate"}


def _freeze_after(pairs) -> dict:
    out = {}
    for item in pairs:
        key, _, value = item.partition("=")
        try:
            if not key:
                raise ValueError
            out[key] = float(value)
        except ValueError:
            raise PartrainError(f"--freeze-after wants NAME=EPOCHS, got {item!r}") from None
    return out


def _print_settings(cfg) -> None:
    from .train import TrainConfig
    defaults = TrainConfig()
    click.echo("settings" + (f" (recipe {cfg.recipe})" if cfg.recipe else "") + ":")
    for key, value in cfg.to_dict().items():
        changed = "" if value == getattr(defaults, key) else "   *"
        click.echo(f"  {key:<18} {value!r}{changed}")
    click.echo("  (* differs from the default)")


_RUN = click.argument("run", type=click.Path(path_type=Path))
_DATA_DIR = click.option("--data-dir", type=click.Path(path_type=Path), default=None,
                         help="Folder holding cifar10.h5 [default: the file the run was trained on].")
_CHECKPOINT = click.option("--checkpoint", type=click.Choice(["best", "last"]), default="best",
                           show_default=True,
                           help="best.h5 (best validation accuracy) or checkpoint.h5 (latest).")


@main.command()
@click.argument("runs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="Folder for the figures [default: the run folder; for several runs, "
                   "compare/ beside the first].")
@click.option("--pdf", is_flag=True, help="Also write PDF versions.")
@user_errors
def plot(runs, out, pdf):
    """Training loss per iteration and accuracy per epoch of one run, or several overlaid."""
    from .plots import plot_runs
    from .train import HISTORY_FILE, read_run_config

    for run in runs:
        read_run_config(run)
        if not (run / HISTORY_FILE).is_file():
            raise PartrainError(f"{run} has no {HISTORY_FILE} yet (no step logged)")
    if out is None:
        out = runs[0] if len(runs) == 1 else runs[0].parent / "compare"
    for path in plot_runs(runs, out, pdf=pdf):
        click.echo(f"wrote {path}")


@main.command()
@_RUN
@_DATA_DIR
@_CHECKPOINT
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="Folder for confusion.png and evaluation.json [default: the run folder].")
@click.option("--tta", type=click.Choice(["none", "flip", "flip_translate"]), default="none",
              show_default=True,
              help="Also the test accuracy with test-time augmentation (one pass per view).")
@user_errors
def evaluate(run, data_dir, checkpoint, out, tta):
    """Test accuracy, accuracy per class and a confusion-matrix PNG of a run."""
    from .evaluate import evaluate_run, format_report

    result = evaluate_run(run, data_dir=data_dir, checkpoint=checkpoint, out_dir=out,
                          warn=lambda text: click.echo(text, err=True), tta=tta)
    click.echo("\n".join(format_report(result)))


@main.command()
@_RUN
@click.argument("inputs", nargs=-1, metavar="IMAGE...")
@click.option("--test-index", is_flag=True,
              help="The arguments are indices into the test set, not image files (needs no Pillow).")
@click.option("--top", type=click.IntRange(1, 10), default=3, show_default=True,
              help="How many classes to show.")
@_DATA_DIR
@_CHECKPOINT
@user_errors
def predict(run, inputs, test_index, top, data_dir, checkpoint):
    """Top classes with probabilities for PNG/JPEG files, or test images by index.

    \b
    partrain predict runs/NAME cat.png dog.jpg
    partrain predict runs/NAME --test-index 0 5 9
    """
    from .predict import format_predictions, predict_run

    out = predict_run(run, inputs, test_index=test_index, data_dir=data_dir,
                      checkpoint=checkpoint, top=top)
    click.echo("\n".join(format_predictions(out)))


def _print_model(name: str, options: dict) -> None:
    from .nn.models import build_model

    try:
        m = build_model(name, **options)
    except (ValueError, TypeError) as e:
        raise PartrainError(str(e)) from None
    click.echo(f"model {name}: {m.layout.size:,} parameters")
    if m.options:
        import textwrap
        click.echo(textwrap.fill(", ".join(f"{k}={v!r}" for k, v in m.options.items()), 98,
                                 initial_indent="  options: ", subsequent_indent="    "))
    click.echo(f"  {'parameter':<20} {'shape':<20} {'size':>12}  decay  lr scale")
    for spec in m.layout.specs:
        click.echo(f"  {spec.name:<20} {str(spec.shape):<20} {spec.size:>12,}  "
                   f"{'yes' if spec.decay else 'no':<5}  {spec.lr_scale:g}")
    f = m.flops_per_image()
    click.echo(f"forward {f['forward'] / 1e6:.1f} MFLOP/image, training {f['train'] / 1e6:.1f} MFLOP/image")



def _int_list(text: str | None, what: str) -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise PartrainError(f"{what} wants comma-separated integers, got {text!r}") from None


@main.command()
@click.option("--workers", default=None, metavar="N,N,...",
              help="Worker counts to measure [default: 1, 2, 4, ... up to the usable cores].")
@click.option("--batch-size", "batch_sizes", default="50,200", show_default=True,
              metavar="B,B,...", help="Global batch sizes to measure.")
@click.option("--reduction", type=click.Choice(["both", "sharded", "parent"]), default="both",
              show_default=True, help="Which reductions to measure.")
@click.option("--model", default="three-layer", show_default=True, help="Model name.")
@click.option("--model-option", "model_option", multiple=True, metavar="KEY=VALUE",
              help="Model setting, e.g. hidden_dim=256 (repeatable).")
@click.option("--optimizer", type=click.Choice(["adam", "sgd"]), default="adam", show_default=True)
@click.option("--steps", type=int, default=30, show_default=True, help="Timed steps per point.")
@click.option("--warmup", type=int, default=5, show_default=True,
              help="Untimed steps before each point.")
@click.option("--data-dir", default="data", show_default=True, type=click.Path(path_type=Path),
              help="Folder holding cifar10.h5; random images are used if it has none.")
@click.option("--synthetic", type=int, default=None, metavar="N",
              help="Use N random images instead of the data set.")
@click.option("--out-dir", default="bench-out", show_default=True,
              type=click.Path(path_type=Path), help="Where scaling.csv/.json/.png go.")
@click.option("--kernels", is_flag=True,
              help="Instead: time one training step in this process on one BLAS thread "
                   "(forward, backward, optimizer) against the machine's GEMM rate.")
@click.option("--layers", is_flag=True, help="With --kernels: also time every layer.")
@user_errors
def bench(workers, batch_sizes, reduction, model, model_option, optimizer, steps, warmup,
          data_dir, synthetic, out_dir, kernels, layers):
    """Scaling benchmark: images/s, speed-up and efficiency against the number of workers."""
    from .bench import BenchConfig, format_table, run_scaling, write_results

    if kernels:
        import json

        from .bench_kernels import run_kernel_bench
        res = run_kernel_bench(model, tuple(_int_list(batch_sizes, "--batch-size")), steps,
                               per_layer=layers, echo=click.echo,
                               model_options=_model_options(model_option), optimizer=optimizer)
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "kernels.json").write_text(json.dumps(res, indent=2) + "\n")
        click.echo(f"wrote {out_dir / 'kernels.json'}")
        return
    store = data_dir / "cifar10.h5"
    cfg = BenchConfig(model=model, model_options=_model_options(model_option),
                      optimizer=optimizer, workers=_int_list(workers, "--workers"),
                      batches=_int_list(batch_sizes, "--batch-size"),
                      reductions=["sharded", "parent"] if reduction == "both" else [reduction],
                      steps=steps, warmup=warmup,
                      data=None if synthetic or not store.exists() else str(store),
                      synthetic=synthetic or 10000)
    rows, meta = run_scaling(cfg, echo=click.echo)
    click.echo(format_table(rows))
    for path in write_results(rows, meta, out_dir):
        click.echo(f"wrote {path}")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

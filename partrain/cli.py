"""Command line: `partrain prepare | fit | evaluate | predict | plot | bench | runs | report |
export | lr-find`.

Every command turns a PartrainError, an OSError (the user's files, a full disk, a read-only
folder) or a MemoryError into one line on stderr and exit 1, and a Ctrl-C or SIGTERM into one line
and 130 / 143 (`user_errors` in cli_support.py, the one error boundary); tracebacks are for bugs
only. Commands that live in their own module (cli_bench.py, ...) are added to `main` at the end.
"""
from __future__ import annotations

import dataclasses
import sys
import textwrap
from pathlib import Path

import click
from click.core import ParameterSource

from . import __version__, cli_bench
from . import cli_runs
from . import cli_export
from . import cli_lrfind
from .cli_support import CHECKPOINT, DATA_DIR, RUN, SETTINGS, setting_option, user_errors
from .config import TrainConfig
from .recipes import RECIPES, apply_recipe
from .datasets import cifar10
from .errors import PartrainError
from .evaluate import evaluate_run, format_report
from .interrupt import Interrupted
from .nn.models import build_model
from .parallel.engine import usable_cores
from .predict import format_predictions, predict_run
from .prepare import prepare as run_prepare
from .config_file import merge, read_config_file
from .new_run import create_run
from .rundir import RunDir
from .train import fit as run_fit


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="partrain")
def main():
    """Data-parallel CNN training on CPU cores, from scratch in numpy."""


@main.command()
@click.option("--data-dir", default="data", show_default=True, type=click.Path(path_type=Path),
              help="Folder for the store, cifar10.h5 (and the downloaded archive).")
@click.option("--source", type=click.Path(path_type=Path), default=None,
              help="Local cifar-10-binary.tar.gz, cifar-10-python.tar.gz or "
                   "cifar-100-python.tar.gz, or an extracted folder of one; skips the download.")
@click.option("--labels", type=click.Choice(["fine", "coarse"]), default="fine",
              show_default=True, help="CIFAR-100: its 100 fine classes or 20 coarse ones.")
@click.option("--images", type=click.Path(path_type=Path), default=None, metavar="DIR",
              help="Instead: your images, one subfolder per class (PNG, JPEG, ...; needs Pillow).")
@click.option("--csv", type=click.Path(path_type=Path), default=None, metavar="FILE",
              help="Instead: a CSV or TSV of path,label rows (paths relative to the file).")
@click.option("--images-test", type=click.Path(path_type=Path), default=None, metavar="DIR",
              help="Test images, laid out as --images [default: hold out --test-fraction].")
@click.option("--csv-test", type=click.Path(path_type=Path), default=None, metavar="FILE",
              help="Test images, listed as --csv.")
@click.option("--test-fraction", type=float, default=None, metavar="F",
              help="Hold out this fraction of each class for test, chosen with --seed "
                   "[default: 0.2].")
@click.option("--size", type=int, default=32, show_default=True, metavar="N",
              help="Images are centre-cropped to square and resized to N x N.")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seed of the held-out test split.")
@click.option("--skip-bad", is_flag=True,
              help="Leave out images that cannot be decoded (listed at the end) instead of "
                   "stopping.")
@click.option("--quiet", is_flag=True, help="No progress bar or lines while images are decoded.")
@click.option("--force", is_flag=True, help="Rebuild the store even if a valid one exists.")
@click.option("--url", default=None, hidden=True, help="Archive URL (tests use a local server).")
@click.option("--md5", default=None, hidden=True, help="Expected md5 of the downloaded archive.")
@user_errors
def prepare(data_dir, source, labels, images, csv, images_test, csv_test, test_fraction, size,
            seed, skip_bad, quiet, force, url, md5):
    """Write DATA_DIR/cifar10.h5 (verified, atomic): CIFAR-10 (downloaded, or --source),
    CIFAR-100 (--source), or your own images (--images DIR or --csv FILE).

    \b
    partrain prepare                                   # CIFAR-10, downloaded
    partrain prepare --source cifar-100-python.tar.gz --data-dir data/c100
    partrain prepare --images photos/ --size 64 --data-dir data/photos
    """
    own = (images, csv, images_test, csv_test, test_fraction)
    if any(v is not None for v in own):
        if source is not None:
            raise PartrainError("--source reads CIFAR; --images/--csv read your own images: "
                                "give one of them")
        if labels != "fine":
            raise PartrainError("--labels goes with a CIFAR-100 --source, not with --images/--csv")
        from .prepare_images import prepare_images
        prepare_images(data_dir, images, csv, images_test, csv_test, test_fraction, size, seed,
                       skip_bad, force, quiet, echo=click.echo,
                       warn=lambda text: click.echo(text, err=True))
        return
    given = click.get_current_context().get_parameter_source
    extra = [f"--{n.replace('_', '-')}" for n in ("size", "seed", "skip_bad")
             if given(n) != ParameterSource.DEFAULT]
    if extra:
        raise PartrainError(f"{', '.join(extra)} go with --images or --csv")
    run_prepare(data_dir, source, force, url=url or cifar10.URL, md5=md5 or cifar10.MD5,
                echo=click.echo, labels=labels, progress=not quiet)


def _settings(options: dict) -> dict:
    """TrainConfig fields from fit's option values, each parsed as its field's metadata says."""
    out = {}
    for name, value in options.items():
        parse = SETTINGS[name].metadata.get("parse")
        out[name] = parse(value) if parse else value
    if out["workers"] is None:  # a default that depends on the machine (0 is an error)
        out["workers"] = usable_cores()
    return out


def _finite(ctx, param, value):
    """click's FloatRange lets NaN through (every comparison with it is false)."""
    if value is not None and value != value:
        raise click.BadParameter("must be a number, not nan")
    return value


def _fit_options(fn):
    """fit's options in their --help order: --recipe, the settings, the run folder, the output.

    The settings are generated from TrainConfig; the rest are not settings of a run."""
    grouped = ("data", "log_every")  # listed beside the run folder and the output options
    options = [click.option("--recipe", default=None, metavar="NAME",
                            help=f"A preset of the settings below ({', '.join(RECIPES)}); options "
                                 "given on the command line win over it. See --dry-run."),
               click.option("--config", "config_file", default=None, metavar="FILE",
                            type=click.Path(path_type=Path),
                            help="Settings from a TOML file (the keys of these options) or a "
                                 "run's config.json (to run it again); options given win.")]
    options += [setting_option(f.name) for f in dataclasses.fields(TrainConfig)
                if f.metadata.get("cli", True) and f.name not in grouped]
    options += [
        setting_option("data"),
        click.option("--runs-dir", default="runs", show_default=True,
                     type=click.Path(path_type=Path)),
        click.option("--name", default=None, help="Run folder name [default: MODEL-DATE-TIME]."),
        click.option("--resume", type=click.Path(path_type=Path), default=None,
                     help="Continue the run in this folder exactly where it stopped."),
        setting_option("log_every"),
        click.option("--quiet", is_flag=True, help="Print only the final summary."),
        click.option("--dry-run", is_flag=True,
                     help="Print the settings and the model's parameters and exit."),
        click.option("--max-steps", type=int, default=None, hidden=True,
                     help="Stop (with a checkpoint) after this many steps; for tests."),
        click.option("--backend", type=click.Choice(["local", "mpi"]), default="local",
                     show_default=True,
                     help="mpi: one rank per machine, under mpiexec/mpirun/srun (README, Many "
                          "machines); each rank trains with its own --workers."),
        click.option("--step-timeout", type=click.FloatRange(min=0, min_open=True, max=1e9),
                     callback=_finite,
                     default=None, metavar="SECONDS",
                     help="End the run when a worker (or, with --backend mpi, a rank) "
                          "finishes no step for this long [default: local, max(300 s, 10 "
                          "slowest steps); mpi, max(120 s, 20 median steps)]."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


@main.command()
@_fit_options
@click.pass_context
@user_errors
def fit(ctx, config_file, runs_dir, name, resume, quiet, dry_run, max_steps, backend,
        step_timeout, **options):
    """Train a model on DATA_DIR/cifar10.h5 with N worker processes.

    \b
    partrain fit --recipe airbench            airbench94's recipe (see README, Recipes)
    partrain fit --recipe airbench --dry-run  what it sets
    mpiexec -n 2 partrain fit --backend mpi --workers 8   two machines, 8 workers each
    """
    settings = _settings(options)
    explicit = {k for k in settings
                if ctx.get_parameter_source(k) == ParameterSource.COMMANDLINE}
    if config_file is not None:
        if resume is not None:
            raise PartrainError("--config starts a new run; --resume continues one with the "
                                "settings in its own config.json")
        from_file = read_config_file(config_file)
        settings, explicit = merge(settings, explicit, from_file)
        given = ctx.get_parameter_source
        runs_dir = Path(from_file.get("runs_dir", runs_dir)) if given(
            "runs_dir") == ParameterSource.DEFAULT else runs_dir
        name = from_file.get("name", name) if name is None else name
    if settings["recipe"] is not None and resume is None:
        settings = apply_recipe(settings["recipe"], settings, explicit)
    if dry_run:
        cfg = TrainConfig(**settings)
        cfg.check()
        _print_settings(cfg)
        _print_model(cfg.model, cfg.model_options)
        return
    if backend == "local":
        cfg, run = _run_to_train(settings, explicit, resume, runs_dir, name)
        summary = _fit_until_stopped(ctx, cfg, run, resume, quiet, max_steps,
                                     step_timeout=step_timeout)
    else:
        summary = _fit_on_ranks(ctx, settings, explicit, resume, runs_dir, name, quiet, max_steps,
                                step_timeout)
    if quiet and summary is not None:
        click.echo(" ".join(f"{k}={v}" for k, v in summary.items()))


def _run_to_train(settings, explicit, resume, runs_dir, name) -> tuple[TrainConfig, Path]:
    """The settings and the run folder: a resumed one's (exactness checked), or a new one."""
    if resume is not None:
        return RunDir.open(resume).resume_config({k: settings[k] for k in explicit}), resume
    cfg = TrainConfig(**settings)
    cfg.check()  # settings and model options: before anything is created
    cfg, rd = create_run(cfg, runs_dir, name)
    return cfg, rd.path


def _fit_until_stopped(ctx, cfg, run, resume, quiet, max_steps, cross=None, step_timeout=None):
    """fit; a stop asked by a signal is its one line and exit code 130 / 143."""
    try:
        return run_fit(cfg, run, resume=resume is not None, quiet=quiet, max_steps=max_steps,
                       cross=cross, step_timeout=step_timeout)
    except Interrupted as e:
        if cross is not None and e.at_once:
            raise  # this rank alone stops now: the others must be aborted
        if cross is None or cross.rank == 0:
            click.echo(str(e), err=True)
        ctx.exit(e.exit_code)


def _fit_on_ranks(ctx, settings, explicit, resume, runs_dir, name, quiet, max_steps,
                  step_timeout):
    """fit under MPI: rank 0 resolves the run folder and tells the others; any exception on any
    rank ends the whole job (`mpi.job`) instead of hanging it."""
    from .parallel import mpi
    with mpi.job(step_timeout, clean_exits=(click.exceptions.Exit,)) as cross:
        job = _run_to_train(settings, explicit, resume, runs_dir, name) if cross.rank == 0 else None
        cfg_dict, run = cross.bcast(None if job is None else (job[0].to_dict(), str(job[1])))
        summary = _fit_until_stopped(ctx, TrainConfig.from_dict(cfg_dict), Path(run), resume,
                                     quiet, max_steps, cross, step_timeout)
    return summary if cross.rank == 0 else None


def _print_settings(cfg: TrainConfig) -> None:
    changed = cfg.changes()
    click.echo("settings" + (f" (recipe {cfg.recipe})" if cfg.recipe else "") + ":")
    for key, value in cfg.to_dict().items():
        click.echo(f"  {key:<18} {value!r}" + ("   *" if key in changed else ""))
    click.echo("  (* differs from the default)")


@main.command()
@click.argument("runs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="Folder for the figures [default: the run folder; for several runs, "
                   "compare/ beside the first].")
@click.option("--pdf", is_flag=True, help="Also write PDF versions.")
@click.option("--filters", is_flag=True, help="Instead: the first conv's filters (filters.png).")
@click.option("--features", type=click.Path(path_type=Path), metavar="IMAGE",
              help="Instead: the first layers' feature maps for IMAGE (features.png).")
@DATA_DIR
@CHECKPOINT
@user_errors
def plot(runs, out, pdf, filters, features, data_dir, checkpoint):
    """Training loss per iteration and accuracy per epoch of one run, or several overlaid; with
    --filters or --features IMAGE (or both), what the first layers of one run learned."""
    from .plots import plot_runs
    from .plots_filters import plot_first_layers

    given = click.get_current_context().get_parameter_source("checkpoint")
    if filters or features:
        paths = plot_first_layers(runs, out, filters, features, data_dir, checkpoint, pdf)
    elif data_dir or given != ParameterSource.DEFAULT:
        raise PartrainError("--data-dir and --checkpoint go with --filters or --features")
    else:
        for run in runs:
            RunDir.open(run)  # a readable run folder; plot_runs reads every history before drawing
        paths = plot_runs(runs, out or (runs[0] if len(runs) == 1 else runs[0].parent / "compare"),
                          pdf=pdf)
    for path in paths:
        click.echo(f"wrote {path}")


@main.command()
@RUN
@DATA_DIR
@CHECKPOINT
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="Folder for confusion.png and evaluation.json [default: the run folder].")
@click.option("--tta", type=click.Choice(["none", "flip", "flip_translate"]), default="none",
              show_default=True,
              help="Also the test accuracy with test-time augmentation (one pass per view).")
@click.option("--quiet", is_flag=True, help="No progress bar or lines during the test pass.")
@user_errors
def evaluate(run, data_dir, checkpoint, out, tta, quiet):
    """Test accuracy, accuracy per class and a confusion-matrix PNG of a run."""

    result = evaluate_run(run, data_dir=data_dir, checkpoint=checkpoint, out_dir=out,
                          warn=lambda text: click.echo(text, err=True), tta=tta, quiet=quiet)
    click.echo("\n".join(format_report(result)))


@main.command()
@RUN
@click.argument("inputs", nargs=-1, metavar="IMAGE...")
@click.option("--test-index", is_flag=True,
              help="The arguments are indices into the test set, not image files (needs no Pillow).")
@click.option("--top", type=click.IntRange(1, 10), default=3, show_default=True,
              help="How many classes to show.")
@click.option("--quiet", is_flag=True, help="No progress bar or lines while images are read.")
@DATA_DIR
@CHECKPOINT
@user_errors
def predict(run, inputs, test_index, top, quiet, data_dir, checkpoint):
    """Top classes with probabilities for PNG/JPEG files, or test images by index.

    \b
    partrain predict runs/NAME cat.png dog.jpg
    partrain predict runs/NAME --test-index 0 5 9
    """

    out = predict_run(run, inputs, test_index=test_index, data_dir=data_dir,
                      checkpoint=checkpoint, top=top, quiet=quiet)
    click.echo("\n".join(format_predictions(out)))


def _decay_text(spec) -> str:
    """'no', 'yes', or the fraction of the weight decay a tensor gets (1/64: airbench's BN biases)."""
    if not spec.decay:
        return "no"
    if spec.decay_scale == 1:
        return "yes"
    inv = 1 / spec.decay_scale if spec.decay_scale else 0.0
    return f"1/{inv:g}" if inv > 1 and inv == round(inv) else f"{spec.decay_scale:g}"


def _print_model(name: str, options: dict) -> None:

    try:
        m = build_model(name, **options)
    except (ValueError, TypeError) as e:
        raise PartrainError(str(e)) from None
    click.echo(f"model {name}: {m.layout.size:,} parameters")
    if m.options:
        click.echo(textwrap.fill(", ".join(f"{k}={v!r}" for k, v in m.options.items()), 98,
                                 initial_indent="  options: ", subsequent_indent="    "))
    click.echo(f"  {'parameter':<20} {'shape':<20} {'size':>12}  decay  lr scale")
    for spec in m.layout.specs:
        click.echo(f"  {spec.name:<20} {str(spec.shape):<20} {spec.size:>12,}  "
                   f"{_decay_text(spec):<5}  {spec.lr_scale:g}")
    f = m.flops_per_image()
    click.echo(f"forward {f['forward'] / 1e6:.1f} MFLOP/image, training {f['train'] / 1e6:.1f} MFLOP/image")



main.add_command(cli_bench.bench)
main.add_command(cli_runs.runs)
main.add_command(cli_runs.report)
main.add_command(cli_export.export)
main.add_command(cli_lrfind.lr_find)
# Commands of other modules are added here, one line each.


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

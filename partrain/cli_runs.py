"""`partrain runs` (every run folder in a table, runs_table.py) and `partrain report` (a static
HTML page of a run or a comparison of several, report.py)."""
from __future__ import annotations

import json
from pathlib import Path

import click

from .cli_support import user_errors
from .runs_table import SORTS, format_table, list_runs


@click.command()
@click.argument("runs_dir", default="runs", required=False, metavar="[RUNS_DIR]",
                type=click.Path(path_type=Path))
@click.option("--sort", type=click.Choice(SORTS), default="time", show_default=True,
              help="time: oldest start first; name; best, test: highest validation or test "
                   "accuracy first.")
@click.option("--json", "as_json", is_flag=True,
              help="A JSON list of one object per run (the same keys for every run) instead.")
@user_errors
def runs(runs_dir, sort, as_json):
    """Every run folder in RUNS_DIR [default: runs]: status, epochs, accuracies, time, and the
    command that continues an interrupted run.

    \b
    status: finished | interrupted at epoch E step S (resumable) | failed | running |
            unreadable (a damaged file; the reason is shown)
    """
    rows = list_runs(runs_dir, sort)
    if as_json:
        click.echo(json.dumps(rows, indent=2))
    elif not rows:
        click.echo(f"no runs in {runs_dir}")
    else:
        click.echo("\n".join(format_table(rows)))


@click.command()
@click.argument("runs", nargs=-1, required=True, metavar="RUN...", type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(path_type=Path), default=None, metavar="DIR",
              help="Write DIR/report.html [default: RUN/report.html; for several runs, "
                   "compare.html beside the first].")
@click.option("--no-evaluate", is_flag=True,
              help="Without evaluation.json, leave the confusion matrix out instead of a test "
                   "pass.")
@user_errors
def report(runs, out, no_evaluate):
    """One self-contained HTML page of a run (summary, curves, confusion matrix, filters,
    settings), or of several compared (curves overlaid, the settings that differ).

    \b
    partrain report runs/NAME               runs/NAME/report.html
    partrain report runs/A runs/B           runs/compare.html
    """
    from .report import write_comparison, write_report  # matplotlib: only for this command
    if len(runs) == 1:
        path = write_report(runs[0], out, evaluate=not no_evaluate,
                            warn=lambda text: click.echo(text, err=True))
    else:
        path = write_comparison(runs, out)
    click.echo(f"wrote {path}")

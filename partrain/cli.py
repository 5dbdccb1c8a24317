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


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

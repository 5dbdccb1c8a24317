"""Command line: `partrain prepare | fit | evaluate | predict | plot | bench`.

Every command turns a PartrainError (or an OSError from the user's files) into one line on stderr
and a non-zero exit; tracebacks are for bugs only.
"""
from __future__ import annotations

import functools
import sys

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


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

"""What every `partrain` command shares: the one error boundary (`user_errors`) and the options
that several commands take. Command modules import this, never `cli` (run as `python -m
partrain.cli`, that module is `__main__`: a second import of it would make a second group)."""
from __future__ import annotations

import dataclasses
import functools
import sys
from pathlib import Path

import click

from .config import TrainConfig, flag_spelling
from .errors import PartrainError
from .interrupt import Interrupted


MAX_MESSAGE = 600  # characters of one error line; the rest of an echoed input is cut


def user_errors(fn):
    """Run a command body: every expected exception becomes one line (see the module doc)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except PartrainError as e:
            raise click.ClickException(one_line(str(e))) from None
        except OSError as e:
            where = f": {e.filename}" if e.filename else ""
            raise click.ClickException(one_line(f"{e.strerror or e}{where}")) from None
        except MemoryError:
            raise click.ClickException("out of memory; use a smaller --batch-size, fewer "
                                       "--workers, or a machine with more memory") from None
        except KeyboardInterrupt as e:  # click would say "Aborted!" and exit 1
            click.echo(one_line(str(e)) if isinstance(e, Interrupted) else "interrupted",
                       err=True)
            sys.exit(e.exit_code if isinstance(e, Interrupted) else 130)

    return wrapper


def one_line(text: str) -> str:
    """The message on one line of at most MAX_MESSAGE characters."""
    text = " ".join(text.split())
    return text if len(text) <= MAX_MESSAGE else text[:MAX_MESSAGE - 25] + " ... (message cut)"


RUN = click.argument("run", type=click.Path(path_type=Path))
DATA_DIR = click.option("--data-dir", type=click.Path(path_type=Path), default=None,
                         help="Folder holding cifar10.h5 [default: the file the run was trained on].")
CHECKPOINT = click.option("--checkpoint", type=click.Choice(["best", "last"]), default="best",
                           show_default=True,
                           help="best.h5 (best validation accuracy) or checkpoint.h5 (latest).")


SETTINGS = {f.name: f for f in dataclasses.fields(TrainConfig)}


def setting_option(name: str, **override):
    """The click option of TrainConfig field `name`, made from the field's metadata (`override`
    replaces some of it). The parameter is named as the field, so values need no renaming."""
    f = SETTINGS[name]
    meta = {**f.metadata, **override}
    kw = dict(help=meta["help"], metavar=meta.get("metavar"))
    if meta.get("multiple"):
        kw["multiple"] = True
    else:
        kind = meta.get("type", type(f.default))
        kw.update(default=meta.get("cli_default", f.default),
                  show_default="[default:" not in (meta["help"] or ""),  # unless it says its own
                  is_flag=kind is bool)
        if "choices" in meta:
            kw["type"] = click.Choice(meta["choices"])
        elif not kw["is_flag"]:
            kw["type"] = click.Path(path_type=Path) if kind is Path else kind
    return click.option(flag_spelling(f), name, **kw)

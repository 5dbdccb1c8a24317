"""`partrain fit --config FILE`: settings from a TOML file, or a past run's config.json (to run
it again), with the command line's options winning over the file's.

A TOML file takes the keys of `partrain fit`'s options, spelt as the settings (`batch_size`) or
as the flags without dashes (`batch-size`): every TrainConfig field, plus `recipe`, `data_dir`
(the folder, as --data-dir; `data` is the store file itself, as config.json holds it),
`runs_dir` and `name`. Tables give the dict settings:

    model = "three-layer"
    epochs = 10
    batch_size = 256
    recipe = "airbench-short"      # applied under everything else, as on the command line
    data_dir = "data"

    [model_options]
    hidden_dim = 256

A config.json (`{"config": {...}, "partrain_version": ...}`, what every run folder holds) gives
its settings; a new run folder is made for them (`--name`), the old one is never touched.
Unknown keys and values of the wrong type are one line naming the file and the key; the values
are then checked like the command line's (`TrainConfig.check`).
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import sys
from pathlib import Path

from .config import TrainConfig, _check_type, short_repr
from .datasets.store import FILENAME
from .errors import PartrainError

FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
EXTRA = {"data_dir": str, "runs_dir": str, "name": str}  # fit's options that are not settings


def read_config_file(path) -> dict:
    """{key: value} of FILE: TrainConfig field names (and runs_dir, name), types checked."""
    path = Path(path)
    if not path.is_file():
        raise PartrainError(f"--config {path}: " + ("no such file" if not path.exists()
                                                     else "not a file"))
    raw = _read_json(path) if path.suffix.lower() == ".json" else _read_toml(path)
    out = {}
    for key, value in raw.items():
        name = key.replace("-", "_") if isinstance(key, str) else key
        if name not in FIELDS and name not in EXTRA:
            known = sorted(set(FIELDS) | set(EXTRA))
            close = difflib.get_close_matches(str(name), known, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f" (the keys: {', '.join(known)})"
            raise PartrainError(f"{path}: unknown key {short_repr(key)}{hint}")
        if name in out:
            raise PartrainError(f"{path}: key {name!r} is given twice")
        if name in EXTRA:
            if value is not None and not isinstance(value, EXTRA[name]):
                raise PartrainError(f"{path}: key {key!r} must be text, got {short_repr(value)}")
        else:
            _check_type(FIELDS[name], value, f"{path}: key {key!r}")
        out[name] = value
    if "data_dir" in out:
        if "data" in out:
            raise PartrainError(f"{path}: give data_dir (the folder) or data (the file), not both")
        out["data"] = str(Path(out.pop("data_dir")) / FILENAME)
    return out


def _read_toml(path: Path) -> dict:
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - Python 3.10
        import tomli as tomllib
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise PartrainError(f"{path} is not valid TOML: {e}") from None
    except UnicodeDecodeError:
        raise PartrainError(f"{path} is not a text (UTF-8) file") from None


def _read_json(path: Path) -> dict:
    """A run's config.json: its "config"; a plain JSON object of settings also does."""
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PartrainError(f"{path} is not valid JSON: {short_repr(str(e))}") from None
    if isinstance(d, dict) and isinstance(d.get("config"), dict) and "partrain_version" in d:
        d = d["config"]
    if not isinstance(d, dict):
        raise PartrainError(f"{path}: expected an object of settings, got {short_repr(d)}")
    return d


def merge(settings: dict, explicit: set[str], from_file: dict) -> tuple[dict, set[str]]:
    """(settings, the keys that are not defaults): the file's values where the command line gave
    none (`explicit`: the options given); both win over a recipe, applied after this."""
    out = dict(settings)
    for key, value in from_file.items():
        if key in FIELDS and key not in explicit:
            out[key] = value
    return out, explicit | {k for k in from_file if k in FIELDS}

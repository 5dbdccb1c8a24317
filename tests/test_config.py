"""The configuration declared once: each TrainConfig field is one option of `partrain fit`, with
the field's default and the code's own choices; recipes are valid settings; every optimizer and
schedule the code has can be chosen and trains."""
from __future__ import annotations

import dataclasses
import json

import click
import numpy as np
import pytest
from click.testing import CliRunner

from partrain import cli
from partrain.checkpoint import load_checkpoint
from partrain.config import TrainConfig, flag_spelling, parse_freeze_after, parse_model_options
from partrain.recipes import RECIPES, apply_recipe, optimizer_spec
from partrain.errors import PartrainError
from partrain.nn.models import build_model
from partrain.optim import OPTIMIZERS, SCHEDULES, Adam
from partrain.parallel.engine import usable_cores
from partrain.parallel.reduce import REDUCTIONS
from partrain.optim import make_optimizer
from partrain.train import fit
from partrain.tta import MODES

FIELDS = dataclasses.fields(TrainConfig)
# Fields with no option of fit, and why. (None today: keep the reason when adding one.)
NOT_EXPOSED: dict[str, str] = {}
# Fields whose option's default is not the field's, and why.
OWN_CLI_DEFAULT = {"workers": "the usable cores of this machine; the field's 1 is for library use"}


def _default(f):
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


def _options(command) -> dict:
    return {p.name: p for p in command.params if isinstance(p, click.Option)}


@pytest.mark.parametrize("f", FIELDS, ids=lambda f: f.name)
def test_every_field_is_one_fit_option_with_its_default_and_choices(f):
    if f.name in NOT_EXPOSED:
        assert not [p for p in cli.fit.params if p.name == f.name]
        return
    [option] = [p for p in cli.fit.params if p.name == f.name]
    assert option.opts[0] == flag_spelling(f).split("/")[0]
    ctx = cli.fit.make_context("fit", [])  # every option at its default, nothing run
    value = ctx.params[f.name]
    parse = f.metadata.get("parse")
    value = parse(value) if parse else value
    if f.name in OWN_CLI_DEFAULT:
        assert value is None
    else:
        assert value == _default(f) and type(value) is type(_default(f))
    choices = f.metadata.get("choices")
    if choices is None:
        assert not isinstance(option.type, click.Choice)
    else:
        assert tuple(option.type.choices) == tuple(choices)


def test_choices_are_the_codes_own():
    meta = {f.name: f.metadata for f in FIELDS}
    assert meta["optimizer"]["choices"] == OPTIMIZERS and "adamw" in OPTIMIZERS
    assert meta["schedule"]["choices"] == SCHEDULES and "triangular" in SCHEDULES
    assert meta["tta"]["choices"] == MODES
    assert meta["reduction"]["choices"] == tuple(REDUCTIONS)
    bench = _options(cli.main.commands["bench"])
    assert tuple(bench["optimizer"].type.choices) == OPTIMIZERS
    assert bench["model"].default == TrainConfig.model
    assert set(TrainConfig.FREE_ON_RESUME) <= {f.name for f in FIELDS}


def test_cli_defaults_are_the_config_defaults():
    """No option given: every setting the default, but --workers (the usable cores)."""
    res = CliRunner().invoke(cli.main, ["fit", "--dry-run"])
    assert res.exit_code == 0, res.output
    marked = [line.split()[0] for line in res.output.splitlines() if line.endswith("   *")]
    assert marked == ([] if usable_cores() == 1 else ["workers"])


@pytest.mark.parametrize("settings, message", [
    (dict(schedule="nope"), "--schedule must be one of constant, step"),
    (dict(optimizer="lamb"), "--optimizer must be one of adam, adamw, sgd"),
    (dict(reduction="tree"), "--reduction must be one of sharded, parent"),
    (dict(tta="all"), "--tta must be one of none, flip, flip_translate"),
    (dict(augment_translate=1.5), "--translate must be a whole number"),
    (dict(val_size=-1), "--val-size must be at least 0"),
    (dict(epochs=0), "--epochs must be at least 1"),
    (dict(workers=4, batch_size=2), "--workers 4 exceeds --batch-size 2"),
    (dict(model="nope"), "unknown model 'nope'"),
    (dict(recipe="nope"), "unknown recipe 'nope'"),
    (dict(freeze_after={"conv1": -1}), "--freeze-after conv1=-1"),
])
def test_check_names_the_option(settings, message):
    with pytest.raises(PartrainError, match=message):
        TrainConfig(**settings).check()


def test_pair_options_parse_and_fail_cleanly():
    assert parse_model_options(["hidden-dim=16", "widths=[4,8]", "act=relu"]) == {
        "hidden_dim": 16, "widths": [4, 8], "act": "relu"}
    assert parse_freeze_after(["whiten_bias=1.5"]) == {"whiten_bias": 1.5}
    with pytest.raises(PartrainError, match="--model-option wants KEY=VALUE, got 'x'"):
        parse_model_options(["x"])
    with pytest.raises(PartrainError, match="--freeze-after wants NAME=EPOCHS, got 'b=x'"):
        parse_freeze_after(["b=x"])


@pytest.mark.parametrize("name", list(RECIPES))
def test_recipes_are_valid_settings(name):
    preset = RECIPES[name]
    preset.check()
    assert preset.recipe == name
    changes = preset.changes()
    assert set(changes) <= {f.name for f in FIELDS} and "workers" not in changes
    explicit = {"epochs": 1, "model_options": {"widths": [4, 4, 4]}}
    out = apply_recipe(name, {**TrainConfig().to_dict(), **explicit}, set(explicit))
    cfg = TrainConfig(**out)
    cfg.check()
    assert cfg.epochs == 1 and cfg.model_options == {"widths": [4, 4, 4]}
    assert cfg.lr == preset.lr and cfg.freeze_after == preset.freeze_after
    cfg.freeze_after["x"] = 1  # a copy: the recipe itself is unchanged
    assert "x" not in RECIPES[name].freeze_after


def _tiny(store, **kw):
    small = {"num_filters": 4, "hidden_dim": 16, "weight_scale": 0.01}
    return TrainConfig(model_options=small, batch_size=20, epochs=2, val_size=50, data=str(store),
                       log_every=5, workers=1, **kw)


def test_adamw_and_triangular_train(tiny_store, tmp_path):
    model = build_model("three-layer")
    name, hyper = optimizer_spec(_tiny(tiny_store, optimizer="adamw"), model)
    opt = make_optimizer(model, (name, hyper))
    assert isinstance(opt, Adam) and opt.decoupled and opt.weight_decay == model.weight_decay
    params = {}
    for optimizer in ("adam", "adamw"):
        run = tmp_path / optimizer
        run.mkdir()
        summary = fit(_tiny(tiny_store, optimizer=optimizer, schedule="triangular", lr=3e-3), run,
                      quiet=True)
        assert summary["test_acc"] > 0.2  # ten classes: chance is 0.1
        assert json.loads((run / "config.json").read_text())["config"]["optimizer"] == optimizer
        params[optimizer] = load_checkpoint(run / "checkpoint.h5")[0]["params"]
    assert not np.array_equal(params["adam"], params["adamw"])  # the decay is decoupled
    res = CliRunner().invoke(cli.main, ["fit", "--optimizer", "adamw", "--schedule",
                                        "triangular", "--dry-run"])
    assert res.exit_code == 0 and "'adamw'   *" in res.output and "'triangular'   *" in res.output


SAVED = TrainConfig(model_options={"num_filters": 4}, workers=1).to_dict()


@pytest.mark.parametrize("change, message", [
    ({"epochs": "three"}, "setting 'epochs' must be a whole number, got 'three'"),
    ({"epochs": 2.5}, "setting 'epochs' must be a whole number, got 2.5"),
    ({"epochs": True}, "setting 'epochs' must be a whole number, got True"),
    ({"lr": [0.1]}, r"setting 'lr' must be a number, got \[0.1\]"),
    ({"lr": None}, "setting 'lr' must be a number, got None"),
    ({"weight_decay": "x"}, "setting 'weight_decay' must be a number or null"),
    ({"model": ["vgg"]}, "setting 'model' must be text"),
    ({"nesterov": 1}, "setting 'nesterov' must be true or false"),
    ({"model_options": [4]}, "setting 'model_options' must be an object"),
    ({"freeze_after": {"fc1": "x"}}, "--freeze-after fc1='x'"),
    ({"freeze_after": {"fc1": float("nan")}}, "--freeze-after fc1=nan"),
    ({"model_options": {"num_filters": -1}}, "num_filters must not be negative"),
    ({"model_options": {"num_filters": "a" * 10_000}}, r"num_filters='aaaa.*\.\.\."),
    ({"epochs": 0}, "--epochs must be at least 1"),
    ({"lr": float("inf")}, "--lr must be a finite number"),
    ({"data": "a\0b"}, "must not contain a NUL character"),
    ({"schedule": {"a": 1}}, "setting 'schedule' must be text"),
    ({"epoch": 3}, "unknown setting 'epoch'"),
])
def test_a_saved_config_is_checked_by_the_one_schema(change, message):
    """config.json can hold any JSON value where a setting belongs; each is one line naming the
    file and the setting (D2: "epochs": "three" was a TypeError in `fit --resume`)."""
    with pytest.raises(PartrainError, match=message) as info:
        TrainConfig.from_saved({**SAVED, **change}, "runs/r/config.json")
    text = str(info.value)
    assert text.startswith("runs/r/config.json is not a valid run config: ")
    assert "\n" not in text and len(text) < 500


def test_a_saved_config_may_lack_newer_settings_but_not_be_other_json():
    older = {k: v for k, v in SAVED.items() if k not in ("lookahead", "tta")}
    assert TrainConfig.from_saved(older, "c.json") == TrainConfig.from_dict(SAVED)
    for bad in ([1, 2], "text", 3, None):
        with pytest.raises(PartrainError, match="settings are not a JSON object"):
            TrainConfig.from_saved(bad, "c.json")

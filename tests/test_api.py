"""`partrain.api`, the Python API (issue 14): the same runs, numbers and errors as the command line.

- fit makes the run `partrain fit` makes with the same settings (the checkpoints' bytes, the
  settings, the history rows), named as the CLI names it; a resume continues it exactly.
- Bad settings are one PartrainError naming the key, before any run folder exists; a recipe is
  applied first and the settings given win, as `partrain fit --recipe ... --dry-run` shows.
- load_run + predict agree with `partrain predict` (and with the logits by hand) in every image
  layout; evaluate agrees with `partrain evaluate` and, on the validation split, with the
  accuracy the training loop measured (so the images are normalised as the run trained).
- The README's example under "## Python API" runs verbatim, in a folder holding data/cifar10.h5.
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from partrain import api
from partrain.batches import normaliser
from partrain.checkpoint import load_checkpoint
from partrain.recipes import RECIPES, airbench_lr
from partrain.errors import PartrainError
from partrain.evaluate import evaluate_run
from partrain.predict import predict_run
from synthetic import make_tiny_store

README = Path(__file__).resolve().parent.parent / "README.md"
SMALL = {"model_options": {"num_filters": 8, "hidden_dim": 32}, "val_size": 100}
# The same run on the command line: SMALL and RUN as options.
RUN = {"epochs": 2, "batch_size": 25, "lr": 3e-3, "seed": 1, "log_every": 4}
RUN_ARGS = ["--model-option", "num_filters=8", "--model-option", "hidden_dim=32",
            "--val-size", "100", "--epochs", "2", "--batch-size", "25", "--lr", "0.003",
            "--seed", "1", "--log-every", "4"]
TIMING = ("images_per_s", "time_s")


def cli(*args, cwd):
    p = subprocess.run([sys.executable, "-m", "partrain.cli", *map(str, args)], cwd=cwd,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, (p.stdout, p.stderr)
    return p


def untimed(rows):
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


def same_arrays(a: Path, b: Path) -> None:
    (xa, _), (xb, _) = load_checkpoint(a), load_checkpoint(b)
    assert sorted(xa) == sorted(xb)
    for name in xa:
        assert xa[name].dtype == xb[name].dtype and xa[name].tobytes() == xb[name].tobytes(), name


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(FitResult, store path) of one finished tiny run, trained in this process."""
    root = tmp_path_factory.mktemp("api")
    store = make_tiny_store(root / "data" / "cifar10.h5")
    result = api.fit(workers=1, data_dir=store.parent, runs_dir=root / "runs", name="a",
                     **SMALL, **RUN)
    return result, store


# ---------------------------------------------------------------------------------- fit
def test_fit_makes_the_run_partrain_fit_makes(tmp_path, tiny_store):
    runs = tmp_path / "runs"
    result = api.fit(workers=1, data_dir=tiny_store.parent, runs_dir=runs, **SMALL, **RUN)
    cli("fit", "--workers", "1", *RUN_ARGS, "--data-dir", tiny_store.parent, "--runs-dir", runs,
        "--name", "cli", "--quiet", cwd=tmp_path)
    by_cli = runs / "cli"
    assert result.run.parent == runs and re.fullmatch(r"three-layer-\d{8}-\d{6}", result.run.name)
    for which in ("checkpoint.h5", "best.h5"):  # bit-identical parameters, state, optimizer
        same_arrays(result.run / which, by_cli / which)
    saved = json.loads((result.run / "config.json").read_text())["config"]
    assert saved == json.loads((by_cli / "config.json").read_text())["config"]
    assert result.config.to_dict() == saved
    assert result.summary == json.loads((result.run / "summary.json").read_text())
    by_cli_summary = json.loads((by_cli / "summary.json").read_text())
    assert result.summary["test_acc"] == by_cli_summary["test_acc"]
    assert [r["kind"] for r in result.history] == (["step"] * 4 + ["epoch"]) * 2  # 16 steps
    assert max(r["val_acc"] for r in result.history if r["kind"] == "epoch") == pytest.approx(
        result.summary["best_val_acc"])
    assert untimed(result.history) == untimed(api.history(by_cli))


def test_resume_continues_the_run_exactly(tmp_path, tiny_store):
    common = dict(workers=1, data_dir=tiny_store.parent, runs_dir=tmp_path, **SMALL)
    api.fit(name="whole", epochs=2, **common)
    api.fit(name="half", epochs=1, **common)
    resumed = api.fit(resume=tmp_path / "half", epochs=2)  # more epochs of a constant schedule
    assert resumed.run == tmp_path / "half" and resumed.config.epochs == 2
    same_arrays(tmp_path / "half" / "checkpoint.h5", tmp_path / "whole" / "checkpoint.h5")
    assert untimed(resumed.history) == untimed(api.history(tmp_path / "whole"))
    with pytest.raises(PartrainError, match="cannot resume exactly with changed settings: lr"):
        api.fit(resume=tmp_path / "half", lr=0.5)


@pytest.mark.parametrize("kwargs, message", [
    ({"epoch": 1}, "unknown setting 'epoch'; did you mean 'epochs'?"),
    ({"data": "data"}, "unknown setting 'data'; did you mean 'data_dir'?"),
    ({"colour": 1}, "unknown setting 'colour'; the settings: model, model_options, "),
    ({"batch_size": "64"}, "setting 'batch_size' must be a whole number, got '64'"),
    ({"lr": None}, "setting 'lr' must be a number, got None"),
    ({"augment_flip": 1}, "setting 'augment_flip' must be true or false, got 1"),
    ({"model_options": [("num_filters", 8)]}, "setting 'model_options' must be an object"),
    ({"model_options": {"num_filters": object()}}, "setting 'model_options': {'num_filters'"),
    ({"lr": -1.0}, "--lr must be more than 0, got -1.0"),  # values: TrainConfig.check's words
    ({"model_options": {"num_filter": 8}},
     "--model-option: cannot build three-layer with num_filter=8: model three-layer has no "
     "option num_filter"),
    ({"workers": 3, "batch_size": 2}, "--workers 3 exceeds --batch-size 2"),
    ({"recipe": "airbnch"}, "unknown recipe 'airbnch'; choose from airbench, airbench-short"),
    ({"recipe": 1}, "recipe must be a name (text), got 1"),
    ({"name": "a/b"}, "--name 'a/b' must be a plain folder name"),
    ({"name": 7}, "name must be text, got 7"),
    ({"runs_dir": None}, "runs_dir must be a path (text or pathlib.Path), got None"),
    ({"data_dir": "nowhere"}, "nowhere/cifar10.h5 not found; run `partrain prepare` first"),
])
def test_a_bad_setting_is_one_error_naming_it_and_no_run_folder(tmp_path, tiny_store, kwargs,
                                                                message):
    args = {"data_dir": tiny_store.parent, "runs_dir": tmp_path / "runs", **kwargs}
    with pytest.raises(PartrainError) as e:
        api.fit(**args)
    assert str(e.value).startswith(message), str(e.value)
    assert not (tmp_path / "runs").exists()


def test_a_recipe_first_then_the_settings_given_as_on_the_command_line(tmp_path):
    given = dict(batch_size=512, epochs=2, model_options={"ghost_batch": 32})
    cfg = api.make_config(recipe="airbench", **given)
    assert (cfg.recipe, cfg.model, cfg.optimizer) == ("airbench", "airbench", "sgd")
    assert (cfg.epochs, cfg.batch_size) == (2, 512)  # given: they win
    assert cfg.lr == airbench_lr(512)  # the recipe's lr for that batch, since lr was not given
    assert cfg.model_options == {**RECIPES["airbench"].model_options, "ghost_batch": 32}
    assert api.make_config(recipe="airbench", batch_size=512, lr=0.5).lr == 0.5
    dry = cli("fit", "--recipe", "airbench", "--batch-size", "512", "--epochs", "2",
              "--model-option", "ghost_batch=32", "--dry-run", cwd=tmp_path).stdout
    shown = dict(line.split(None, 1) for line in dry.splitlines()
                 if line.startswith("  ") and not line.startswith("  (") and len(line.split()) > 1
                 and line.split()[0] in cfg.to_dict())
    assert {k: v.removesuffix("   *") for k, v in shown.items()} == {
        k: repr(v) for k, v in cfg.to_dict().items()}


def test_settings_are_kept_as_config_json_holds_them():
    cfg = api.make_config(model="vgg", model_options={"widths": (8, np.int64(16))},
                          batch_size=np.int64(32), lr=np.float64(0.01), workers=1)
    assert cfg.model_options == {"widths": [8, 16]} and type(cfg.batch_size) is int
    assert json.loads(json.dumps(cfg.to_dict())) == cfg.to_dict()


# ------------------------------------------------------------------------------ store, model
def test_open_store_takes_the_folder_or_the_file(tiny_store):
    by_folder, by_file = api.open_store(tiny_store.parent), api.open_store(tiny_store)
    assert by_folder.test_images.shape == (100, 3, 32, 32)
    assert by_folder.test_images.tobytes() == by_file.test_images.tobytes()
    with pytest.raises(PartrainError, match="no dataset at .*cifar10.h5; run `partrain prepare`"):
        api.open_store(tiny_store.parent / "elsewhere")
    with pytest.raises(PartrainError, match="data_dir must be a path"):
        api.open_store(3)


def test_build_model_is_the_model_fit_trains():
    model = api.build_model("three-layer", num_filters=8, hidden_dim=32)
    assert model.layout.size == 3 * 8 * 49 + 8 + 8 * 16 * 16 * 32 + 32 + 32 * 10 + 10
    with pytest.raises(PartrainError, match="cannot build model 'three-layer': model three-layer "
                                            "has no option width"):
        api.build_model("three-layer", width=3)
    with pytest.raises(PartrainError, match="unknown model 'resnet'"):
        api.build_model("resnet")


# ---------------------------------------------------------------------------- load, predict
def test_predict_agrees_with_partrain_predict_in_every_layout(trained):
    result, store = trained
    run = api.load_run(result.run)
    data = api.open_store(store)
    images = data.test_images[:20]
    labels, probs = run.predict(images)
    assert labels.shape == (20,) and probs.shape == (20, 10) and len(set(labels)) > 1
    out = predict_run(result.run, [str(i) for i in range(20)], test_index=True, top=10)
    for n, r in enumerate(out["results"]):
        assert r["top"][0][0] == run.class_names[labels[n]]
        assert dict(r["top"]) == {name: probs[n, j] for j, name in enumerate(run.class_names)}
    scale, shift = normaliser(data.mean, data.std)  # the store's channel statistics, by hand
    by_hand = np.asarray(run.model.logits(images.astype(np.float32) * scale - shift))
    assert (by_hand.argmax(axis=1) == labels).all()
    hwc = np.ascontiguousarray(images.transpose(0, 2, 3, 1))
    hwc_labels, hwc_probs = run.predict(hwc)
    assert (hwc_labels == labels).all() and np.array_equal(hwc_probs, probs)
    for one in (images[3], hwc[3], list(images[3])):  # a batch of one: other GEMM blocking
        label, p = run.predict(one)
        assert type(label) is int and label == labels[3]
        np.testing.assert_allclose(p, probs[3], rtol=1e-4, atol=1e-9)
    empty_labels, empty_probs = run.predict(images[:0])
    assert empty_labels.shape == (0,) and empty_probs.shape == (0, 10)


@pytest.mark.parametrize("images, message", [
    (np.zeros((2, 3, 32, 32), np.float32), "images must be uint8 pixels 0..255, got dtype float32"),
    (np.zeros((2, 32, 32), np.uint8), "images must be (N, 3, 32, 32) or (N, 32, 32, 3)"),
    (np.zeros((2, 3, 28, 28), np.uint8), "or (32, 32, 3); got shape (2, 3, 28, 28)"),
    ([np.zeros((3, 32, 32), np.uint8), np.zeros(3, np.uint8)], "images must be an array"),
])
def test_predict_refuses_what_is_not_images(trained, images, message):
    run = api.load_run(trained[0].run)
    with pytest.raises(PartrainError) as e:
        run.predict(images)
    assert message in str(e.value)


def test_evaluate_agrees_with_partrain_evaluate_and_with_training(trained, tmp_path):
    result, _ = trained
    before = sorted(p.name for p in result.run.iterdir())
    run = api.load_run(result.run)
    mine = run.evaluate()
    theirs = evaluate_run(result.run, out_dir=tmp_path, tta="flip")
    assert mine["accuracy"] == theirs["test_accuracy"] and mine["n"] == theirs["n_test"] == 100
    assert mine["per_class"] == theirs["per_class"] and mine["n_correct"] == theirs["n_correct"]
    assert mine["confusion"].tolist() == theirs["confusion"]
    assert mine["checkpoint"] == theirs["checkpoint"] and mine["epoch"] == theirs["epoch"]
    assert run.evaluate(tta="flip")["accuracy_tta"] == theirs["test_accuracy_tta"]
    val = run.evaluate("val")  # the held-out images, normalised as the training loop did
    assert val["n"] == 100 and val["accuracy"] == run.checkpoint["best_val"]
    assert sorted(p.name for p in result.run.iterdir()) == before  # no files written
    last = api.load_run(result.run, checkpoint="last")
    assert Path(last.checkpoint["path"]).name == "checkpoint.h5"
    for kwargs, message in (({"split": "train"}, "split must be test or val, got 'train'"),
                            ({"tta": "rotate"}, "tta must be one of none, flip, flip_translate")):
        with pytest.raises(PartrainError, match=re.escape(message)):
            run.evaluate(**kwargs)


@pytest.mark.skipif("normalize" not in api.SETTINGS, reason="no --normalize in this partrain")
def test_a_run_normalised_otherwise_predicts_as_it_trained(tmp_path, tiny_store):
    result = api.fit(workers=1, data_dir=tiny_store.parent, runs_dir=tmp_path, name="m",
                     normalize="mean-image", **SMALL, **RUN)
    run = api.load_run(result.run)
    assert run.evaluate("val")["accuracy"] == run.checkpoint["best_val"]
    labels, probs = run.predict(api.open_store(tiny_store).test_images[:10])
    out = predict_run(result.run, [str(i) for i in range(10)], test_index=True, top=10)
    for n, r in enumerate(out["results"]):
        assert dict(r["top"]) == {name: probs[n, j] for j, name in enumerate(run.class_names)}


def test_load_run_errors_and_another_store(trained, tmp_path):
    result, _ = trained
    (tmp_path / "empty").mkdir()
    for args, message in (((tmp_path / "none",), "does not exist"),
                          ((tmp_path / "empty",), "is not a partrain run folder"),
                          ((result.run, "worst"), "checkpoint must be one of last, best"),
                          ((None,), "path must be a path")):
        with pytest.raises(PartrainError, match=message):
            api.load_run(*args)
    other = make_tiny_store(tmp_path / "other" / "cifar10.h5", seed=5)
    run = api.load_run(result.run, data_dir=other.parent)
    assert run.data_path == other
    with pytest.warns(UserWarning, match="is not the file this run was trained on"):
        run.evaluate()


# ---------------------------------------------------------------------------------- README
def readme_example(which: int = 0) -> str:
    """The python blocks of the README's "## Python API" section: the example, then the hooks'."""
    section = README.read_text().split("\n## Python API\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(blocks) == 2, blocks
    return blocks[which]


def test_the_readme_example_runs(tmp_path):
    """Verbatim (no substitution), in a folder whose data/cifar10.h5 is a tiny store with more
    than the default 1,000 validation images, as `python -c` runs it: like a notebook's cell,
    code that is no file, which the 4 workers do not import again (a script's would be)."""
    make_tiny_store(tmp_path / "data" / "cifar10.h5", n_train=1500, n_test=100)
    p = subprocess.run([sys.executable, "-c", readme_example()], cwd=tmp_path,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, (p.stdout, p.stderr)
    assert "test accuracy" in p.stdout and "parameters" in p.stdout
    assert len(list((tmp_path / "runs").iterdir())) == 1


def test_the_readme_hooks_example_runs(tmp_path):
    """The hooks example, verbatim: its lines in the order the README shows."""
    make_tiny_store(tmp_path / "data" / "cifar10.h5")
    p = subprocess.run([sys.executable, "-c", readme_example(1)], cwd=tmp_path,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, (p.stdout, p.stderr)
    lines = p.stdout.splitlines()
    assert lines[:2] == ["saved checkpoint.h5 (last) after epoch 1",
                         "saved best.h5 (best) after epoch 1"], lines
    assert lines[2].startswith("epoch 1: val acc ") and lines[-1].startswith('{"kind": "step"')


def test_own_images_from_python(tmp_path):
    """prepare (an image folder) -> open_store -> build_model for its shape -> fit -> predict."""
    from image_folders import make_folder
    make_folder(tmp_path / "imgs", per_class=10)
    path = api.prepare(tmp_path / "data", images=tmp_path / "imgs", size=20)
    data = api.open_store(path)
    assert data.image_shape == (3, 20, 20) and data.class_names == ["blue", "green", "red"]
    model = api.build_model("vgg", data, widths=[4, 4, 4], ghost_batch=4)
    assert model.input_shape == (3, 20, 20) and model.n_classes == 3
    result = api.fit(model="three-layer", model_options={"num_filters": 4, "hidden_dim": 8},
                     epochs=1, batch_size=8, val_size=4, workers=1, data_dir=tmp_path / "data",
                     runs_dir=tmp_path / "runs", name="own")
    assert result.config.model_options["input_size"] == 20
    labels, probs = api.load_run(result.run).predict(data.test_images.transpose(0, 2, 3, 1))
    assert probs.shape == (len(data.test_labels), 3) and labels.shape == data.test_labels.shape
    with pytest.raises(PartrainError, match=r"images must be \(N, 3, 20, 20\)"):
        api.load_run(result.run).predict(np.zeros((2, 3, 32, 32), np.uint8))
    with pytest.raises(PartrainError, match="give one"):
        api.prepare(tmp_path / "x", source="a.tar.gz", images=tmp_path / "imgs")

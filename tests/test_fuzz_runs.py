"""Fuzzing what `fit --resume` and `evaluate` read from a run folder, and fit's options: every
input ends in success or one PartrainError (through the CLI: one `Error:` line, or click's usage
error, exit 2), never another exception, a traceback or a file left behind.

- Checkpoints: the bytes of a real run's checkpoint.h5 truncated, bit-flipped, overwritten or
  replaced; its meta given random JSON values; its arrays replaced by random arrays. A damaged
  file may only load if its bytes are the original ones (the seal, partrain/checkpoint.py).
- config.json: each setting (and each top-level entry) given a random JSON value, or the file
  replaced by random bytes or JSON; then the settings are resumed, the model is built for
  evaluation, and the run's plan (split, schedule, optimizer spec) is made.
- `partrain fit --dry-run` through click's CliRunner with random numeric options and model
  options on a tiny store: it checks everything a run checks before training, and trains
  nothing.

The library functions run in-process. The examples are derandomized with a fixed budget
(tests/conftest.py); `--hypothesis-show-statistics` shows the outcomes as events.
"""
from __future__ import annotations

import dataclasses
import json
import math
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from hypothesis import event, given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from partrain.checkpoint import load_checkpoint, save_checkpoint
from partrain.cli import main
from partrain.config import TrainConfig
from partrain.datasets.store import load_store
from partrain.errors import PartrainError
from partrain.rundir import RunDir
from partrain.train import Plan, RunState
from synthetic import make_tiny_store

# a warning would reach the user's terminal (with a source line): fails like an exception
pytestmark = pytest.mark.filterwarnings("error")

STEPS_PER_EPOCH = 9  # 450 training images (500 less 50 held out) in batches of 50


def success_or_partrain_error(fn, *args) -> tuple[bool, object]:
    """(True, fn's result), or (False, None) when it raised one-line PartrainError; any other
    exception fails the test. Each outcome is an event."""
    name = getattr(fn, "__name__", "fn")
    try:
        result = fn(*args)
    except PartrainError as e:
        message = str(e)
        assert message and "\n" not in message and len(message) < 1000, message
        event(f"{name}: " + kind_of(message))
        return False, None
    event(f"{name}: success")
    return True, result


def kind_of(message: str) -> str:
    """The gist of an error message: paths, numbers and quoted text taken out."""
    text = re.sub(r"(/[^\s:]+)+", "P", message)
    text = re.sub(r"'[^']*'|\([^)]*\)|\[[^]]*\]|-?\d[\d,.e+]*", "_", text)
    return text[:70]


@dataclasses.dataclass(repr=False)
class Trained:
    """A real run stopped 4 steps into its second epoch, its store (loaded) and its folder."""

    run: Path
    data: object
    store_dir: Path

    def __repr__(self) -> str:  # hypothesis prints it with every failing example
        return f"Trained({self.run})"


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Trained:
    root = tmp_path_factory.mktemp("fuzz-runs")
    store = make_tiny_store(root / "data" / "cifar10.h5")
    result = CliRunner().invoke(main, [
        "fit", "--workers", "1", "--model-option", "num_filters=2", "--model-option",
        "hidden_dim=4", "--batch-size", "50", "--val-size", "50", "--epochs", "2",
        "--max-steps", "13", "--quiet", "--data-dir", str(store.parent), "--runs-dir",
        str(root / "runs"), "--name", "r"])
    assert result.exit_code == 0, result.output
    return Trained(root / "runs" / "r", load_store(store), store.parent)


@pytest.fixture(scope="module")
def scratch(trained):
    """A copy of the run that the examples damage, one file at a time."""
    with tempfile.TemporaryDirectory() as folder:
        yield Path(shutil.copytree(trained.run, Path(folder) / "r"))


def _targets(run: Path) -> dict[str, np.ndarray]:
    """Zeroed arrays shaped as the run's checkpoint: what Session.resume restores into."""
    arrays, _ = load_checkpoint(run / "checkpoint.h5")
    return {k: np.zeros_like(v) for k, v in arrays.items()}


def resume_state(run: Path, targets: dict) -> RunState:
    """What `fit --resume` reads of the checkpoint (Session.resume without a runner)."""
    return RunState.from_meta(RunDir(run).restore(targets), STEPS_PER_EPOCH)


def evaluate_load(run: Path):
    """What `evaluate --checkpoint last` reads before it touches the test set."""
    return RunDir.open(run).load_for_eval("last")


# ----------------------------------------------------------------------------------- checkpoints

DAMAGE = st.one_of(
    st.tuples(st.just("truncate"), st.integers(0, 40_000)),
    st.tuples(st.just("flip"), st.lists(st.tuples(st.integers(0, 40_000), st.integers(0, 7)),
                                        min_size=1, max_size=4)),
    st.tuples(st.just("overwrite"), st.integers(0, 40_000), st.binary(min_size=1, max_size=64)),
    st.tuples(st.just("replace"), st.binary(max_size=2000)),
)


def damaged(data: bytes, damage) -> bytes:
    kind, *args = damage
    if kind == "truncate":
        return data[:args[0] % (len(data) + 1)]
    if kind == "replace":
        return args[0]
    b = bytearray(data)
    if kind == "flip":
        for at, bit in args[0]:
            b[at % len(b)] ^= 1 << bit
    else:
        at = args[0] % len(b)
        b[at:at + len(args[1])] = args[1]
    return bytes(b)


@given(damage=DAMAGE)
def test_fuzz_checkpoint_bytes(damage, trained, scratch):
    original = (trained.run / "checkpoint.h5").read_bytes()
    data = damaged(original, damage)
    (scratch / "checkpoint.h5").write_bytes(data)
    event(f"damage: {damage[0]}")
    for read in (lambda: resume_state(scratch, _targets(trained.run)),
                 lambda: evaluate_load(scratch)):
        ok, _ = success_or_partrain_error(read)
        assert ok == (data == original)  # the seal: only the bytes it was written with load


JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                max_size=4),
    max_leaves=12)
META_KEYS = ["epoch", "position", "t", "best_val", "elapsed_s", "epoch_meter", "window_meter",
             "epoch_sums", "config", "model"]
# near misses: the numbers a run writes, nudged
NUMBERS = st.sampled_from([0, 1, 2, 4, 9, 13, 18, -1, 10**9, 0.5, 1.0, -0.0, float("nan"),
                           float("inf"), True, False, None])


@given(changes=st.lists(st.tuples(st.sampled_from(META_KEYS) | st.text(max_size=6),
                                  NUMBERS | JSON | st.just("drop")), min_size=1, max_size=4),
       whole=st.none() | st.dictionaries(st.text(max_size=6), JSON, max_size=4))
def test_fuzz_checkpoint_meta(changes, whole, trained, scratch):
    arrays, meta = load_checkpoint(trained.run / "checkpoint.h5")
    meta = dict(whole) if whole is not None else meta
    for key, value in changes:
        if value == "drop":
            meta.pop(key, None)
        else:
            meta[key] = value
    save_checkpoint(scratch / "checkpoint.h5", arrays, meta)
    ok, state = success_or_partrain_error(resume_state, scratch, _targets(trained.run))
    if ok:  # what the loop relies on
        assert 0 <= state.position < STEPS_PER_EPOCH
        assert state.t == state.epoch * STEPS_PER_EPOCH + state.position
        state.start_epoch()
        assert math.isfinite(state.epoch_meter.loss) and math.isfinite(state.window.acc)
    success_or_partrain_error(evaluate_load, scratch)


ARRAYS = hnp.arrays(st.sampled_from([np.float32, np.float64, np.int64, np.uint8, np.bool_]),
                    hnp.array_shapes(min_dims=0, max_dims=2, max_side=3000))


@given(name=st.sampled_from(["params", "state", "opt.m", "opt.v", "extra"]),
       array=ARRAYS | st.just(None), nudge=st.sampled_from([None, np.nan, np.inf, 1e38]))
def test_fuzz_checkpoint_arrays(name, array, nudge, trained, scratch):
    arrays, meta = load_checkpoint(trained.run / "checkpoint.h5")
    if array is None:  # a missing array, or one of the right shape with a bad value
        if nudge is None:
            arrays.pop(name, None)
        elif name in arrays and arrays[name].size:
            arrays[name][len(arrays[name]) // 2] = nudge
    else:
        arrays[name] = array
    save_checkpoint(scratch / "checkpoint.h5", arrays, meta)
    targets = _targets(trained.run)
    ok, _ = success_or_partrain_error(resume_state, scratch, targets)
    if ok:
        assert all(np.isfinite(v).all() for v in targets.values())
    success_or_partrain_error(evaluate_load, scratch)


# ----------------------------------------------------------------------------------- config.json

FIELDS = [f.name for f in dataclasses.fields(TrainConfig)]
SETTINGS = st.one_of(
    st.sampled_from(FIELDS).map(lambda k: ("config", k)),
    st.sampled_from(["num_filters", "hidden_dim", "filter_size", "weight_scale", "reg",
                     "widths", "nope"]).map(lambda k: ("config", "model_options", k)),
    st.sampled_from(["conv1", "fc1", "x"]).map(lambda k: ("config", "freeze_after", k)),
    st.sampled_from(["config", "class_names", "partrain_version", "data_sha256", "x"]).map(
        lambda k: (k,)),
    st.text(max_size=8).map(lambda k: ("config", k)),
)


def _set(meta: dict, path: tuple, value) -> None:
    for key in path[:-1]:
        if not isinstance(meta.get(key), dict):
            return
        meta = meta[key]
    meta[path[-1]] = value


@given(changes=st.lists(st.tuples(SETTINGS, NUMBERS | JSON), min_size=1, max_size=3),
       replace=st.one_of(st.none(), st.just(None), st.just(None), st.binary(max_size=200),
                         JSON.map(lambda v: json.dumps(v).encode())))
def test_fuzz_config_json(changes, replace, trained, scratch):
    meta = json.loads((trained.run / "config.json").read_text())
    for path, value in changes:
        _set(meta, path, value)
    text = replace if replace is not None else json.dumps(meta).encode()
    (scratch / "config.json").write_bytes(text)
    (scratch / "checkpoint.h5").write_bytes((trained.run / "checkpoint.h5").read_bytes())
    ok, cfg = success_or_partrain_error(lambda: RunDir.open(scratch).resume_config({}))
    if ok:  # what fit does next with the settings, short of starting workers
        success_or_partrain_error(Plan.of, cfg, trained.data)
    success_or_partrain_error(evaluate_load, scratch)


# ------------------------------------------------------------------------------ fit's options

TEXT = st.text(st.characters(codec="utf-8", exclude_characters="\x00"), max_size=8)
NUMBER_TEXT = st.one_of(
    st.integers(-2**70, 2**70).map(str), st.floats().map(repr), TEXT,
    st.sampled_from(["0", "1", "-1", "nan", "inf", "-inf", "1e308", "1e400", "-0", "0x10",
                     "1_000", "", " 2", "\u0661", "2.0", "1e-320"]))
NUMERIC = ["--lr", "--momentum", "--weight-decay", "--warmup-epochs", "--epochs", "--batch-size",
           "--seed", "--val-size", "--workers", "--log-every", "--translate"]
MODEL_OPTION = st.tuples(
    st.sampled_from(["num_filters", "filter_size", "hidden_dim", "weight_scale", "reg",
                     "input_size", "widths", "ghost_batch"]) | TEXT,
    NUMBER_TEXT | JSON.map(json.dumps)).map(lambda kv: ["--model-option", "=".join(kv)])
OPTION = st.one_of(
    st.tuples(st.sampled_from(NUMERIC), NUMBER_TEXT).map(list),
    MODEL_OPTION,
    st.tuples(st.sampled_from(["fc1", "conv1", "whiten_bias"]) | TEXT, NUMBER_TEXT).map(
        lambda kv: ["--freeze-after", "=".join(kv)]),
    st.tuples(st.sampled_from(["--model", "--optimizer", "--schedule", "--recipe"]),
              st.sampled_from(["three-layer", "linear", "vgg", "sgd", "adamw", "cosine",
                               "airbench-short", "nope"])).map(list),
)


@given(options=st.lists(OPTION, min_size=1, max_size=5))
def test_fuzz_fit_options_dry_run(options, trained):
    with tempfile.TemporaryDirectory() as folder:
        runs = Path(folder) / "runs"
        args = ["fit", "--dry-run", "--data-dir", str(trained.store_dir), "--runs-dir", str(runs),
                *[a for option in options for a in option]]
        result = CliRunner().invoke(main, args)
        out = result.output
        assert "Traceback" not in out and not runs.exists(), out
        assert result.exception is None or isinstance(result.exception, SystemExit), (
            repr(result.exception), out)
        errors = [line for line in out.splitlines() if line.startswith("Error:")]
        if result.exit_code == 0:
            event("fit --dry-run: success")
            assert out.startswith("settings") and not errors, out
        elif result.exit_code == 1:
            event("fit --dry-run: " + kind_of(errors[0] if errors else out))
            assert [line for line in out.splitlines() if line.strip()] == errors, out
            assert len(errors) == 1 and len(errors[0]) < 1000, out
        else:
            event("fit --dry-run: usage error")
            assert result.exit_code == 2 and len(errors) == 1, (result.exit_code, out)

"""`partrain export RUN --onnx FILE`: the ONNX graph computes partrain's own logits.

Every built-in model is trained for a few steps on a tiny synthetic store (in this process: fast),
exported by a real `partrain export` process, checked with `onnx.checker` and run with
`onnx.reference.ReferenceEvaluator` (pure Python and numpy: no runtime framework) on 300 images
as uint8 pixels cast to float32, against `api.load_run(run)`'s logits (what `partrain evaluate`
computes): max |difference| <= 1e-4 of the logits' largest magnitude, and the same argmax. The
three-layer run normalises with mean-image, the others per channel, so both normalisations are
in a graph. Bad input goes through real processes too: one `Error:` line, exit 1, and no output
file, half-written or otherwise; an existing file is replaced by a rename or left as it was.
"""
from __future__ import annotations

import inspect
import os
import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx.reference import ReferenceEvaluator

from partrain import api, export_onnx
from partrain.batches import normaliser
from partrain.config import TrainConfig
from partrain.errors import PartrainError
from partrain.evaluate import batched_logits
from partrain.nn.layers import BatchNorm, ReLU
from partrain.nn.models import MODELS, build_model
from partrain.train import fit
from synthetic import CLASS_NAMES, make_tiny_store

N_IMAGES = 300  # per model; the reference evaluator's MaxPool loops in Python, ~1-4 s for these
RUNS = {  # name: (model, model options, normalisation), small enough to train in seconds
    "linear": ("linear", {}, "channel"),
    "three-layer": ("three-layer", {"num_filters": 4, "hidden_dim": 16}, "mean-image"),
    "vgg": ("vgg", {"widths": [4, 8, 8], "ghost_batch": 8}, "channel"),
    "airbench": ("airbench", {"widths": [8, 16, 16], "ghost_batch": 8}, "channel"),
}


def cli(*args, cwd, argv0=("-m", "partrain.cli")):
    return subprocess.run([sys.executable, *argv0, *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=120)


def assert_one_error(p, *words):
    """Exit 1 and one `Error:` line on stderr naming `words`; nothing on stdout."""
    assert p.returncode == 1, (p.stdout, p.stderr)
    lines = p.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), p.stderr
    for w in words:
        assert w in lines[0], (w, lines[0])
    assert p.stdout == ""


def leftovers(folder):
    return sorted(f.name for f in folder.iterdir() if ".tmp" in f.name)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(root, {name: run folder}, store): one short run per built-in model on one tiny store."""
    root = tmp_path_factory.mktemp("export")
    store = make_tiny_store(root / "data" / "cifar10.h5", n_train=450, n_test=50)
    runs = {}
    for name, (model, options, normalize) in RUNS.items():
        run = root / "runs" / name
        run.mkdir(parents=True)
        fit(TrainConfig(model=model, model_options=options, normalize=normalize, batch_size=40,
                        epochs=1, val_size=50, data=str(store), lr=1e-3, log_every=5), run,
            quiet=True, evaluate_test=False)
        runs[name] = run
    return root, runs, store


def images(n=N_IMAGES, seed=0):
    """uint8 (n, 3, 32, 32): half the store's kind of learnable image, half uniform noise."""
    from synthetic import learnable_split
    rng = np.random.default_rng(seed)
    learn = learnable_split(n - n // 2, rng)[0]
    return np.concatenate([learn, rng.integers(0, 256, (n // 2, 3, 32, 32), dtype=np.uint8)])


def partrain_logits(model, scale, shift, x):
    return np.concatenate([z for _, z, _ in batched_logits(model, x, np.arange(len(x)), scale,
                                                           shift)])


def assert_same_logits(proto_or_path, ref, x):
    out = ReferenceEvaluator(proto_or_path).run(None, {"pixels": x.astype(np.float32)})[0]
    assert out.dtype == np.float32 and out.shape == ref.shape
    scale = np.abs(ref).max()
    assert scale > 0
    assert np.abs(out - ref).max() <= 1e-4 * scale, (np.abs(out - ref).max(), scale)
    assert np.array_equal(out.argmax(axis=1), ref.argmax(axis=1))


# ------------------------------------------------------------------- every model, real runs
@pytest.mark.parametrize("name", list(RUNS))
def test_cli_export_computes_the_runs_logits(trained, name):
    root, runs, _ = trained
    out = root / f"{name}.onnx"
    p = cli("export", runs[name], "--onnx", out, "--checkpoint", "last", cwd=root)
    assert p.returncode == 0, (p.stdout, p.stderr)
    size = export_onnx.human_size(out.stat().st_size)
    words = ("channel mean/std" if RUNS[name][2] == "channel"
             else "mean-image (the mean training image subtracted)")
    assert p.stdout == (f"wrote {out} ({size}): input float32 (N, 3, 32, 32) pixels 0..255, "
                        f"normalisation {words} inside the graph\n")
    assert p.stderr == ""
    onnx.checker.check_model(str(out), full_check=True)
    proto = onnx.load(str(out))
    assert proto.opset_import[0].version == export_onnx.OPSET and proto.ir_version == 8
    assert {n.domain for n in proto.graph.node} == {""}  # standard operators only
    (inp,), (outp,) = proto.graph.input, proto.graph.output
    assert inp.name == "pixels" and outp.name == "logits"
    dims = [d.dim_param or d.dim_value for d in inp.type.tensor_type.shape.dim]
    assert dims == ["N", 3, 32, 32]
    assert [d.dim_param or d.dim_value for d in outp.type.tensor_type.shape.dim] == ["N", 10]
    props = {p.key: p.value for p in proto.metadata_props}
    assert props["partrain.model"] == RUNS[name][0]
    assert props["partrain.class_names"] == str(CLASS_NAMES).replace("'", '"')
    r = api.load_run(runs[name], checkpoint="last")  # what evaluate computes
    x = images()
    assert_same_logits(str(out), partrain_logits(r.model, r.scale, r.shift, x), x)
    assert_same_logits(str(out), partrain_logits(r.model, r.scale, r.shift, x[:1]), x[:1])


def test_trained_runs_have_non_trivial_batch_norm(trained):
    """The comparison above means something for BN only if its statistics were learned."""
    _, runs, _ = trained
    for name in ("vgg", "airbench"):
        model = api.load_run(runs[name], checkpoint="last").model
        bns = [l for l in model.layers if isinstance(l, BatchNorm)]
        assert bns and all(np.abs(l.s["running_mean"]).max() > 1e-3 for l in bns)
        assert all(np.abs(l.s["running_var"] - 1).max() > 1e-3 for l in bns)
        assert all(np.abs(l.p["beta"]).max() > 0 for l in bns)


# ------------------------------------------------------ models made directly, random params
def random_model(name, rng, **options):
    """A bound model whose every parameter and statistic is random, none at its init value."""
    m = build_model(name, **options)
    m.bind(np.zeros(m.layout.size, np.float32), None, np.zeros(m.state_layout.size, np.float32))
    m.init_params(rng)
    m.params += rng.normal(0, 0.02, m.params.shape).astype(np.float32)
    for layer in m.layers:
        if isinstance(layer, BatchNorm):
            layer.s["running_mean"][...] = rng.normal(0, 0.3, layer.c)
            layer.s["running_var"][...] = rng.uniform(0.3, 3.0, layer.c)
    return m


@pytest.mark.parametrize("name, options", [
    ("three-layer", dict(num_filters=3, hidden_dim=8, input_size=16)),
    ("vgg", dict(widths=(3, 5, 6))),
    ("airbench", dict(widths=(6, 8, 10), head_scale=0.5, whiten_bias=False)),
    ("airbench", dict(widths=(6, 8, 10), gelu="erf")),
])
def test_direct_models_with_random_parameters(name, options):
    """Other shapes and options than the runs': a 16 x 16 input (the size comes from the model),
    gamma in use (vgg), airbench without its whitening bias and with another head scale, and
    with the exact (erf) GELU."""
    rng = np.random.default_rng(3)
    m = random_model(name, rng, **options)
    scale, shift = normaliser(rng.uniform(90, 160, 3), rng.uniform(40, 80, 3))
    proto = export_onnx.onnx_model(m, scale, shift)
    dims = [d.dim_param or d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["N", *m.input_shape]
    side = m.input_shape[1]
    x = rng.integers(0, 256, (120, 3, side, side), dtype=np.uint8)
    assert_same_logits(proto, partrain_logits(m, scale, shift, x), x)


def _has_shape_options(name):
    return {"num_classes", "input_size"} <= set(inspect.signature(MODELS[name]).parameters)


@pytest.mark.parametrize("name, options", [
    ("linear", {}), ("three-layer", dict(num_filters=3, hidden_dim=8)),
    ("vgg", dict(widths=(3, 4, 5))), ("airbench", dict(widths=(4, 6, 8))),
])
def test_input_size_and_class_count_come_from_the_model(name, options):
    """7 classes of 24 x 24 images (model options input_size, num_classes): the graph's input
    and output shapes are the model's, and its logits partrain's."""
    if not _has_shape_options(name):
        pytest.skip(f"model {name} has no options input_size and num_classes yet")
    rng = np.random.default_rng(5)
    m = random_model(name, rng, num_classes=7, input_size=24, **options)
    scale, shift = normaliser(rng.uniform(90, 160, 3), rng.uniform(40, 80, 3))
    proto = export_onnx.onnx_model(m, scale, shift)
    shape = [[d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
             for v in (proto.graph.input[0], proto.graph.output[0])]
    assert shape == [["N", 3, 24, 24], ["N", 7]]
    x = rng.integers(0, 256, (60, 3, 24, 24), dtype=np.uint8)
    assert_same_logits(proto, partrain_logits(m, scale, shift, x), x)


def test_unknown_layer_type_is_refused_by_name():
    class LeakyReLU(ReLU):  # a subclass may compute something else: never exported as its base
        pass
    m = build_model("three-layer", num_filters=2, hidden_dim=4)
    m.layers[6] = LeakyReLU()
    m.bind(np.zeros(m.layout.size, np.float32), None, None)
    with pytest.raises(PartrainError, match=r"layer relu6 \(LeakyReLU\) has no ONNX translation"):
        export_onnx.onnx_model(m, *normaliser(np.zeros(3), np.ones(3)))


def test_human_size():
    assert [export_onnx.human_size(n) for n in (0, 1023, 1024, 123422, 8 << 20)] == [
        "0 B", "1023 B", "1.0 KiB", "120.5 KiB", "8.0 MiB"]


# ----------------------------------------------------------------------------- bad input
def test_missing_run_folder(trained, tmp_path):
    root, _, _ = trained
    p = cli("export", tmp_path / "runs" / "nope", "--onnx", tmp_path / "m.onnx", cwd=root)
    assert_one_error(p, "nope")
    assert list(tmp_path.iterdir()) == []


def test_output_in_a_missing_folder(trained, tmp_path):
    root, runs, _ = trained
    out = tmp_path / "missing" / "m.onnx"
    p = cli("export", runs["linear"], "--onnx", out, cwd=root)
    assert_one_error(p, "does not exist", str(out.parent))
    assert list(tmp_path.iterdir()) == []


def test_output_is_a_folder(trained, tmp_path):
    root, runs, _ = trained
    p = cli("export", runs["linear"], "--onnx", tmp_path, cwd=root)
    assert_one_error(p, "is a folder")
    assert list(tmp_path.iterdir()) == []


def test_missing_store_names_data_dir(trained, tmp_path):
    root, runs, _ = trained
    p = cli("export", runs["linear"], "--onnx", tmp_path / "m.onnx", "--data-dir", tmp_path,
            cwd=root)
    assert_one_error(p, "no dataset at", "cifar10.h5")
    assert list(tmp_path.iterdir()) == []


# The onnx package made unimportable the way an absent one is: a finder first on sys.meta_path
# raises ModuleNotFoundError for it, as the import system does when no finder has it.
NO_ONNX = """\
import sys
class NoOnnx:
    def find_spec(self, name, path=None, target=None):
        if name == "onnx" or name.startswith("onnx."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, NoOnnx())
from partrain.cli import main
main(sys.argv[1:], prog_name="partrain")
"""


def test_without_onnx_says_how_to_install_it(trained, tmp_path):
    root, runs, _ = trained
    p = cli("export", runs["linear"], "--onnx", tmp_path / "m.onnx", cwd=root,
            argv0=("-c", NO_ONNX))
    assert_one_error(p, "needs the onnx package", "pip install 'partrain[onnx]'")
    assert list(tmp_path.iterdir()) == []
    p = cli("--help", cwd=root, argv0=("-c", NO_ONNX))  # the other commands do not need it
    assert p.returncode == 0 and "export" in p.stdout, p.stderr


def test_existing_file_is_replaced_by_a_rename(trained, tmp_path):
    """A hard link to the old file keeps the old bytes: the new file is a new inode put in
    place by os.replace, never the old one truncated and rewritten."""
    root, runs, _ = trained
    out, link = tmp_path / "m.onnx", tmp_path / "old-link"
    out.write_bytes(b"old model")
    os.link(out, link)
    inode = out.stat().st_ino
    p = cli("export", runs["vgg"], "--onnx", out, cwd=root)
    assert p.returncode == 0, p.stderr
    assert out.stat().st_ino != inode and link.read_bytes() == b"old model"
    onnx.checker.check_model(str(out))
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~umask  # an ordinary file's mode
    assert leftovers(tmp_path) == []


def test_failed_export_leaves_an_existing_file_alone(trained, tmp_path):
    root, runs, _ = trained
    out = tmp_path / "m.onnx"
    out.write_bytes(b"old model")
    p = cli("export", runs["vgg"], "--onnx", out, "--data-dir", tmp_path / "nothing", cwd=root)
    assert_one_error(p, "no dataset at")
    assert out.read_bytes() == b"old model" and leftovers(tmp_path) == []


@pytest.mark.parametrize("exc", [OSError(28, "No space left on device"), KeyboardInterrupt()])
def test_write_failing_midway_leaves_old_file_and_no_temp(tmp_path, monkeypatch, exc):
    out = tmp_path / "m.onnx"
    out.write_bytes(b"old model")

    def fail(fd):  # the bytes are written, not yet on disk nor renamed
        raise exc
    monkeypatch.setattr(os, "fsync", fail)  # rundir.write_atomic, which export uses
    with pytest.raises(type(exc)):
        export_onnx.write_atomic(out, b"new model" * 1000)
    assert out.read_bytes() == b"old model" and leftovers(tmp_path) == []

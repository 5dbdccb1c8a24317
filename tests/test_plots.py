"""The figures: files exist, are real PNGs of the expected size (history.csv: test_rundir.py);
`partrain plot --filters / --features` through real processes, bad input as one line."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from matplotlib.image import imread

from partrain.errors import PartrainError
from partrain.plots import plot_confusion, plot_runs, plot_scaling
from partrain.plots_filters import feature_stages, filter_grid, first_image_conv
from partrain.rundir import RunDir

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
           "truck"]


def write_run(run_dir, seed=0, epochs=6, steps_per_epoch=100, final_acc=0.55):
    """A plausible synthetic run: noisy decaying loss, rising accuracies."""
    rng = np.random.default_rng(seed)
    run_dir.mkdir(parents=True, exist_ok=True)
    run = RunDir(run_dir)
    step = 0
    for epoch in range(1, epochs + 1):
        losses = []
        for _ in range(steps_per_epoch):
            step += 1
            loss = 2.3 * np.exp(-step / (150 + 50 * seed)) + 0.9 + 0.15 * rng.standard_normal()
            losses.append(loss)
            run.append_history({"kind": "step", "epoch": epoch, "step": step, "loss": loss,
                                "lr": 1e-3 * 0.95 ** epoch, "images_per_s": 900 + rng.uniform()})
        val = final_acc * (1 - np.exp(-epoch / 2.0))
        run.append_history({"kind": "epoch", "epoch": epoch, "step": step,
                            "train_acc": min(1.0, val * 1.15), "val_acc": val,
                            "time_s": 10.0 * epoch, "loss": float(np.mean(losses))})
    return run


def assert_png(path, min_width=700):
    assert path.is_file() and path.stat().st_size > 10_000
    image = imread(path)
    assert image.ndim == 3 and image.shape[2] in (3, 4) and image.shape[1] >= min_width
    assert image.std() > 0.01  # not blank
    return image


def test_plot_runs_overlays_several_runs(tmp_path):
    runs = [tmp_path / "adam-lr1e-3", tmp_path / "sgd-momentum"]
    write_run(runs[0], seed=0)
    write_run(runs[1], seed=1, final_acc=0.48)
    paths = plot_runs(runs, tmp_path / "fig", pdf=True)
    assert [p.name for p in paths] == ["loss.png", "loss.pdf", "accuracy.png", "accuracy.pdf"]
    for p in paths:
        if p.suffix == ".png":
            assert_png(p)
        else:
            assert p.read_bytes()[:5] == b"%PDF-"


def test_plot_runs_single_run_and_missing(tmp_path):
    write_run(tmp_path / "one", epochs=1, steps_per_epoch=5)
    paths = plot_runs([tmp_path / "one"], tmp_path / "fig")
    assert [p.name for p in paths] == ["loss.png", "accuracy.png"]
    for p in paths:
        assert_png(p)
    with pytest.raises(PartrainError, match="no history.csv yet"):
        plot_runs([tmp_path / "nothing"], tmp_path / "fig")


def test_plot_confusion(tmp_path):
    rng = np.random.default_rng(0)
    m = rng.integers(0, 40, (10, 10)) + np.diag(rng.integers(400, 900, 10))
    out = plot_confusion(m, CLASSES, tmp_path / "confusion.png")
    assert_png(out, min_width=600)
    with pytest.raises(ValueError, match="shape"):
        plot_confusion(m[:9], CLASSES, tmp_path / "bad.png")


def test_plot_scaling(tmp_path):
    rows = []
    for reduction, serial in (("parent", 0.25), ("sharded", 0.05)):
        for batch in (50, 200):
            base = 800.0 if batch == 50 else 950.0
            for w in (1, 2, 4, 8):
                speedup = 1 / (serial + (1 - serial) / w)
                rows.append({"workers": w, "batch": batch, "reduction": reduction,
                             "images_per_s": base * speedup, "efficiency": speedup / w})
    out = plot_scaling(rows, tmp_path / "scaling.png")
    assert_png(out, min_width=1000)
    with pytest.raises(ValueError, match="bad scaling row"):
        plot_scaling([{"workers": 1}], tmp_path / "bad.png")


# -- first-layer filters and feature maps (issue 14) -------------------------------------------

def test_filter_grid_tiles_gaps_and_range():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((10, 3, 5, 5))
    w[9] = 0.25  # a constant filter: mid-grey
    grid = filter_grid(w)
    assert grid.shape == (3 * 5 + 2, 4 * 5 + 3, 3)  # ceil(sqrt 10) = 4 columns, 3 rows
    assert grid.min() >= 0 and grid.max() <= 1
    assert (grid[[5, 11]] == 1).all() and (grid[:, [5, 11, 17]] == 1).all()  # 1-pixel gaps
    tiles = [grid[r * 6:r * 6 + 5, c * 6:c * 6 + 5] for r in range(3) for c in range(4)]
    assert sum(not (t == 1).all() for t in tiles) == 10
    assert (tiles[10] == 1).all() and (tiles[11] == 1).all()  # the unused cells
    for i in range(9):  # each over its own min..max, the three colours together
        assert tiles[i].min() == 0 and tiles[i].max() == 1
        assert np.allclose(tiles[i], (w[i].transpose(1, 2, 0) - w[i].min()) / np.ptp(w[i]))
    assert (tiles[9] == 0.5).all()
    big = filter_grid(w[:4], gap=1, upscale=3)  # nearest-neighbour: each pixel 3 x 3
    assert big.shape == (2 * 15 + 1, 2 * 15 + 1, 3)
    assert np.array_equal(big[:15, :15], filter_grid(w[:1]).repeat(3, 0).repeat(3, 1))
    with pytest.raises(ValueError, match="not RGB"):
        filter_grid(w[:, :2])


def test_first_image_conv_per_model():
    from partrain.nn.models import build_model
    found = {}
    for name in ("three-layer", "vgg", "airbench"):
        model = build_model(name)
        params = np.zeros(model.layout.size, model.dtype)
        state = np.arange(model.state_layout.size, dtype=model.dtype)
        model.bind(params, None, state)
        layer_name, layer, w = first_image_conv(model)
        found[name] = (layer_name, w.shape)
        if name == "airbench":  # the whitening filters are model state
            assert np.array_equal(w, model.state_layout.views(state)["whiten.w"])
    assert found == {"three-layer": ("conv1", (32, 3, 7, 7)), "vgg": ("conv00", (64, 3, 3, 3)),
                     "airbench": ("whiten", (24, 3, 2, 2))}
    linear = build_model("linear")
    linear.bind(np.zeros(linear.layout.size, linear.dtype), None, None)
    with pytest.raises(PartrainError, match="no convolution reading the image"):
        first_image_conv(linear)


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory):
    """A finished tiny course-model run, a linear one and a copy without checkpoints, on one
    store; and an image file: (root, conv_run, linear_run, no_checkpoint_run, image)."""
    import shutil
    from PIL import Image
    from partrain.config import TrainConfig
    from partrain.datasets.store import load_store
    from partrain.train import fit
    from synthetic import make_tiny_store
    root = tmp_path_factory.mktemp("filters")
    store = make_tiny_store(root / "data" / "cifar10.h5")
    runs = {}
    for name, model, options in (("conv", "three-layer", {"num_filters": 6, "hidden_dim": 16}),
                                 ("linear", "linear", {})):
        runs[name] = root / "runs" / name
        runs[name].mkdir(parents=True)
        fit(TrainConfig(model=model, model_options=options, batch_size=50, epochs=1,
                        val_size=50, data=str(store), log_every=5), runs[name], quiet=True)
    bare = root / "runs" / "bare"
    shutil.copytree(runs["conv"], bare)
    for f in ("best.h5", "checkpoint.h5"):
        (bare / f).unlink()
    image = root / "photo.png"
    pixels = load_store(store, splits=("test",)).test_images[3].transpose(1, 2, 0)
    Image.fromarray(pixels).resize((64, 64)).save(image)
    return root, runs["conv"], runs["linear"], bare, image


def test_plot_filters_and_features_write_pngs(tiny_runs):
    root, run, _, _, image = tiny_runs
    p = subprocess.run([sys.executable, "-m", "partrain.cli", "plot", str(run), "--filters",
                        "--features", str(image)], cwd=root, capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 0, (p.stdout, p.stderr)
    assert p.stdout.splitlines() == [f"wrote {run / 'features.png'}",
                                     f"wrote {run / 'filters.png'}"]
    filters = assert_png(run / "filters.png", min_width=800)
    assert filters.shape[0] >= 400
    features = assert_png(run / "features.png", min_width=1000)
    assert features.shape[0] >= 300
    assert not (run / "loss.png").exists()  # the flags replace the curves


def test_feature_stages_are_the_model_forward(tiny_runs):
    _, run, _, _, _ = tiny_runs
    from partrain.evaluate import load_run
    model, _, _ = load_run(run)
    x = np.random.default_rng(0).standard_normal((1, 3, 32, 32)).astype(model.dtype)
    stages, logits = feature_stages(model, x)
    assert [(label, maps.shape, total) for label, maps, total in stages] == [
        ("conv1", (6, 32, 32), 6), ("maxpool2 → conv1_bias (+ReLU)", (6, 16, 16), 6)]
    assert np.allclose(logits, model.logits(x)[0], rtol=1e-5, atol=1e-6)
    assert len(feature_stages(model, x, max_stages=1, max_channels=2)[0][0][1]) == 2


def _not_an_image(root):
    bad = root / "notes.png"
    bad.write_text("this is text, not a PNG\n")
    return bad


BAD_PLOTS = {
    # name: (arguments, given (root, conv run, linear run, bare run), words in the error line)
    "missing-image": (lambda root, run, lin, bare: [run, "--features", root / "nope.png"],
                      "does not exist"),
    "not-an-image": (lambda root, run, lin, bare: [run, "--features", _not_an_image(root)],
                     "not an image"),
    "no-checkpoint-filters": (lambda root, run, lin, bare: [bare, "--filters"],
                              "has no checkpoint yet"),
    "no-checkpoint-features": (lambda root, run, lin, bare: [bare, "--features",
                                                             root / "photo.png"],
                               "has no checkpoint yet"),
    "linear-filters": (lambda root, run, lin, bare: [lin, "--filters"],
                       "no convolution reading the image"),
    "linear-features": (lambda root, run, lin, bare: [lin, "--features", root / "photo.png"],
                        "makes no feature maps"),
    "two-runs": (lambda root, run, lin, bare: [run, lin, "--filters"], "draw one run"),
    "checkpoint-without-flag": (lambda root, run, lin, bare: [run, "--checkpoint", "last"],
                                "go with --filters or --features"),
}


def test_plot_filters_features_bad_input_is_one_line(tiny_runs):
    """Each case a real `partrain plot` process, all started at once (a process costs ~1 s of
    imports): exit code 1, one `Error:` line, no traceback, no figure written."""
    root, run, lin, bare, _ = tiny_runs
    procs = {case: subprocess.Popen(
        [sys.executable, "-m", "partrain.cli", "plot", *map(str, args(root, run, lin, bare))],
        cwd=root, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for case, (args, _) in BAD_PLOTS.items()}
    for case, proc in procs.items():
        out, err = proc.communicate(timeout=120)
        lines = err.strip().splitlines()
        assert proc.returncode == 1, (case, out, err)
        assert len(lines) == 1 and lines[0].startswith("Error: "), (case, err)
        assert BAD_PLOTS[case][1] in lines[0], (case, lines[0])
    for folder in (lin, bare):
        assert not list(folder.glob("*.png")), folder


def test_confusion_of_many_classes_stays_legible(tmp_path, monkeypatch):
    """CIFAR-100: no per-cell counts past 20 classes, at most 40 tick names (every k-th)."""
    from partrain import plots
    seen = {}
    real_save = plots._save

    def keep(fig, path, pdf):
        ax = fig.axes[0]
        seen.update(texts=len(ax.texts), xticks=len(ax.get_xticks()), title=ax.get_title())
        return real_save(fig, path, pdf)
    monkeypatch.setattr(plots, "_save", keep)
    names = [f"c{i}" for i in range(100)]
    m = np.random.default_rng(0).integers(0, 3, (100, 100))
    path = plots.plot_confusion(m, names, tmp_path / "c.png")
    assert path.stat().st_size > 0
    assert seen["texts"] == 0 and seen["xticks"] == 34 and "one class name in 3" in seen["title"]
    plots.plot_confusion(m[:10, :10], names[:10], tmp_path / "d.png")
    assert seen["texts"] == 100 and seen["xticks"] == 10

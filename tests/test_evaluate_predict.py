"""`partrain plot`, `evaluate` and `predict`: the files each writes, what each prints, and that the
numbers are right (evaluate agrees with the training loop; an image file predicts like the same
test image by index)."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from matplotlib.image import imread

from partrain.errors import PartrainError
from partrain.evaluate import confusion_matrix, evaluate_run
from partrain.predict import format_predictions, load_image, predict_run, softmax
from partrain.config import TrainConfig
from partrain.train import fit
from synthetic import CLASS_NAMES, make_tiny_store, write_gray_png


def cli(*args, cwd):
    p = subprocess.run([sys.executable, "-m", "partrain.cli", *map(str, args)], cwd=cwd,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, (p.stdout, p.stderr)
    assert "Traceback" not in p.stderr
    return p


def assert_png(path, min_width=700):
    assert path.is_file()
    image = imread(path)
    assert image.ndim == 3 and image.shape[1] >= min_width and image.std() > 0.01


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Two finished tiny runs (in-process, fast) on one store: (root, run_a, run_b, store)."""
    root = tmp_path_factory.mktemp("runs")
    store = make_tiny_store(root / "data" / "cifar10.h5")
    runs = []
    for name, lr in (("a", 3e-3), ("b", 1e-3)):
        run = root / "runs" / name
        run.mkdir(parents=True)
        fit(TrainConfig(model_options={"num_filters": 4, "hidden_dim": 16}, batch_size=25,
                        epochs=3, val_size=50, data=str(store), log_every=2, lr=lr), run, quiet=True)
        runs.append(run)
    return root, runs[0], runs[1], store


def test_plot_one_run_several_runs_and_docs_folder(trained):
    root, a, b, _ = trained
    p = cli("plot", a, cwd=root)
    assert p.stdout.split() == ["wrote", str(a / "loss.png"), "wrote", str(a / "accuracy.png")]
    assert_png(a / "loss.png")
    assert_png(a / "accuracy.png")
    # The rest in this process (a subprocess per figure costs a matplotlib import each).
    from click.testing import CliRunner
    from partrain.cli import main
    r = CliRunner().invoke(main, ["plot", str(a), str(b)])  # overlaid, beside the runs
    assert r.exit_code == 0, r.output
    for name in ("loss.png", "accuracy.png"):
        assert_png(root / "runs" / "compare" / name)
    r = CliRunner().invoke(main, ["plot", str(a), "--out", str(root / "docs"), "--pdf"])
    assert r.exit_code == 0, r.output  # `--out docs/`: the README convention
    for name in ("loss.png", "accuracy.png", "loss.pdf", "accuracy.pdf"):
        assert (root / "docs" / name).stat().st_size > 1000
    assert (root / "docs" / "loss.pdf").read_bytes().startswith(b"%PDF")


def test_evaluate_prints_per_class_and_writes_confusion(trained):
    root, a, _, _ = trained
    p = cli("evaluate", a, "--checkpoint", "last", cwd=root)
    lines = p.stdout.splitlines()
    summary = json.loads((a / "summary.json").read_text())
    assert f"test accuracy {summary['test_acc']:.2%}" in p.stdout  # the loop's own number
    for name in CLASS_NAMES:
        assert any(line.startswith(name + " ") and "/ 10" in line for line in lines), name
    assert_png(a / "confusion.png", min_width=600)
    result = json.loads((a / "evaluation.json").read_text())
    matrix = np.array(result["confusion"])
    assert matrix.shape == (10, 10) and matrix.sum() == 100
    assert result["test_accuracy"] == summary["test_acc"] == np.trace(matrix) / 100
    assert result["checkpoint"].endswith("checkpoint.h5")


def test_evaluate_best_into_another_folder(trained, tmp_path):
    _, a, _, store = trained
    r = evaluate_run(a, data_dir=store.parent, out_dir=tmp_path / "docs")
    assert r["checkpoint"].endswith("best.h5")
    assert (tmp_path / "docs" / "confusion.png").exists()
    assert (tmp_path / "docs" / "evaluation.json").exists()
    per_class = [c["accuracy"] for c in r["per_class"].values()]
    assert np.isclose(np.mean(per_class), r["test_accuracy"])  # 10 per class in the tiny store


def test_confusion_matrix_counts():
    m = confusion_matrix(np.array([0, 0, 1, 2]), np.array([0, 1, 1, 1]), 3)
    np.testing.assert_array_equal(m, [[1, 1, 0], [0, 1, 0], [0, 1, 0]])


def test_predict_test_indices_prints_top3(trained):
    root, a, _, _ = trained
    p = cli("predict", a, "--test-index", "0", "5", "9", cwd=root)
    lines = p.stdout.splitlines()
    assert [line.split()[0] for line in lines] == ["test[0]", "test[5]", "test[9]"]
    for line in lines:
        probs = [float(w.rstrip("%")) for w in line.split() if w.endswith("%")]
        assert len(probs) == 3 and probs == sorted(probs, reverse=True) and sum(probs) <= 100.05
        assert "(true: " in line


def test_image_file_predicts_like_the_same_test_image(trained, tmp_path):
    from PIL import Image
    from partrain.datasets.store import load_store

    _, a, _, store = trained
    image = load_store(store, splits=("test",)).test_images[7]
    png = tmp_path / "seven.png"
    Image.fromarray(image.transpose(1, 2, 0)).save(png)
    by_file = predict_run(a, [str(png)])["results"][0]
    by_index = predict_run(a, ["7"], test_index=True)["results"][0]
    assert by_file["top"] == by_index["top"]  # PNG is lossless and 32x32 needs no resize
    big = tmp_path / "big.jpg"  # any size, JPEG, non-square: cropped and resized
    Image.fromarray(image.transpose(1, 2, 0)).resize((96, 64)).save(big, quality=95)
    out = predict_run(a, [str(big), str(png)], top=5)
    assert [len(r["top"]) for r in out["results"]] == [5, 5]
    assert sum(p for _, p in out["results"][1]["top"]) <= 1 + 1e-9
    lines = format_predictions(out)
    assert lines[0].startswith(str(big)) and lines[1].startswith(str(png))


def test_load_image_modes_and_damage(tmp_path):
    from PIL import Image

    rgba = tmp_path / "clear.png"
    Image.new("RGBA", (50, 20), (0, 0, 0, 0)).save(rgba)
    x = load_image(rgba)
    assert x.shape == (3, 32, 32) and x.dtype == np.uint8 and (x == 255).all()  # on white
    gray = tmp_path / "gray.jpg"
    Image.new("L", (40, 40), 100).save(gray)
    assert abs(int(load_image(gray)[:, 16, 16].mean()) - 100) <= 2
    png = tmp_path / "cut.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)).save(png)
    png.write_bytes(png.read_bytes()[:300])
    with pytest.raises(PartrainError, match="damaged"):
        load_image(png)
    (tmp_path / "notes.png").write_text("not an image")
    with pytest.raises(PartrainError, match="not an image"):
        load_image(tmp_path / "notes.png")
    with pytest.raises(PartrainError, match="does not exist"):
        load_image(tmp_path / "missing.png")


def test_without_pillow_images_fail_clearly_and_indices_work(trained, monkeypatch, tmp_path):
    _, a, _, _ = trained
    for name in [m for m in sys.modules if m == "PIL" or m.startswith("PIL.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "PIL", None)  # `import PIL` now raises ImportError
    (tmp_path / "x.png").write_bytes(b"\x89PNG")
    with pytest.raises(PartrainError, match=r"needs Pillow: pip install 'partrain\[images\]'"):
        predict_run(a, [str(tmp_path / "x.png")])
    assert len(predict_run(a, ["1", "2"], test_index=True)["results"]) == 2


def test_softmax_is_stable():
    p = softmax(np.array([[1000.0, 0.0, -1000.0], [1.0, 1.0, 1.0]], np.float32))
    np.testing.assert_allclose(p.sum(axis=1), 1.0)
    assert p[0, 0] == 1.0 and np.allclose(p[1], 1 / 3)


def test_image_over_the_pixel_limit_is_refused_from_its_header(tmp_path):
    """D13: 25 Mpixel is more than a 32 x 32 classifier needs; refused before decoding."""
    png = write_gray_png(tmp_path / "wide.png", 5000, 5000)
    with pytest.raises(PartrainError, match=r"5000 x 5000 pixels, more than partrain reads "
                                            r"\(16 Mpixel"):
        load_image(png)
    ok = write_gray_png(tmp_path / "ok.png", 4096, 64, 90)
    assert load_image(ok)[:, 5, 5].tolist() == [90] * 3


def test_jpeg_over_the_pixel_limit_is_read_at_reduced_scale(tmp_path):
    """19 Mpixel is over the limit, but a JPEG is decoded at 1/8 scale (draft): 600 x 500."""
    from PIL import Image

    jpg = tmp_path / "photo.jpg"
    Image.new("RGB", (4800, 4000), (200, 30, 60)).save(jpg, quality=90)  # 19 Mpixel, 1/8 decoded
    x = load_image(jpg)
    assert x.shape == (3, 32, 32) and np.abs(x[:, 16, 16].astype(int) - [200, 30, 60]).max() <= 3


def test_huge_png_in_real_process_is_one_line_and_small(trained, tmp_path):
    """D13: a 10 000 x 10 000 PNG printed Pillow's DecompressionBombWarning (with a source line)
    and took about 530 MB; now one line, and the process stays small."""
    _, a, _, _ = trained
    png = write_gray_png(tmp_path / "huge.png", 10_000, 10_000)
    peak = tmp_path / "peak"  # VmHWM: this process's own peak (ru_maxrss counts the parent's)
    run_cli = ("import atexit, runpy, sys\n"
               "peak = sys.argv.pop(1)\n"
               "atexit.register(lambda: open(peak, 'w').write(next(\n"
               "    line for line in open('/proc/self/status') if line.startswith('VmHWM'))))\n"
               "runpy.run_module('partrain.cli', run_name='__main__')\n")
    with open(tmp_path / "err", "w") as err:
        p = subprocess.run([sys.executable, "-c", run_cli, str(peak), "predict", str(a), str(png)],
                           stdout=subprocess.DEVNULL, stderr=err, cwd=tmp_path, timeout=120)
    stderr = (tmp_path / "err").read_text()
    assert p.returncode == 1 and "Warning" not in stderr, stderr
    assert len(stderr.splitlines()) == 1 and stderr.startswith("Error: "), stderr
    assert "huge.png is too large to be read safely" in stderr
    assert int(peak.read_text().split()[1]) < 300 * 1024, peak.read_text()  # kB

"""`partrain prepare --images DIR / --csv FILE` (the user's own images) and CIFAR-100: every
path and every bad input, most as real processes (one `Error:` line, exit 1, no partial store,
a store already there left as it was)."""
from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from image_folders import add_trouble, make_cifar100_archive, make_folder, write_csv
from partrain.datasets import store

CLI = [sys.executable, "-m", "partrain.cli"]


def run(*args, cwd=None, check=None, env=None):
    p = subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, cwd=cwd,
                       timeout=600, env=env)
    if check is not None:
        assert p.returncode == check, (p.stdout, p.stderr[-3000:])
    return p


def assert_one_error(p, pattern: str):
    assert p.returncode == 1, (p.stdout, p.stderr[-3000:])
    errors = [line for line in p.stderr.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1 and "Traceback" not in p.stderr, p.stderr[-3000:]
    import re
    assert re.search(pattern, errors[0]), errors[0]
    assert p.stderr.strip().splitlines()[-1] == errors[0]


def sha(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.fixture
def folder(tmp_path):
    root = make_folder(tmp_path / "imgs")
    return root, add_trouble(root)


def test_folder_with_a_corrupt_file_stops_and_writes_nothing(tmp_path, folder):
    root, trouble = folder
    data = tmp_path / "data"
    p = run("prepare", "--images", root, "--data-dir", data)
    assert_one_error(p, rf"{trouble['bad']} is (not an image|a damaged image).*--skip-bad")
    assert not (data / store.FILENAME).exists()
    assert [f for f in data.iterdir()] == []  # no temp file either


def test_folder_with_skip_bad(tmp_path, folder):
    root, trouble = folder
    data = tmp_path / "data"
    p = run("prepare", "--images", root, "--data-dir", data, "--size", "24", "--skip-bad",
            check=0)
    assert "empty class" in p.stderr and "not images by their suffix" in p.stderr
    assert f"1 unreadable file(s) left out (--skip-bad): {trouble['bad']}" in p.stdout
    assert "1 duplicate file(s)" in p.stdout and str(trouble["dup"]) in p.stdout
    assert "images/s" in p.stdout
    d = store.load_store(data / store.FILENAME)
    assert d.class_names == ["blue", "green", "red"]  # the empty class is left out
    assert d.image_shape == (3, 24, 24) and d.schema_version == 2
    # 12 images a class (+1 duplicate in blue, +1 broken file in red), 20 % of each class's
    # files held out before decoding (the broken one may be among them)
    counts = np.bincount(d.train_labels, minlength=3) + np.bincount(d.test_labels, minlength=3)
    assert counts.tolist() == [13, 12, 12]
    assert np.bincount(d.test_labels, minlength=3).tolist() in ([3, 2, 3], [3, 2, 2])
    # images are centre crops: the brighter middle square sits in the middle of each image
    x = d.train_images.astype(np.float64)
    assert x[:, :, 10:14, 10:14].mean() > x[:, :, :3, :3].mean() + 20


def test_held_out_split_is_seeded(tmp_path, folder):
    root, _ = folder
    labels = {}
    for seed in (0, 0, 1):
        data = tmp_path / f"data{len(labels)}"
        run("prepare", "--images", root, "--data-dir", data, "--skip-bad", "--seed", seed,
            "--test-fraction", "0.25", "--quiet", check=0)
        d = store.load_store(data / store.FILENAME)
        labels[len(labels)] = d.test_images
    assert np.array_equal(labels[0], labels[1]) and not np.array_equal(labels[0], labels[2])


def test_test_folder_and_its_classes(tmp_path):
    train = make_folder(tmp_path / "train", per_class=6)
    test = make_folder(tmp_path / "test", per_class=2, seed=1,
                       colours={"red": (200, 40, 40), "blue": (40, 60, 200)})
    data = tmp_path / "data"
    run("prepare", "--images", train, "--images-test", test, "--data-dir", data, check=0)
    d = store.load_store(data / store.FILENAME)
    assert len(d.train_labels) == 18 and sorted(d.test_labels.tolist()) == [0, 0, 2, 2]
    (test / "purple").mkdir()
    make_folder(tmp_path / "extra", per_class=1, colours={"purple": (120, 0, 120)})
    (tmp_path / "extra" / "purple" / "000.png").rename(test / "purple" / "000.png")
    p = run("prepare", "--images", train, "--images-test", test, "--data-dir", data, "--force")
    assert_one_error(p, r"has classes the training images lack: \['purple'\]")
    p = run("prepare", "--images", train, "--images-test", test, "--test-fraction", "0.2",
            "--data-dir", data, "--force")
    assert_one_error(p, "nothing to hold out")


def test_csv_and_tsv_sources(tmp_path):
    root = make_folder(tmp_path / "imgs", per_class=5)
    rows = [(p.relative_to(tmp_path), p.parent.name) for p in sorted(root.rglob("*.*"))]
    write_csv(tmp_path / "all.csv", rows)
    write_csv(tmp_path / "all.tsv", rows, header=False, sep="\t")
    for name in ("all.csv", "all.tsv"):
        data = tmp_path / name.replace(".", "_")
        run("prepare", "--csv", tmp_path / name, "--data-dir", data, "--size", "16", check=0)
        d = store.load_store(data / store.FILENAME)
        assert d.class_names == ["blue", "green", "red"] and d.image_shape == (3, 16, 16)
        assert len(d.train_labels) + len(d.test_labels) == 15
    numeric = [(p, {"red": 10, "green": 2, "blue": 1}[lab]) for p, lab in rows]
    write_csv(tmp_path / "num.csv", numeric)
    run("prepare", "--csv", tmp_path / "num.csv", "--data-dir", tmp_path / "num", check=0)
    assert store.inspect_store(tmp_path / "num" / store.FILENAME).class_names == ["1", "2", "10"]


@pytest.mark.parametrize("rows, pattern", [
    ([("imgs/red/000.png", "red", "x")], r"line 2: expected 2 fields"),
    ([("imgs/red/000.png", "red"), ("imgs/red/nope.png", "red"), ("imgs/blue/000.png", "blue")],
     r"imgs/red/nope.png does not exist; pass --skip-bad"),
    ([("imgs/red/000.png", "red"), ("imgs/red/001.jpg", "")], r"line 3: empty label"),
    ([("imgs/red/000.png", "red"), ("imgs/red/001.jpg", "red")], r"1 class\(es\)"),
])
def test_bad_csv_is_one_line(tmp_path, rows, pattern):
    make_folder(tmp_path / "imgs", per_class=2)
    text = "path,label\n" + "\n".join(",".join(map(str, r)) for r in rows) + "\n"
    (tmp_path / "bad.csv").write_text(text)
    p = run("prepare", "--csv", tmp_path / "bad.csv", "--data-dir", tmp_path / "data")
    assert_one_error(p, pattern)
    assert not (tmp_path / "data" / store.FILENAME).exists()


def test_a_failed_rebuild_keeps_the_store_there(tmp_path, folder):
    root, trouble = folder
    data = tmp_path / "data"
    run("prepare", "--images", root, "--data-dir", data, "--skip-bad", check=0)
    before = sha(data / store.FILENAME)
    p = run("prepare", "--images", root, "--data-dir", data, "--force")
    assert_one_error(p, str(trouble["bad"]))
    assert sha(data / store.FILENAME) == before
    assert sorted(f.name for f in data.iterdir()) == [store.FILENAME]
    p = run("prepare", "--images", root, "--data-dir", data, check=0)  # valid: kept, said so
    assert "already exists and is valid" in p.stdout and sha(data / store.FILENAME) == before


@pytest.mark.parametrize("args, pattern", [
    (["--images", "nowhere"], "nowhere does not exist"),
    (["--images", "IMGS", "--size", "2"], r"--size must lie in 4\.\.1024"),
    (["--images", "IMGS", "--csv", "x.csv"], "give one source of training images"),
    (["--images", "IMGS", "--source", "x.tar.gz"], "give one of them"),
    (["--images", "IMGS", "--test-fraction", "1.5"], "between 0 and 1"),
    (["--size", "48"], "--size go with --images or --csv"),
    (["--images", "IMGS", "--labels", "coarse"], "--labels goes with a CIFAR-100 --source"),
])
def test_bad_arguments_are_one_line(tmp_path, args, pattern):
    make_folder(tmp_path / "IMGS", per_class=2)
    p = run("prepare", *args, "--data-dir", tmp_path / "data", cwd=tmp_path)
    assert_one_error(p, pattern)
    assert not (tmp_path / "data" / store.FILENAME).exists()


BLOCK_PIL = """
import sys
class NoPillow:
    def find_spec(self, name, path=None, target=None):
        if name == "PIL" or name.startswith("PIL."):
            raise ModuleNotFoundError(f"No module named {name!r}")
sys.meta_path.insert(0, NoPillow())
sys.argv = ["partrain"] + sys.argv[1:]
from partrain.entry import main
main()
"""


def test_without_pillow_one_line(tmp_path):
    make_folder(tmp_path / "imgs", per_class=2)
    p = subprocess.run([sys.executable, "-c", BLOCK_PIL, "prepare", "--images",
                        str(tmp_path / "imgs"), "--data-dir", str(tmp_path / "data")],
                       capture_output=True, text=True, timeout=300)
    assert_one_error(p, r"needs Pillow: pip install 'partrain\[images\]'")
    assert not (tmp_path / "data").exists() or not any((tmp_path / "data").iterdir())


def test_cifar100_fine_and_coarse(tmp_path):
    src, arrays = make_cifar100_archive(tmp_path / "cifar-100-python.tar.gz")
    for labels, k, column in (("fine", 100, 1), ("coarse", 20, 2)):
        data = tmp_path / labels
        p = run("prepare", "--source", src, "--labels", labels, "--data-dir", data, check=0)
        assert f"CIFAR-100 python layout, {labels} labels" in p.stdout
        assert f"({k} classes)" in p.stdout
        d = store.load_store(data / store.FILENAME)
        assert d.num_classes == k and d.class_names[:2] == [f"{labels}0", f"{labels}1"]
        assert np.array_equal(d.train_images, arrays["train"][0])
        assert np.array_equal(d.train_labels, arrays["train"][column])
        assert np.array_equal(d.test_labels, arrays["test"][column])
    cifar10 = tmp_path / "c10.tar.gz"
    from synthetic import make_binary_archive
    make_binary_archive(cifar10, n_per_batch=2, n_test=2)
    assert_one_error(run("prepare", "--source", cifar10, "--labels", "coarse", "--data-dir",
                         tmp_path / "c10"), "--labels coarse is for CIFAR-100")


def test_cifar100_damaged_labels(tmp_path):
    from image_folders import cifar100_members
    from synthetic import py2_pickle, write_tar
    members, _ = cifar100_members()
    members["cifar-100-python/test"] = py2_pickle(
        {b"data": np.zeros((2, 3072), np.uint8), b"fine_labels": [0, 100],
         b"coarse_labels": [0, 1]})
    src = write_tar(tmp_path / "bad.tar.gz", members)
    assert_one_error(run("prepare", "--source", src, "--data-dir", tmp_path / "d"),
                     r"cifar-100-python/test: fine label 100 is outside 0\.\.99")

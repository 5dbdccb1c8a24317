"""`partrain report` and the report.html that `fit` writes at the end of a run.

- A real tiny fit ends with report.html and names it; a report that cannot be drawn is a warning,
  never a failed run.
- The page is self-contained: no script, nothing fetched (no URL at all), every figure an inline
  PNG that decodes; it shows the run's own numbers. The confusion matrix comes from
  evaluation.json, or is computed for the page (the run folder gains nothing else), or is left
  out with a note when the data is gone. Several runs: compare.html with the settings that differ.
- In headless Chromium (Debian's `chromium`; skipped with the reason where it is missing): the
  page loads without a console error, every image decodes and has a size on screen, nothing
  overflows a laptop-wide window, it prints to PDF, and a screenshot of it is not blank. The
  checker is shown to catch a broken image and a script error, so that it can fail.
"""
from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from partrain.errors import PartrainError
from partrain.report_html import png_size
from synthetic import make_tiny_store

TINY = ["--workers", "1", "--model-option", "num_filters=4", "--model-option", "hidden_dim=16",
        "--batch-size", "10", "--val-size", "50", "--seed", "1"]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def cli(*args, cwd, rc=0) -> subprocess.CompletedProcess:
    p = subprocess.run([sys.executable, "-m", "partrain.cli", *map(str, args)], cwd=cwd,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == rc, (p.stdout, p.stderr)
    assert "Traceback" not in p.stderr
    return p


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Two finished tiny runs made by real `partrain fit` processes: (cwd, a, b, fit a's stdout)."""
    cwd = tmp_path_factory.mktemp("report")
    store = make_tiny_store(cwd / "data" / "cifar10.h5")
    procs = [subprocess.Popen([sys.executable, "-m", "partrain.cli", "fit", *TINY, "--data-dir",
                               str(store.parent), "--name", name, *extra], cwd=cwd, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for name, extra in (("a", ["--epochs", "2"]), ("b", ["--epochs", "3", "--lr", "3e-3"]))]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err
    return cwd, cwd / "runs" / "a", cwd / "runs" / "b", outs[0][0]


def images(page: str) -> list[bytes]:
    """The PNGs inlined in a page; asserts every image is one (nothing is fetched)."""
    srcs = re.findall(r'<img [^>]*src="([^"]*)"', page)
    assert srcs and all(s.startswith("data:image/png;base64,") for s in srcs), srcs[:1]
    pngs = [base64.b64decode(s.split(",", 1)[1], validate=True) for s in srcs]
    from matplotlib.image import imread
    for png in pngs:  # decodes to its end: a truncated PNG raises
        assert imread(io.BytesIO(png), format="png").std() > 0.01
    return pngs


def assert_static(page: str) -> None:
    """No script, no URL of any scheme but data:, and every inline image a PNG with a size."""
    text = re.sub(r"data:image/png;base64,[A-Za-z0-9+/=]*", "", page).lower()
    assert "<script" not in text and "javascript:" not in text
    assert not re.search(r"(?:https?|ftp|file):|//[a-z]|url\(|@import", text), \
        re.search(r".{0,40}(?:(?:https?|ftp|file):|//[a-z]|url\(|@import).{0,40}", text)
    for png in images(page):
        w, h = png_size(png)
        assert w > 100 and h > 100


def test_fit_writes_the_report_and_names_it(trained):
    cwd, a, _, out = trained
    assert out.splitlines()[-1].startswith("next: open runs/a/report.html (the run at a glance)"), out
    page = (a / "report.html").read_text()
    assert_static(page)
    summary = json.loads((a / "summary.json").read_text())
    assert f"{100 * summary['test_acc']:.2f}%" in page
    assert f"{100 * summary['best_val_acc']:.2f}%" in page
    for section in ("summary", "curves", "test", "filters", "settings"):
        assert f'<section id="{section}">' in page
    assert len(images(page)) == 3  # loss, accuracy, filters: fit does no second test pass
    assert "No confusion matrix" in page and "partrain evaluate runs/a" in page
    assert not list(a.glob(".*tmp*"))


def test_confusion_from_evaluation_json_computed_or_left_out(trained, tmp_path):
    cwd, a, _, _ = trained
    before = sorted(p.name for p in a.iterdir())
    cli("report", a, cwd=cwd)  # no evaluation.json: computed for the page, nothing else written
    assert sorted(p.name for p in a.iterdir()) == before
    page = (a / "report.html").read_text()
    assert "computed for this report on the test images of" in page
    assert len(images(page)) == 4
    cli("evaluate", a, cwd=cwd)
    p = cli("report", "runs/a", cwd=cwd)
    assert p.stdout == "wrote runs/a/report.html\n"
    page = (a / "report.html").read_text()
    assert "from evaluation.json" in page
    evaluation = json.loads((a / "evaluation.json").read_text())
    for name, c in evaluation["per_class"].items():
        assert f"<td>{name}</td><td class=num>{100 * c['accuracy']:.2f}%</td>" in page
    # the data gone and no evaluation.json: the page says so, and still draws the rest
    moved = tmp_path / "elsewhere"
    shutil.copytree(a, moved / "a")
    (moved / "a" / "evaluation.json").unlink()
    meta = json.loads((moved / "a" / "config.json").read_text())
    meta["config"]["data"] = str(tmp_path / "gone" / "cifar10.h5")
    (moved / "a" / "config.json").write_text(json.dumps(meta))
    cli("report", moved / "a", cwd=tmp_path)
    page = (moved / "a" / "report.html").read_text()
    assert "No confusion matrix" in page and "cannot be computed now" in page
    assert_static(page)
    cli("report", moved / "a", "--no-evaluate", "--out", tmp_path / "out", cwd=tmp_path)
    assert "No confusion matrix" in (tmp_path / "out" / "report.html").read_text()


def test_several_runs_are_compared(trained, tmp_path):
    cwd, a, b, _ = trained
    p = cli("report", "runs/a", "runs/b", cwd=cwd)
    assert p.stdout == "wrote runs/compare.html\n"
    page = (cwd / "runs" / "compare.html").read_text()
    assert_static(page)
    assert len(images(page)) == 2  # the curves, overlaid
    differ = page.split('<section id="settings">')[1].split("<h3>")[0]
    assert "<code>lr</code>" in differ and "<code>epochs</code>" in differ
    assert "<code>batch_size</code>" not in differ
    assert '<a href="a/report.html">a</a>' in page
    cli("report", a, b, "--out", tmp_path / "cmp", cwd=cwd)
    assert (tmp_path / "cmp" / "report.html").is_file()


def test_figures_are_drawn_in_the_run_folder_and_a_dead_report_s_are_cleared(trained):
    """A report killed while drawing (SIGKILL, e.g. fit's at the end of a run: the fault harness
    found one) left its figures' folder in /tmp for good; now it is in the page's folder, named
    by its pid, and the next report removes those of dead processes."""
    import tempfile
    from partrain.report import SCRATCH, write_report
    cwd, a, _, _ = trained
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (a / f"{SCRATCH}{dead.pid}").mkdir()
    before = set(os.listdir(tempfile.gettempdir()))
    write_report(a, evaluate=False)
    assert not list(a.glob(SCRATCH + "*"))
    assert not [n for n in set(os.listdir(tempfile.gettempdir())) - before
                if n.startswith("partrain-report")]


def test_bad_input_is_one_line_and_no_file(tmp_path):
    (tmp_path / "nothing").mkdir()
    p = cli("report", tmp_path / "nothing", cwd=tmp_path, rc=1)
    assert p.stderr.startswith("Error: ") and "not a partrain run folder" in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1
    assert list((tmp_path / "nothing").iterdir()) == []


def test_a_report_that_fails_is_a_warning_not_a_failed_run(tmp_path, monkeypatch, capsys):
    from partrain import report
    from partrain.config import TrainConfig
    from partrain.train import fit

    def broken(*args, **kwargs):
        raise PartrainError("no room on the disk")
    monkeypatch.setattr(report, "write_report", broken)
    store = make_tiny_store(tmp_path / "cifar10.h5", n_train=100, n_test=20)
    run = tmp_path / "r"
    run.mkdir()
    summary = fit(TrainConfig(model_options={"num_filters": 2, "hidden_dim": 4}, batch_size=25,
                              epochs=1, val_size=20, data=str(store)), run, quiet=True)
    assert summary["epochs_done"] == 1 and (run / "summary.json").exists()
    assert "warning: no report.html: no room on the disk" in capsys.readouterr().err
    assert not (run / "report.html").exists()


# ------------------------------------------------------------------------------ the browser
CHECK = """<script>
/* added by the test, not part of the report: what the page did, written into the DOM. holes:
   the image's fully transparent pixels once drawn (the report's figures are opaque, so any is
   data that did not decode: a truncated PNG still has its size) */
const errors = [];
window.addEventListener("error", e => errors.push(String(e.message || (e.target && e.target.alt)
                                                         || e.type).slice(0, 200)), true);
window.addEventListener("load", () => {
  const imgs = [...document.images].map(i => {
    const r = i.getBoundingClientRect();
    let holes = -1;
    try {
      const c = document.createElement("canvas");
      c.width = i.naturalWidth;
      c.height = i.naturalHeight;
      const g = c.getContext("2d");
      g.drawImage(i, 0, 0);
      const d = g.getImageData(0, 0, c.width, c.height).data;
      holes = 0;
      for (let k = 3; k < d.length; k += 4) holes += d[k] === 0;
    } catch (e) { holes = String(e).slice(0, 100); }
    return {alt: i.alt, natural: [i.naturalWidth, i.naturalHeight], shown: [r.width, r.height],
            holes};
  });
  const pre = document.createElement("pre");
  pre.id = "partrain-check";
  pre.textContent = JSON.stringify({imgs, errors, scroll: document.documentElement.scrollWidth,
                                    inner: window.innerWidth});
  document.body.appendChild(pre);
});
</script>"""


def chromium(tmp_path: Path, *args) -> subprocess.CompletedProcess:
    if CHROMIUM is None:
        pytest.skip("no chromium here (.ci/run installs Debian's chromium; apt-get install "
                    "chromium)")
    return subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu",
                           "--disable-dev-shm-usage", "--no-first-run", "--hide-scrollbars",
                           f"--user-data-dir={tmp_path / 'profile'}", "--enable-logging=stderr",
                           "--v=0", "--window-size=1280,2000", *map(str, args)],
                          capture_output=True, text=True, timeout=180)


def browser_check(page: Path, tmp_path: Path) -> tuple[dict, list[str]]:
    """Load a copy of `page` with CHECK added in headless Chromium: (what CHECK saw, the console
    lines Chromium logged)."""
    probe = tmp_path / f"probe-{page.name}"
    probe.write_text(page.read_text().replace("<head>", "<head>\n" + CHECK, 1))
    p = chromium(tmp_path, "--dump-dom", probe.as_uri())
    assert p.returncode == 0, p.stderr[-3000:]
    found = re.search(r'<pre id="partrain-check">(.*?)</pre>', p.stdout, re.S)
    assert found, p.stdout[-2000:]
    import html
    console = [line for line in p.stderr.splitlines() if ":CONSOLE" in line]
    return json.loads(html.unescape(found.group(1))), console


@pytest.mark.slow
def test_the_page_in_a_browser(trained, tmp_path):
    cwd, a, b, _ = trained
    cli("evaluate", a, cwd=cwd)
    cli("report", a, cwd=cwd)  # with every figure: curves, confusion matrix, filters
    seen, console = browser_check(a / "report.html", tmp_path)
    assert console == [] and seen["errors"] == []
    assert len(seen["imgs"]) == 4
    for img in seen["imgs"]:
        assert min(img["natural"]) > 0 and min(img["shown"]) > 50 and img["holes"] == 0, img
    assert seen["scroll"] <= seen["inner"]  # nothing wider than a laptop's window
    shot = tmp_path / "report.png"
    p = chromium(tmp_path, f"--screenshot={shot}", (a / "report.html").as_uri())
    assert p.returncode == 0 and shot.is_file(), p.stderr[-3000:]
    from matplotlib.image import imread
    pixels = imread(shot)
    assert pixels.shape[:2] == (2000, 1280) and pixels.std() > 0.05
    pdf = tmp_path / "report.pdf"
    p = chromium(tmp_path, f"--print-to-pdf={pdf}", "--no-pdf-header-footer",
                 (a / "report.html").as_uri())
    assert p.returncode == 0 and pdf.read_bytes().startswith(b"%PDF"), p.stderr[-3000:]
    assert pdf.stat().st_size > 50_000  # the figures are in it
    cli("report", a, b, cwd=cwd)
    seen, console = browser_check(cwd / "runs" / "compare.html", tmp_path)
    assert console == [] and seen["errors"] == [] and len(seen["imgs"]) == 2
    assert all(min(i["natural"]) > 0 and min(i["shown"]) > 50 and i["holes"] == 0
               for i in seen["imgs"])


@pytest.mark.slow
def test_the_browser_check_catches_a_broken_page(tmp_path):
    """The checker above, on a page with a truncated PNG, one that is no PNG and a failing
    script: each seen."""
    png = (Path(__file__).parent.parent / "docs" / "loss.png").read_bytes()
    page = tmp_path / "broken.html"
    page.write_text("<!DOCTYPE html><html><head><title>x</title></head><body>" + "".join(
        f'<img alt="{alt}" src="data:image/png;base64,{base64.b64encode(data).decode()}">'
        for alt, data in (("whole", png), ("cut", png[:len(png) // 2]), ("junk", b"\0" * 30)))
        + "<script>undefinedFunction();</script></body></html>")
    seen, console = browser_check(page, tmp_path)
    whole, cut, junk = seen["imgs"]
    assert whole["holes"] == 0 and min(whole["natural"]) > 0
    assert min(cut["natural"]) > 0 and cut["holes"] > 1000  # its size is known, half its pixels not
    assert junk["natural"] == [0, 0] and "junk" in seen["errors"]
    assert any("undefinedFunction" in e for e in seen["errors"])
    assert any("Uncaught ReferenceError" in line for line in console)

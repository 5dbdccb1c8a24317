"""`partrain plot RUN --filters` and `--features IMAGE`: what the first layers of a trained run see.

filters.png: the first convolution that reads the RGB image (the course model's conv1, airbench's
whitening conv, whose filters are model state, vgg's conv00) from the run's best checkpoint (else
its last one), each filter an RGB tile scaled over its own min..max (cs231n's visualize_grid), in
a near-square grid with a 1-pixel gap, enlarged pixel by pixel.

features.png: one image file, normalised as the run's training images were, through the network
in evaluation mode layer by layer; the feature maps at the end of each of the first few stages
(a layer, together with the per-channel layers right after it: bias, batch norm, activation), the
first MAX_CHANNELS channels of each, every map coloured over its own min..max.

Figures use matplotlib's object API as plots.py does; matplotlib is imported inside the functions.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .batches import make_batch
from .datasets.store import inspect_store
from .errors import PartrainError
from .evaluate import check_store_fits, data_path, load_run, run_scale_shift
from .nn.airbench import WhiteningConv
from .nn.layers import (BatchNorm, ChannelBias, Conv, GELU, ReLU, StepContext,
                        ToChannelsFirst)
from .plots import DPI, _save
from .predict import load_image, softmax

FILTERS_FILE, FEATURES_FILE = "filters.png", "features.png"
MAX_STAGES, MAX_CHANNELS = 4, 16
PER_CHANNEL = (ChannelBias, BatchNorm, ReLU, GELU)  # joined to the stage before them
GRID_PIXELS = 600  # the filter grid is enlarged to about this many pixels on its longer side
MAP_PIXELS = 64    # a feature map is enlarged to about this many pixels high


# -- grids ---------------------------------------------------------------------------------------

def scale_each(tiles: np.ndarray) -> np.ndarray:
    """Each tile (the first axis) scaled to 0..1 over its own min..max, in float64; a constant
    tile becomes 0.5."""
    t = np.asarray(tiles, np.float64)
    axes = tuple(range(1, t.ndim))
    lo, hi = t.min(axis=axes, keepdims=True), t.max(axis=axes, keepdims=True)
    span = hi - lo
    return np.where(span > 0, (t - lo) / np.where(span > 0, span, 1), 0.5)


def image_grid(tiles: np.ndarray, cols: int | None = None, gap: int = 1, upscale: int = 1,
               fill: float = 1.0) -> np.ndarray:
    """(N, h, w, 3) tiles as one (rows·(h·upscale + gap) - gap, cols·(w·upscale + gap) - gap, 3)
    image: row by row, `cols` to a row (default ceil(sqrt N), a near-square grid), each tile
    enlarged `upscale` times by repeating pixels, `gap` pixels of `fill` between them and in the
    unused cells of the last row."""
    t = np.asarray(tiles, np.float64)
    n, h, w = t.shape[:3]
    cols = cols or max(1, int(np.ceil(np.sqrt(n))))
    rows = -(-n // cols)
    t = t.repeat(upscale, axis=1).repeat(upscale, axis=2)
    h, w = h * upscale, w * upscale
    out = np.full((rows * (h + gap) - gap, cols * (w + gap) - gap) + t.shape[3:], fill)
    for i in range(n):
        r, c = divmod(i, cols)
        out[r * (h + gap):r * (h + gap) + h, c * (w + gap):c * (w + gap) + w] = t[i]
    return out


def filter_grid(w: np.ndarray, gap: int = 1, upscale: int = 1) -> np.ndarray:
    """Conv weights (F, 3, k, k) as an RGB grid: each filter scaled over its own min..max
    (cs231n's visualize_grid), white gaps (see `image_grid`)."""
    w = np.asarray(w)
    if w.ndim != 4 or w.shape[1] != 3:
        raise ValueError(f"filters of shape {w.shape} are not RGB (F, 3, k, k)")
    return image_grid(scale_each(w.transpose(0, 2, 3, 1)), gap=gap, upscale=upscale)


# -- the network -----------------------------------------------------------------------------

def first_image_conv(model) -> tuple[str, Conv, np.ndarray]:
    """(name, layer, weights (F, 3, k, k)) of the convolution that reads the image; PartrainError
    if the image is read by anything else first (the linear model) or the conv's input is not
    3 channels."""
    for name, layer in zip(model.layer_names, model.layers):
        if isinstance(layer, Conv):
            if layer.c_in != 3:
                raise PartrainError(f"model {model.name}'s first convolution {name} reads "
                                    f"{layer.c_in} channels, not an RGB image's 3: no filters "
                                    f"to draw")
            w = layer.p["w"] if "w" in layer.p else layer.s["w"]  # WhiteningConv: model state
            return name, layer, np.array(w, np.float64)
        if layer.params() or layer.state():
            break
    raise PartrainError(f"model {model.name} has no convolution reading the image: no filters "
                        f"to draw (--filters needs a convolutional model)")


def feature_stages(model, x: np.ndarray, max_stages: int = MAX_STAGES,
                   max_channels: int = MAX_CHANNELS):
    """Run the batch `x` (1, 3, H, W), normalised, through `model` in evaluation mode layer by
    layer; returns ([(label, maps (c, h, w) float64 of the first image, channels in all)] for the
    first `max_stages` stages, logits (n_classes,) float64). A stage ends with the last of the
    per-channel layers (PER_CHANNEL) after a layer that makes feature maps."""
    ctx = StepContext(train=False)
    layers, stages, names = model.layers, [], []
    h = x
    for i, (name, layer) in enumerate(zip(model.layer_names, layers)):
        h = layer.forward(h, ctx)
        if isinstance(layer, ToChannelsFirst) or h.ndim != 4 or len(stages) == max_stages:
            continue
        names.append(name + (" (+ReLU)" if getattr(layer, "fused_relu", False) else ""))
        if i + 1 < len(layers) and isinstance(layers[i + 1], PER_CHANNEL):
            continue
        # copied at once: the next layers may reuse their buffers
        stages.append((" → ".join(names), np.array(h[:max_channels, ..., 0], np.float64), h.shape[0]))
        names = []
    return stages, np.asarray(h, np.float64).reshape(len(x), -1)[0]


# -- figures ---------------------------------------------------------------------------------

def plot_first_layers(runs, out_dir, filters: bool, image, data_dir=None,
                      checkpoint: str = "best", pdf: bool = False) -> list[Path]:
    """`partrain plot RUN --filters --features IMAGE`: features.png if `image` is given, then
    filters.png if `filters`, of the one run in `runs`."""
    if len(runs) != 1:
        raise PartrainError(f"--filters and --features draw one run, got {len(runs)}")
    paths = []
    if image is not None:  # first: a bad image stops before any file is written
        paths += plot_features(runs[0], image, out_dir, data_dir, checkpoint, pdf)
    if filters:
        paths += plot_filters(runs[0], out_dir, checkpoint, pdf)
    return paths


def plot_filters(run: str | os.PathLike, out_dir: str | os.PathLike | None = None,
                 checkpoint: str = "best", pdf: bool = False) -> list[Path]:
    """filters.png (and .pdf) of the first convolution on the image, in out_dir (default: the run
    folder)."""
    run = Path(run)
    model, _, meta_run = load_run(run, checkpoint)
    name, layer, w = first_image_conv(model)
    grid = filter_grid(w, gap=1, upscale=max(1, -(-6 // layer.k)))  # tiles of >= 6 pixels
    zoom = max(1, GRID_PIXELS // max(grid.shape[:2]))
    grid = grid.repeat(zoom, axis=0).repeat(zoom, axis=1)
    lines = [f"{run.resolve().name}: first-layer filters, {name} "
             f"({w.shape[0]} filters, {layer.k}×{layer.k}×{layer.c_in})",
             f"model {model.name}, {_checkpoint_words(meta_run)}",
             "each filter scaled to its own min..max (R, G, B as in the image)"]
    if isinstance(layer, WhiteningConv):
        half = w.shape[0] // 2
        lines.insert(2, f"whitening filters: from the training images' {layer.k}×{layer.k} "
                        f"patches, not trained; the last {half} negate the first {half}")
    from matplotlib.figure import Figure
    gh, gw = grid.shape[:2]
    top, pad = 14 + 22 * len(lines), 16  # pixels: the title lines; the margin elsewhere
    width, height = max(gw + 2 * pad, 880), gh + top + pad
    fig = Figure(figsize=(width / DPI, height / DPI), dpi=DPI)
    # placed to the pixel: the enlarged grid is drawn 1:1, every gap equally wide (no resampling)
    ax = fig.add_axes(((width - gw) / 2 / width, pad / height, gw / width, gh / height))
    ax.imshow(grid, interpolation="nearest")
    ax.set_axis_off()
    for i, text in enumerate(lines):
        fig.text(0.5, 1 - (10 + 24 * min(i, 1) + 20 * max(i - 1, 0)) / height, text,
                 ha="center", va="top", fontsize=8.5 if i else 11,
                 color="0.3" if i else "black")
    return _save(fig, Path(out_dir if out_dir is not None else run) / FILTERS_FILE, pdf)


def plot_features(run: str | os.PathLike, image: str | os.PathLike,
                  out_dir: str | os.PathLike | None = None,
                  data_dir: str | os.PathLike | None = None, checkpoint: str = "best",
                  pdf: bool = False) -> list[Path]:
    """features.png (and .pdf): `image` (a file, read as `partrain predict` reads it) and the
    feature maps of the first stages of the run's network, in out_dir (default: the run folder)."""
    run = Path(run)
    model, config, meta_run = load_run(run, checkpoint)
    pixels = load_image(image, model.input_shape[1])  # (3, S, S) uint8, as the model reads
    path = data_path(config, data_dir)
    data = inspect_store(path)
    check_store_fits(data, meta_run, model, path, run)
    scale, shift = run_scale_shift(config, path, data)  # as the run's training did
    x, _ = make_batch(pixels[None], np.zeros(1, np.uint8), np.arange(1), scale, shift,
                      dtype=model.dtype)
    stages, logits = feature_stages(model, x)
    if not stages:
        raise PartrainError(f"model {model.name} makes no feature maps: nothing to draw "
                            f"(--features needs a convolutional model)")
    p = softmax(logits[None])[0]
    best = np.argsort(-p, kind="stable")[:3]
    lines = [f"{run.resolve().name}: feature maps for {Path(image).name}",
             f"model {model.name}, {_checkpoint_words(meta_run)}",
             "predicted: " + ", ".join(f"{data.class_names[j]} {p[j]:.0%}" for j in best),
             "each map coloured over its own min..max (dark: low, yellow: high; constant: green)"]
    fig = _features_figure(pixels, stages, lines)
    return _save(fig, Path(out_dir if out_dir is not None else run) / FEATURES_FILE, pdf)


def _features_figure(pixels: np.ndarray, stages, lines: list[str]):
    from matplotlib import colormaps
    from matplotlib.figure import Figure
    n = len(stages)
    fig = Figure(figsize=(9, 1.9 + 0.85 * n), dpi=DPI, layout="constrained")
    grid = fig.add_gridspec(1 + n, 2, width_ratios=(1, 4), height_ratios=(2.2,) + (1,) * n)
    ax = fig.add_subplot(grid[0, 0])
    ax.imshow(pixels.transpose(1, 2, 0), interpolation="nearest")
    ax.set_title(f"input, {pixels.shape[2]}×{pixels.shape[1]}", fontsize=9)
    ax.set_axis_off()
    text = fig.add_subplot(grid[0, 1])
    text.set_axis_off()
    text.text(0.0, 0.5, lines[0], fontsize=11, va="bottom", transform=text.transAxes)
    text.text(0.0, 0.45, "\n".join(lines[1:]), fontsize=8.5, va="top", color="0.3",
              linespacing=1.6, transform=text.transAxes)
    cmap = colormaps["viridis"]
    for i, (label, maps, total) in enumerate(stages):
        c, h, w = maps.shape
        tiles = cmap(scale_each(maps))[..., :3]
        mosaic = image_grid(tiles, cols=c, gap=2, upscale=max(1, round(MAP_PIXELS / h)))
        ax = fig.add_subplot(grid[1 + i, :])
        ax.imshow(mosaic, interpolation="nearest")
        ax.set_axis_off()
        ax.set_anchor("W")  # a row of fewer maps starts at the left, under its title
        shown = f"{c} of {total} channels" if c < total else f"{c} channels"
        ax.set_title(f"{label}: {shown}, {h}×{w}", fontsize=9, loc="left")
    return fig


def _checkpoint_words(meta_run: dict) -> str:
    """'best.h5 after epoch 3, best validation accuracy 61.2%' (what the checkpoint holds)."""
    ck = meta_run["checkpoint"]
    words = Path(ck["path"]).name
    if ck.get("epoch") is not None:
        words += f" after epoch {ck['epoch']}"
        words += f" and {ck['position']} steps" if ck.get("position") else ""
    if isinstance(ck.get("best_val"), (int, float)) and ck["best_val"] >= 0:
        words += f", best validation accuracy {ck['best_val']:.1%}"
    return words

"""Single-thread kernel benchmark: how close one training step comes to the machine's GEMM rate.

For a model at a few batch sizes it times forward, backward and the optimizer step separately
(median over repeats, one BLAS thread), converts to images/s and to a FLOP rate using the model's
nominal training FLOPs (3 × forward), and divides by the float32 1024×1024 GEMM rate measured in
the same run — so the ratio means the same thing on a noisy or a different machine.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
from threadpoolctl import threadpool_info, threadpool_limits

from .nn import functional as F
from .nn.layers import StepContext
from .nn.models import build_model
from .optim import make_optimizer


def median_ms(fn, repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return float(np.median(ts) * 1e3)


def gemm_rate(n: int = 1024, repeats: int = 10) -> float:
    """float32 n×n GEMM rate in GFLOP/s with the current BLAS thread setting."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    c = np.empty((n, n), np.float32)
    ms = median_ms(lambda: np.matmul(a, b, out=c), repeats)
    return 2 * n ** 3 / (ms * 1e-3) / 1e9


@dataclass
class StepBench:
    """One model's training step on fixed random data, ready to time: forward and backward
    (`forward_backward`), the optimizer (`optimizer_step`), or both (`full_step`)."""

    model: object
    params: np.ndarray
    grads: np.ndarray
    opt: object
    state: dict
    x: np.ndarray
    y: np.ndarray
    stats: np.ndarray | None
    t: int = 0

    def forward_backward(self) -> None:
        self.model.train_step(self.x, self.y, 1.0 / len(self.y), self.stats)

    def optimizer_step(self) -> None:
        self.t += 1
        self.opt.step(self.params, self.grads, self.state, self.t, 1e-4)

    def full_step(self) -> None:
        self.forward_backward()
        self.optimizer_step()


def step_bench(model_name: str, batch: int, optimizer: str = "adam",
               model_options: dict | None = None, build=build_model,
               make_opt=make_optimizer) -> StepBench:
    """A `StepBench` of `model_name` at `batch`. build / make_opt: the model and optimizer
    factories (scripts/ab_step.py passes an earlier commit's, to time both alike)."""
    model = build(model_name, **(model_options or {}))
    params = np.zeros(model.layout.size, model.dtype)
    grads = np.zeros_like(params)
    model.bind(params, grads, None)
    model.init_params(np.random.default_rng(0))
    hyper = {"weight_decay": model.weight_decay}
    if optimizer == "sgd":
        hyper["momentum"] = 0.9
    opt = make_opt(model, (optimizer, hyper))
    state = {k: np.zeros_like(params) for k in opt.state_names}
    rng = np.random.default_rng(1)
    x = rng.standard_normal((batch,) + model.input_shape, dtype=np.float32)
    y = rng.integers(0, model.n_classes, batch)
    stats = np.zeros(model.stats_size, model.dtype) if model.stats_size else None
    return StepBench(model, params, grads, opt, state, x, y, stats)


def bench_model(model_name: str, batch: int, repeats: int = 20, optimizer: str = "adam",
                per_layer: bool = False, model_options: dict | None = None) -> dict:
    """Time one training step of `model_name` at `batch` in this thread; returns a result row."""
    sb = step_bench(model_name, batch, optimizer, model_options)
    model, x, y, stats = sb.model, sb.x, sb.y, sb.stats

    def forward():
        ctx = StepContext(train=True, groups=model.groups(batch),
                          stats_out=model.stats_layout.views(stats) if stats is not None else None)
        return F.softmax_cross_entropy(model.forward(x, ctx), y, 1.0 / batch)[2]

    fwd = median_ms(forward, repeats)
    # Backward needs a fresh forward cache each time: time forward+backward and subtract.
    fwd_bwd = median_ms(sb.forward_backward, repeats)
    optim = median_ms(sb.optimizer_step, repeats)
    step = median_ms(sb.full_step, repeats)
    flops = model.flops_per_image()["train"]
    row = {"model": model_name, "batch": batch, "forward_ms": fwd, "backward_ms": fwd_bwd - fwd,
           "optimizer_ms": optim, "step_ms": step, "images_per_s": batch / (step * 1e-3),
           "gflops": flops * batch / (step * 1e-3) / 1e9, "mflop_per_image": flops / 1e6}
    if per_layer:
        row["layers"] = layer_profile(model, x, y, batch, stats, repeats)
    return row


def layer_profile(model, x, y, batch, stats, repeats) -> list[tuple[str, float, float]]:
    """(layer, forward ms, backward ms) medians, to see where a step's time goes."""
    names = [f"{i}:{type(layer).__name__}" for i, layer in enumerate(model.layers)]
    fw = {n: [] for n in names}
    bw = {n: [] for n in names}
    for _ in range(repeats):
        ctx = StepContext(train=True, groups=model.groups(batch),
                          stats_out=model.stats_layout.views(stats) if stats is not None else None)
        h = x
        for n, layer in zip(names, model.layers):
            t0 = time.perf_counter()
            h = layer.forward(h, ctx)
            fw[n].append(time.perf_counter() - t0)
        d = F.softmax_cross_entropy(h, y, 1.0 / batch)[2]
        for n, layer in reversed(list(zip(names, model.layers))[model.backward_from:]):
            t0 = time.perf_counter()
            d = layer.backward(d)
            bw[n].append(time.perf_counter() - t0)
    return [(n, float(np.median(fw[n]) * 1e3), float(np.median(bw[n]) * 1e3) if bw[n] else 0.0)
            for n in names]


def run_kernel_bench(model: str = "three-layer", batches=(50, 256), repeats: int = 20,
                     per_layer: bool = False, echo=print, model_options: dict | None = None,
                     optimizer: str = "adam") -> dict:
    """The whole benchmark on one BLAS thread; prints a table and returns all figures."""
    with threadpool_limits(1):
        info = [i for i in threadpool_info() if i.get("user_api") == "blas"]
        kernel = info[0].get("architecture", "?") if info else "?"
        g = gemm_rate()
        rows = [bench_model(model, b, repeats, optimizer, per_layer, model_options)
                for b in batches]
        g_after = gemm_rate()
    gemm = (g + g_after) / 2
    echo(f"BLAS: {info[0].get('internal_api', '?') if info else '?'} {kernel} kernel, 1 thread; "
         f"float32 1024x1024 GEMM {gemm:.1f} GFLOP/s (before {g:.1f}, after {g_after:.1f})")
    echo(f"{'model':<12} {'batch':>5} {'fwd ms':>8} {'bwd ms':>8} {'opt ms':>8} {'step ms':>8} "
         f"{'img/s':>8} {'GFLOP/s':>8} {'of GEMM':>8}")
    for r in rows:
        r["fraction_of_gemm"] = r["gflops"] / gemm
        echo(f"{r['model']:<12} {r['batch']:>5} {r['forward_ms']:>8.1f} {r['backward_ms']:>8.1f} "
             f"{r['optimizer_ms']:>8.1f} {r['step_ms']:>8.1f} {r['images_per_s']:>8.0f} "
             f"{r['gflops']:>8.1f} {r['fraction_of_gemm']:>8.2f}")
        for name, f_ms, b_ms in r.get("layers", []):
            echo(f"    {name:<22} fwd {f_ms:7.2f} ms   bwd {b_ms:7.2f} ms")
    return {"gemm_gflops": gemm, "gemm_before": g, "gemm_after": g_after, "blas_kernel": kernel,
            "rows": rows}

"""How fast could the course model's step be? Floors from its own parts, against issue 12's targets.

Issue 12 asks for one thread at batch 50 to reach 0.75 of the machine's GEMM rate, and two workers
to reach 0.90 (batch 50) and 0.95 (batch 256) of twice one worker. This script measures, in one
sitting on this machine, the parts no implementation of the same step can skip, and adds them up:

- one thread: the five matrix products of the step (the 7x7 convolution's forward and weight
  gradient, the 8192 -> 512 layer's forward, weight and input gradients), each timed alone in the
  layout the layers run it (the convolution's in the layer's blocks of columns, but on columns
  made once and always in cache: no im2col); plus the optimizer, both
  as numpy runs it (`partrain.optim.Adam`) and at its memory floor (one pass reading p, g, m, v
  and writing p, m, v). Everything else (im2col, pool, bias, ReLU, loss) is left out, so the sum
  is a floor that a fused, compiled step could at best approach.
- two workers: each worker's compute on half the batch (the real forward and backward, less the
  8192 -> 512 weight gradient, which is row-parallel: rowgrad.py), plus half that weight gradient
  over the whole batch, plus Adam on half the parameters: no pipes, no waiting, no shared memory
  bus. The target step is half the one-worker step divided by the efficiency asked for.

Every part is timed once per round, all parts in turn, and each ratio is formed within a round
before the median over rounds is taken: this machine's speed drifts from second to second, and a
floor timed a minute apart from the step or the GEMM rate it is compared with means little.

Usage: python scripts/course_floors.py [--batch-size 50 256] [--rounds 15] [--json FILE]
Run it with nothing else on the machine. Prints one table per batch size.
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np
from threadpoolctl import threadpool_limits

from partrain.bench_kernels import step_bench
from partrain.nn.functional import _row_blocks
from partrain.optim import Adam

TARGET_FRACTION = 0.75                       # issue 12: one thread, batch 50, of the GEMM rate
TARGET_EFFICIENCY = {50: 0.90, 256: 0.95}    # issue 12: two workers
GEMM_N = 1024                                # the kernel benchmark's reference product
FC_IN, FC_OUT = 32 * 16 * 16, 512            # fc1: 8192 -> 512, its input as (D, N) maps


def _random(rng, shape):
    return rng.standard_normal(shape, dtype=np.float32)


def conv_products(batch: int, rng) -> dict:
    """The 7x7 convolution's forward and weight-gradient products at `batch`, in the layer's own
    blocks of output rows (`_row_blocks`), on one block of columns made once and reused: the
    columns are always in cache and never made, so this is below what the layer can do."""
    f, ckk, oh, ow = 32, 3 * 7 * 7, 32, 32
    blocks = _row_blocks((3, oh, ow, batch, oh, ow), 49, np.float32)
    spans = [(r0 * ow * batch, r1 * ow * batch) for r0, r1 in blocks]
    w, cols = _random(rng, (f, ckk)), _random(rng, (ckk, max(b - a for a, b in spans)))
    dout, out = _random(rng, (f, oh * ow * batch)), np.empty((f, oh * ow * batch), np.float32)
    dw, part = np.empty((ckk, f), np.float32), np.empty((ckk, f), np.float32)

    def forward():
        for a, b in spans:
            np.matmul(w, cols[:, :b - a], out=out[:, a:b])

    def weight_gradient():
        for i, (a, b) in enumerate(spans):
            np.matmul(cols[:, :b - a], dout[:, a:b].T, out=dw if i == 0 else part)
            if i:
                np.add(dw, part, out=dw)
    return {f"conv forward ({len(blocks)} blocks)": forward,
            "conv weight gradient cols @ dout.T": weight_gradient}


def fc1_products(batch: int, rng) -> dict:
    """The 8192 -> 512 layer's three products at `batch`, in the layouts the layer runs."""
    w, x, dout = _random(rng, (FC_OUT, FC_IN)), _random(rng, (FC_IN, batch)), _random(
        rng, (FC_OUT, batch))
    dw, dx = np.empty((FC_OUT, FC_IN), np.float32), np.empty((FC_IN, batch), np.float32)
    return {"fc1 forward w @ x": lambda: np.matmul(w, x),
            "fc1 weight gradient dout.T @ x": lambda: np.matmul(dout, x.T, out=dw),
            "fc1 input gradient w.T @ dout.T": lambda: np.matmul(w.T, dout, out=dx)}


def fc1_rows(batch: int, rows: int, rng):
    """`rows` rows of fc1's weight gradient over `batch` samples (what rowgrad's fill makes)."""
    dout, x = _random(rng, (rows, batch)), _random(rng, (FC_IN, batch))
    out = np.empty((rows, FC_IN), np.float32)
    return lambda: np.matmul(dout, x.T, out=out)


def adam_parts(n: int, rng, chunk: int = 65536):
    """(numpy Adam step, its memory floor) on n float32 parameters, weight decay on all as the
    course model's weights have it: the floor is one pass that reads four arrays and writes
    three, in the same cache-sized chunks."""
    p, g, v = (_random(rng, n) for _ in range(3))
    m, v = np.zeros(n, np.float32), np.abs(v)
    opt, state, t = Adam(weight_decay=1e-3, decay_ranges=[(0, n)]), {"m": m, "v": v}, [0]

    def step():
        t[0] += 1
        opt.step(p, g, state, t[0], 1e-4)

    one = np.float32(1)

    def stream():  # p += g; m += v; v *= 1: 4 reads, 3 writes of n floats, nothing that grows
        for s in range(0, n, chunk):
            e = min(s + chunk, n)
            np.add(p[s:e], g[s:e], out=p[s:e])
            np.add(m[s:e], v[s:e], out=m[s:e])
            np.multiply(v[s:e], one, out=v[s:e])
    return step, stream


def timed_rounds(parts: dict, rounds: int, warmup: int = 2) -> dict[str, np.ndarray]:
    """ms of every part in every round: each round runs all parts once, in turn."""
    for _ in range(warmup):
        for fn in parts.values():
            fn()
    ms = {name: [] for name in parts}
    for _ in range(rounds):
        for name, fn in parts.items():
            t0 = time.perf_counter()
            fn()
            ms[name].append((time.perf_counter() - t0) * 1e3)
    return {name: np.array(v) for name, v in ms.items()}


def floors(batch: int, rounds: int) -> dict:
    """Every figure of one batch size (medians over rounds): the step as partrain runs it, its
    parts, and the two floors against their targets."""
    rng = np.random.default_rng(0)
    full, half = step_bench("three-layer", batch), step_bench("three-layer", batch // 2)
    flops = full.model.flops_per_image()["train"] * batch
    a, b = _random(rng, (GEMM_N, GEMM_N)), _random(rng, (GEMM_N, GEMM_N))
    adam, adam_floor = adam_parts(full.params.size, rng)
    products = conv_products(batch, rng) | fc1_products(batch, rng)
    parts = {"gemm": lambda: np.matmul(a, b), "step": full.full_step, **products,
             "adam": adam, "adam_floor": adam_floor, "half_compute": half.forward_backward,
             "half_dw": fc1_rows(batch // 2, FC_OUT, rng),
             "rows_half": fc1_rows(batch, FC_OUT // 2, rng),
             "adam_half": adam_parts(full.params.size // 2, rng)[0]}
    ms = timed_rounds(parts, rounds)
    gemm = 2 * GEMM_N ** 3 / (ms["gemm"] * 1e-3) / 1e9
    target_one = flops / (TARGET_FRACTION * gemm * 1e9) * 1e3
    prod = sum(ms[name] for name in products)
    efficiency = TARGET_EFFICIENCY.get(batch, 0.90)
    floor_two = ms["half_compute"] - ms["half_dw"] + ms["rows_half"] + ms["adam_half"]
    med = lambda v: float(np.median(v))  # noqa: E731
    return {
        "batch": batch, "rounds": rounds, "nominal_gflop": flops / 1e9, "gemm_gflops": med(gemm),
        "one_thread": {
            "step_ms": med(ms["step"]), "fraction_of_gemm": med(flops / (ms["step"] * 1e-3)
                                                                / 1e9 / gemm),
            "target_step_ms": med(target_one),
            "products_ms": {name: med(ms[name]) for name in products},
            "adam_ms": med(ms["adam"]), "adam_memory_floor_ms": med(ms["adam_floor"]),
            "floor_ms": med(prod + ms["adam_floor"]),
            "floor_over_target": med((prod + ms["adam_floor"]) / target_one),
            "floor_numpy_adam_ms": med(prod + ms["adam"]),
            "floor_numpy_adam_over_target": med((prod + ms["adam"]) / target_one)},
        "two_workers": {
            "one_worker_step_ms": med(ms["step"]), "efficiency_target": efficiency,
            "target_step_ms": med(ms["step"] / (2 * efficiency)),
            "half_batch_compute_ms": med(ms["half_compute"] - ms["half_dw"]),
            "row_parallel_half_ms": med(ms["rows_half"]), "adam_half_ms": med(ms["adam_half"]),
            "floor_ms": med(floor_two), "floor_efficiency": med(ms["step"] / (2 * floor_two))},
    }


def report(r: dict) -> str:
    one, two = r["one_thread"], r["two_workers"]
    lines = [f"batch {r['batch']}: {r['nominal_gflop']:.2f} GFLOP nominal a step, GEMM "
             f"{r['gemm_gflops']:.1f} GFLOP/s (medians of {r['rounds']} rounds)",
             f"  one thread: step {one['step_ms']:.1f} ms = {one['fraction_of_gemm']:.2f} of GEMM;"
             f" {TARGET_FRACTION} of GEMM needs <= {one['target_step_ms']:.1f} ms"]
    lines += [f"    {name:<38} {ms:7.2f} ms" for name, ms in one["products_ms"].items()]
    lines += [f"    {'Adam as numpy runs it':<38} {one['adam_ms']:7.2f} ms",
              f"    {'Adam memory floor (one pass)':<38} {one['adam_memory_floor_ms']:7.2f} ms",
              f"    floor, products + Adam's memory floor: {one['floor_ms']:.1f} ms = "
              f"{one['floor_over_target']:.2f} x the target; with numpy's Adam "
              f"{one['floor_numpy_adam_ms']:.1f} ms = {one['floor_numpy_adam_over_target']:.2f} x",
              f"  two workers: target step {two['target_step_ms']:.1f} ms "
              f"({two['efficiency_target']:.2f} of twice {two['one_worker_step_ms']:.1f} ms)",
              f"    {'half the batch, less fc1 dW':<38} {two['half_batch_compute_ms']:7.2f} ms",
              f"    {'half the rows of fc1 dW, all samples':<38} "
              f"{two['row_parallel_half_ms']:7.2f} ms",
              f"    {'Adam on half the parameters':<38} {two['adam_half_ms']:7.2f} ms",
              f"    floor {two['floor_ms']:.1f} ms = efficiency {two['floor_efficiency']:.2f} at "
              f"most, with no signalling, waiting or shared bus"]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch-size", type=int, nargs="+", default=[50, 256])
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--json", help="also write every figure to this file")
    args = ap.parse_args()
    with threadpool_limits(1):
        results = [floors(b, args.rounds) for b in args.batch_size]
    for r in results:
        print(report(r))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=1)


if __name__ == "__main__":
    main()

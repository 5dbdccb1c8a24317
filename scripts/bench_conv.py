#!/usr/bin/env python
"""A/B timing of the conv kernels (im2col reference vs Winograd F(2x2,3x3)) on airbench's 3x3 conv
shapes, one BLAS thread, interleaved in one process (the machine is noisy).

Usage: python scripts/bench_conv.py [--batch 64] [--repeats 5]
"""
import argparse
import time

import numpy as np
from threadpoolctl import threadpool_limits

from partrain.bench_kernels import gemm_rate
from partrain.nn import functional as F

SHAPES = [(24, 64, 31), (64, 64, 15), (64, 256, 15), (256, 256, 7), (256, 256, 3)]  # C, F, H


def time_conv(x, w, method, need_dx, ws):
    t0 = time.perf_counter()
    out, cache = F.conv_forward(x, w, None, 1, 1, ws, method=method)
    t1 = time.perf_counter()
    F.conv_backward(out, cache, need_dx, ws=ws)
    t2 = time.perf_counter()
    return t1 - t0, t2 - t1


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    a = ap.parse_args()
    rng = np.random.default_rng(0)
    with threadpool_limits(1):
        print(f"GEMM {gemm_rate():.1f} GFLOP/s (float32 1024^2, 1 thread)")
        for C, Fo, H in SHAPES:
            x = rng.standard_normal((C, H, H, a.batch), dtype=np.float32)  # (C, H, W, N)
            w = rng.standard_normal((Fo, C, 3, 3), dtype=np.float32)
            variants = ["im2col", "winograd2", "winograd4"]
            times = {v: [] for v in variants}
            wss = {v: F.Workspace() for v in variants}
            for r in range(a.repeats + 1):
                for v in variants:
                    t = time_conv(x, w, v, True, wss[v])
                    if r:
                        times[v].append(t)
            gf = 2 * Fo * C * 9 * a.batch * H * H / 1e9
            line = [f"C={C:3d} F={Fo:3d} {H:2d}x{H:<2d} ({gf:.2f} GFLOP fwd)"]
            for v in variants:
                f, b = np.median(np.array(times[v]), axis=0) * 1e3
                line.append(f"{v} fwd {f:6.1f} bwd {b:6.1f}")
            print("  ".join(line))
        print(f"GEMM {gemm_rate():.1f} GFLOP/s")


if __name__ == "__main__":
    main()

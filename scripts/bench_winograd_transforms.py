#!/usr/bin/env python
"""A/B timing of Winograd F(4x4, 3x3)'s tile transforms: one (p·p x q·q) Kronecker GEMM against
the separable form partrain uses (`winograd._transform`: the 1-D transform on the tile's columns,
then on its rows, two stacked GEMMs), on column counts around the channel blocks' sizes, one
BLAS thread, interleaved in one process (the machine is noisy). Checks that both agree.

Usage: python scripts/bench_winograd_transforms.py [--repeats 50]
"""
import argparse
import time

import numpy as np
from threadpoolctl import threadpool_limits

from partrain.nn import winograd


def timed(f, repeats):
    f()
    t0 = time.perf_counter()
    for _ in range(repeats):
        f()
    return (time.perf_counter() - t0) / repeats * 1e3


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repeats", type=int, default=50)
    a = ap.parse_args()
    rng = np.random.default_rng(0)
    bt, _, at = (np.ascontiguousarray(m, np.float32) for m in winograd._WINO[4])
    with threadpool_limits(1):
        for X in (4096, 16384, 65536):
            line = [f"{X:6d} columns:"]
            for name, t in (("input (Bt)", bt), ("output (At)", at)):
                p, q = t.shape
                src = rng.standard_normal((q * q, X), dtype=np.float32)
                kron, dst = np.kron(t, t), np.empty((p * p, X), np.float32)
                ref = kron @ src
                winograd._transform(t, src, dst, None, "T")
                assert np.max(np.abs(dst - ref)) <= 1e-5 * np.max(np.abs(ref))
                k = timed(lambda: np.matmul(kron, src, out=dst), a.repeats)
                s = timed(lambda: winograd._transform(t, src, dst, None, "T"), a.repeats)
                line.append(f"{name} Kronecker {k:.2f} ms, separable {s:.2f} ms")
            print("  ".join(line))


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""Single-thread kernel benchmark (same as `partrain bench --kernels`).

Usage: python scripts/bench_kernels.py [--model three-layer] [--batch 50 --batch 256] [--layers]
"""
import argparse
import json

from partrain.bench_kernels import run_kernel_bench

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="three-layer")
    ap.add_argument("--batch", type=int, action="append")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--layers", action="store_true", help="per-layer forward/backward times")
    ap.add_argument("--json", help="write the figures to this file")
    a = ap.parse_args()
    res = run_kernel_bench(a.model, tuple(a.batch or (50, 256)), a.repeats, a.layers)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=2)

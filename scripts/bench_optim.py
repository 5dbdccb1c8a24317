"""Time Adam.step on a 4.3 M-element float32 vector against a naive full-array numpy Adam.

Usage: python scripts/bench_optim.py [--n 4300000] [--repeats 20] [--chunk 16384]
Prints the median milliseconds per step of each. Numbers depend on the machine and its load.
"""
from __future__ import annotations

import argparse
import time

import numpy as np

from partrain.optim import Adam


def naive_adam(p, g, m, v, t, lr=1e-3, b1=0.9, b2=0.999, eps=1e-8):
    """The textbook formula written the obvious way: every expression is a full-size temporary."""
    m[:] = b1 * m + (1 - b1) * g
    v[:] = b2 * v + (1 - b2) * g * g
    mhat = m / (1 - b1 ** t)
    vhat = v / (1 - b2 ** t)
    p -= lr * mhat / (np.sqrt(vhat) + eps)


def median_ms(fn, repeats: int) -> float:
    times = []
    for t in range(1, repeats + 1):
        start = time.perf_counter()
        fn(t)
        times.append(time.perf_counter() - start)
    return 1e3 * float(np.median(times))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=4_300_000)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--chunk", type=int, nargs="*", default=[16384, 65536])
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    g = rng.standard_normal(args.n, dtype=np.float32)
    p = rng.standard_normal(args.n, dtype=np.float32)
    print(f"Adam step on {args.n:,} float32 parameters, median of {args.repeats}:")
    for chunk in args.chunk:
        opt = Adam(chunk=chunk, decay_ranges=[(0, args.n // 2)], weight_decay=1e-4)
        state = {k: np.zeros_like(p) for k in opt.state_names}
        ms = median_ms(lambda t: opt.step(p, g, state, t, 1e-3), args.repeats)
        print(f"  partrain.optim.Adam chunk={chunk:>6}: {ms:7.2f} ms")
    m, v = np.zeros_like(p), np.zeros_like(p)
    ms = median_ms(lambda t: naive_adam(p, g, m, v, t), args.repeats)
    print(f"  naive full-array numpy Adam:      {ms:7.2f} ms")


if __name__ == "__main__":
    main()

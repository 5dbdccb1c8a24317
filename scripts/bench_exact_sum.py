"""What an order-free gradient sum costs, per option, on the flat vectors of the course model and
airbench (issue 13): the figures behind `--micro-batch`'s design (BENCHMARKS.md).

Both options make the gradient a function of fixed micro-batches, whoever computes them:
- rows (what partrain does): each micro-batch's float32 gradient is written into a row of its
  own instead of the worker's buffer (the layers write it there: no extra pass), and the
  reduction adds K rows in order instead of N buffers: cost = (K - N) more vectors read;
- fixed point: each micro-batch's gradient is converted to int64 at a fixed scale and added to
  the worker's int64 accumulator (associative, so any order gives the same bits, also in an MPI
  all-reduce); the reduction then adds N int64 vectors and converts back. Cost = one conversion
  and accumulation per micro-batch, done in cache-sized blocks, plus twice the reduction traffic.

    python scripts/bench_exact_sum.py            # one thread, median of 7 repeats
"""
from __future__ import annotations

import numpy as np
from threadpoolctl import threadpool_limits

from partrain.bench_kernels import median_ms as _median

MODELS = {"three-layer": 4_204_682, "airbench": 1_971_352}  # flat parameter counts
SCALE = 2.0 ** 40   # lsb 2^-40: ~9e-13; |sum| < 2^23 fits int64 with room for 2^-40 steps
BLOCK = 1 << 15     # elements per block of the conversion (256 KiB of float64: in L2)


def median_ms(fn) -> float:
    """Median of 7 timed calls after one untimed one (bench_kernels' timer)."""
    return _median(fn, 7, warmup=1)


def sum_rows(rows: list[np.ndarray], out: np.ndarray) -> None:
    np.add(rows[0], rows[1], out=out)
    for r in rows[2:]:
        np.add(out, r, out=out)


def fixed_point_add(g: np.ndarray, acc: np.ndarray, tmp: np.ndarray, itmp: np.ndarray) -> None:
    """acc += rint(g * SCALE) as int64, block by block (each block stays in cache)."""
    for lo in range(0, g.size, BLOCK):
        hi = min(g.size, lo + BLOCK)
        t, it = tmp[:hi - lo], itmp[:hi - lo]
        np.multiply(g[lo:hi], SCALE, out=t)
        np.rint(t, out=t)
        np.copyto(it, t, casting="unsafe")
        np.add(acc[lo:hi], it, out=acc[lo:hi])


def main() -> None:
    rng = np.random.default_rng(0)
    with threadpool_limits(1):
        for name, p in MODELS.items():
            rows = [rng.standard_normal(p, dtype=np.float32) * 1e-3 for _ in range(16)]
            out = np.empty(p, np.float32)
            acc = np.zeros(p, np.int64)
            tmp, itmp = np.empty(BLOCK), np.empty(BLOCK, np.int64)
            two = median_ms(lambda: sum_rows(rows[:2], out))
            eight = median_ms(lambda: sum_rows(rows[:8], out))
            sixteen = median_ms(lambda: sum_rows(rows, out))
            conv = median_ms(lambda: fixed_point_add(rows[0], acc, tmp, itmp))
            back = median_ms(lambda: np.multiply(acc, 1.0 / SCALE, out=out, casting="unsafe"))
            iadd = median_ms(lambda: np.add(acc, acc, out=acc))
            print(f"{name} ({p:,} parameters, {p * 4 / 2**20:.1f} MiB per float32 vector):")
            print(f"  rows: sum of 2 / 8 / 16 rows {two:.1f} / {eight:.1f} / {sixteen:.1f} ms "
                  f"(one more row: {(sixteen - two) / 14:.2f} ms)")
            print(f"  fixed point: convert + accumulate one micro-batch {conv:.1f} ms; "
                  f"int64 add of two vectors {iadd:.1f} ms; back to float32 {back:.1f} ms")


if __name__ == "__main__":
    main()

"""`python scripts/bench_gelu.py`: partrain's two GELU forms (nn/gelu.py) on one thread, forward and
backward of a (64, 64, 15, 15) float32 map (airbench's first GELU after a pool, per 64-image chunk)
and of a (24, 31, 31, 64) one (the whitening GELU): the tanh approximation against the exact erf
form, each with its distance from x·Φ(x) computed with math.erf. Medians of 31 calls, 3 rounds."""
import math
import time

import numpy as np
from threadpoolctl import threadpool_limits

from partrain.nn import gelu as G
from partrain.nn.workspace import Workspace


def median_ms(f, repeats=31):
    f()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        f()
        times.append(time.perf_counter() - t0)
    return 1e3 * float(np.median(times))


def main():
    rng = np.random.default_rng(0)
    with threadpool_limits(1):
        for shape in [(64, 64, 15, 15), (24, 31, 31, 64)]:
            x = (rng.standard_normal(shape) * 2).astype(np.float32)
            d = rng.standard_normal(shape).astype(np.float32)
            ws_t, ws_e = Workspace(), Workspace()
            exact = 0.5 * x.astype(np.float64) * (1 + np.vectorize(math.erf)(x / math.sqrt(2)))
            out_t, cache_t = G.gelu_forward(x, ws_t)
            out_e, cache_e = G.gelu_erf_forward(x, ws_e)
            print(f"{shape}: max |gelu - x·Φ(x)|: tanh {np.abs(out_t - exact).max():.2e}, "
                  f"erf {np.abs(out_e - exact).max():.2e}")
            for _ in range(3):
                tf = median_ms(lambda: G.gelu_forward(x, ws_t))
                tb = median_ms(lambda: G.gelu_backward(d, cache_t, ws_t))
                ef = median_ms(lambda: G.gelu_erf_forward(x, ws_e))
                eb = median_ms(lambda: G.gelu_backward(d, cache_e, ws_e))
                print(f"  tanh fwd {tf:.2f} bwd {tb:.2f} = {tf + tb:.2f} ms | erf fwd {ef:.2f} "
                      f"bwd {eb:.2f} = {ef + eb:.2f} ms | erf/tanh {(ef + eb) / (tf + tb):.2f}")


if __name__ == "__main__":
    main()

"""`python scripts/bench_gelu.py`: GELU forms on one thread, forward and backward of a
(64, 64, 15, 15) float32 map: the tanh approximation partrain uses against the exact erf form,
with erf written in numpy passes (numpy has no erf ufunc; Abramowitz & Stegun 7.1.26, |error| <
1.5e-7, float32's resolution), both in place into reused buffers as partrain's kernels are."""
import math
import time
import numpy as np
from threadpoolctl import threadpool_limits
from partrain.nn import functional as F
from partrain.nn.workspace import Workspace

P, A = 0.3275911, (0.254829592, -0.284496736, 1.421413741, -1.453152027, 1.061405429)


BUF = {}


def buf(k, x):
    if k not in BUF:
        BUF[k] = np.empty_like(x)
    return BUF[k]


def gelu_erf(x):
    """In place into reused buffers, as partrain's kernels are written."""
    z, t, p, e, phi, out = (buf(k, x) for k in "ztpefo")
    np.abs(x, out=z)
    z *= np.float32(1 / np.sqrt(2))
    np.multiply(z, np.float32(P), out=t)
    t += 1
    np.reciprocal(t, out=t)
    np.multiply(t, np.float32(A[4]), out=p)
    for a in A[3::-1]:
        p += np.float32(a)
        p *= t
    np.multiply(z, z, out=e)
    np.negative(e, out=e)
    np.exp(e, out=e)                       # exp(-x^2/2): also the density, for backward
    p *= e
    np.subtract(1, p, out=phi)             # erf(|x|/sqrt 2)
    np.copysign(phi, x, out=phi)
    phi += 1
    phi *= 0.5                             # the normal CDF
    np.multiply(x, phi, out=out)
    return out, (x, phi, e)


def gelu_erf_backward(d, cache):
    x, phi, e = cache
    g = buf("g", x)
    np.multiply(x, e, out=g)
    g *= np.float32(1 / np.sqrt(2 * np.pi))
    g += phi
    g *= d
    return g


def t(f, r=31):
    f(); ts = []
    for _ in range(r):
        t0 = time.perf_counter(); f(); ts.append(time.perf_counter() - t0)
    return 1e3 * np.median(ts)


rng = np.random.default_rng(0)
x = rng.standard_normal((64, 64, 15, 15)).astype(np.float32) * 2
d = rng.standard_normal(x.shape).astype(np.float32)
with threadpool_limits(1):
    ws = Workspace()
    out, c = F.gelu_forward(x, ws)
    ref = 0.5 * x.astype(np.float64) * (1 + np.vectorize(math.erf)(x / np.sqrt(2)))
    print("tanh form: max |gelu - exact| =", float(np.abs(out - ref).max()))
    o2, c2 = gelu_erf(x)
    print("erf form:  max |gelu - exact| =", float(np.abs(o2 - ref).max()))
    for _ in range(3):
        print(f"tanh fwd {t(lambda: F.gelu_forward(x, ws)):.2f} ms bwd {t(lambda: F.gelu_backward(d, c, ws)):.2f} ms | "
              f"erf fwd {t(lambda: gelu_erf(x)):.2f} ms bwd {t(lambda: gelu_erf_backward(d, c2)):.2f} ms")

"""GELU, x·Φ(x), in two forms: `tanh` (the approximation, partrain's default) and `erf` (exact).

tanh: 0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³))), within 4.7e-4 of x·Φ(x) (Hendrycks & Gimpel).
erf:  x·Φ(x) with Φ(x) = ½(1 + erf(x/√2)), what airbench94 (PyTorch's default nn.GELU) computes.
      numpy has no erf ufunc, so erf is Abramowitz & Stegun 7.1.26, |error| < 1.5e-7 (float32's
      resolution near 1): erf(z) = 1 - t·(a1 + t·(a2 + … + t·a5))·exp(-z²), t = 1/(1 + p·z),
      z ≥ 0, odd in z. Its derivative is the exact one, Φ(x) + x·φ(x) (φ shares the exp).

In training the forward pass also computes the derivative, while the block is in cache, and keeps
it instead of x (and tanh's t): the backward pass is then one product, dout · derivative.

Both are chains of in-place numpy passes (`x ** 3` would call powf, 3x slower) over a block of
channels at a time (blocking.py: the block stays in cache); with a Workspace their map-sized
arrays are reused from step to step (no page faults). Which one a model uses is its `gelu`
option (airbench): the choice, measured, is in BENCHMARKS.md.
"""
from __future__ import annotations

import math

import numpy as np

from .blocking import channel_blocks
from .workspace import buffer, scratch

FORMS = ("tanh", "erf")

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_AS_P = 0.3275911                            # Abramowitz & Stegun 7.1.26
_AS_A = (0.254829592, -0.284496736, 1.421413741, -1.453152027, 1.061405429)


def _buffers(x, ws, key, need_grad, roles):
    """Both forms' arrays: the output and (need_grad) the derivative, map-sized and kept; the
    channel blocks; one block-sized scratch array per role (the same roles share one pool)."""
    out = buffer(ws, key + "out", x.shape, x.dtype)
    deriv = buffer(ws, key + "deriv", x.shape, x.dtype) if need_grad else None
    blocks = channel_blocks(x.shape, x.itemsize)
    shape0 = x[blocks[0]].shape
    return out, deriv, blocks, [scratch(ws, "gelu" + r, shape0, x.dtype) for r in roles]


def gelu_forward(x, ws=None, key="gelu", need_grad=True):
    """GELU, tanh approximation; the cache is its derivative (None without need_grad),
    0.5 (1 + tanh u) + 0.5 x (1 - tanh^2 u) u',  u' = sqrt(2/pi) (1 + 3·0.044715 x^2)."""
    out, deriv, blocks, (t_all, sq_all) = _buffers(x, ws, key, need_grad, ("t", "p"))
    for s in blocks:
        n = s.stop - s.start
        xb, ob, tb, sq = x[s], out[s], t_all[:n], sq_all[:n]
        np.multiply(xb, xb, out=tb)
        tb *= 0.044715 * _SQRT_2_OVER_PI
        tb += _SQRT_2_OVER_PI
        tb *= xb                    # sqrt(2/pi) * (x + 0.044715 x^3)
        np.tanh(tb, out=tb)
        np.add(tb, 1.0, out=ob)
        ob *= xb
        ob *= 0.5
        if deriv is not None:
            db = deriv[s]
            np.multiply(xb, xb, out=db)
            db *= 3 * 0.044715 * _SQRT_2_OVER_PI
            db += _SQRT_2_OVER_PI
            np.multiply(tb, tb, out=sq)
            np.subtract(1.0, sq, out=sq)
            db *= sq
            db *= xb
            db += tb
            db += 1.0
            db *= 0.5
    return out, deriv


def gelu_backward(dout, cache, ws=None, key="gelu"):
    """dx = dout · the derivative the forward pass kept (either form)."""
    if cache is None:
        raise ValueError("gelu_backward: the forward pass ran without need_grad")
    dx = buffer(ws, key + "du", cache.shape, dout.dtype)
    return np.multiply(dout, cache, out=dx)


def gelu_erf_forward(x, ws=None, key="gelu", need_grad=True):
    """Exact GELU x·Φ(x); the cache is its derivative Φ(x) + x·φ(x) (None without need_grad)."""
    out, deriv, blocks, (t_all, p_all, e_all) = _buffers(x, ws, key, need_grad, ("t", "p", "e"))
    for s in blocks:
        n = s.stop - s.start
        xb, ob, t, p, e = x[s], out[s], t_all[:n], p_all[:n], e_all[:n]
        np.abs(xb, out=t)                  # t = 1 / (1 + p·|x|/√2)
        t *= _AS_P / math.sqrt(2.0)
        t += 1.0
        np.reciprocal(t, out=t)
        np.multiply(t, _AS_A[4], out=p)    # p = t·(a1 + t·(a2 + t·(a3 + t·(a4 + t·a5))))
        for a in _AS_A[3::-1]:
            p += a
            p *= t
        np.multiply(xb, xb, out=e)         # e = exp(-x²/2)
        e *= -0.5
        np.exp(e, out=e)
        p *= e                             # p = 1 - erf(|x|/√2)
        np.subtract(1.0, p, out=p)
        np.copysign(p, xb, out=p)          # erf(x/√2)
        p *= 0.5
        p += 0.5                           # Φ(x)
        np.multiply(xb, p, out=ob)
        if deriv is not None:
            db = deriv[s]
            np.multiply(xb, e, out=db)     # Φ(x) + x·exp(-x²/2)/√(2π)
            db *= 1.0 / math.sqrt(2.0 * math.pi)
            db += p
    return out, deriv

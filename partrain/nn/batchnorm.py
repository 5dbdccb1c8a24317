"""Batch norm kernels over (C, H, W, N) maps with per-group ("ghost batch") statistics (part of
the functional kernels; `functional` re-exports them)."""
from __future__ import annotations

import numpy as np

from .blocking import channel_blocks
from .workspace import buffer, scratch


def _groups(lo: int, hi: int, *arrays: np.ndarray) -> list[np.ndarray]:
    """Samples [lo, hi) of (C, H, W, N) arrays as (C, H·W·n) views when they are all samples of
    contiguous arrays (the usual case: a chunk is one group), else as 4-D views; the same form
    for all, so that they combine elementwise. `_mean` reduces either per channel."""
    if lo == 0 and hi == arrays[0].shape[-1] and all(a.flags.c_contiguous for a in arrays):
        return [a.reshape(a.shape[0], -1) for a in arrays]
    return [a[..., lo:hi] for a in arrays]


def _mean(v: np.ndarray) -> np.ndarray:
    return v.mean(axis=tuple(range(1, v.ndim)), keepdims=True)


def batchnorm_forward(x, gamma, beta, groups: list[tuple[int, int]], eps=1e-5, ws=None, key="bn"):
    """Training-mode batch norm of (C, H, W, N) with statistics per group of samples.

    groups: [lo, hi) sample ranges ("ghost batches"); each is normalised with its own mean and
    (biased) variance. Returns out, cache, (sum of group means, sum of group variances) per channel.
    Written as in-place passes over views of the two output arrays: no temporaries of the map's
    size; with one group (a chunk of whole ghost batches is one group for airbench) every
    reduction runs along one contiguous axis. The passes run a block of channels at a time
    (blocking.py). With a Workspace, `out` and the cached `xhat` are reused from step to step.
    """
    C = x.shape[0]
    out = buffer(ws, key + "out", x.shape, x.dtype)
    xhat = buffer(ws, key + "xhat", x.shape, x.dtype)
    inv_stds = np.empty((len(groups), C), x.dtype)
    mean_sum = np.zeros(C, np.float64)
    var_sum = np.zeros(C, np.float64)
    for s in channel_blocks(x.shape, x.itemsize):
        xb, hb, ob = x[s], xhat[s], out[s]
        for g, (lo, hi) in enumerate(groups):
            xg, xh, sq = _groups(lo, hi, xb, hb, ob)   # out: scratch until the final pass
            mu = _mean(xg)
            np.subtract(xg, mu, out=xh)
            np.multiply(xh, xh, out=sq)
            var = _mean(sq)
            inv = 1.0 / np.sqrt(var + eps)
            xh *= inv
            mean_sum[s] += mu.ravel()
            var_sum[s] += var.ravel()
            inv_stds[g, s] = inv.ravel()
        if gamma is not None:
            np.multiply(hb, gamma[s].reshape(-1, 1, 1, 1), out=ob)
            if beta is not None:
                ob += beta[s].reshape(-1, 1, 1, 1)
        elif beta is not None:
            np.add(hb, beta[s].reshape(-1, 1, 1, 1), out=ob)
        else:
            ob[...] = hb
    return out, (xhat, inv_stds, groups, gamma), (mean_sum, var_sum)


def batchnorm_backward(dout, cache, dgamma_out=None, dbeta_out=None, ws=None, key="bn"):
    """-> (dx, dgamma or None, dbeta or None) for training-mode batch norm, a block of channels
    at a time (blocking.py)."""
    xhat, inv_stds, groups, gamma = cache
    dx = buffer(ws, key + "dx", dout.shape, dout.dtype)
    blocks = channel_blocks(dout.shape, dout.itemsize)
    prod = scratch(ws, "bnprod", dout[blocks[0]].shape, dout.dtype)
    for s in blocks:
        db, hb, xb = dout[s], xhat[s], dx[s]
        c = s.stop - s.start
        if dbeta_out is not None:
            np.sum(db.reshape(c, -1), axis=1, out=dbeta_out[s])
        if dgamma_out is not None:
            pb = prod[:c]
            np.multiply(db, hb, out=pb)
            np.sum(pb.reshape(c, -1), axis=1, out=dgamma_out[s])
        if gamma is not None:
            dxhat = prod[:c]
            np.multiply(db, gamma[s].reshape(-1, 1, 1, 1), out=dxhat)
        else:
            dxhat = db
        for (lo, hi), inv in zip(groups, inv_stds):
            dh, xh, dxg = _groups(lo, hi, dxhat, hb, xb)
            inv = inv[s].reshape((-1,) + (1,) * (dh.ndim - 1))
            m = _mean(dh)
            np.multiply(dh, xh, out=dxg)            # scratch
            mx = _mean(dxg)
            np.multiply(xh, mx, out=dxg)
            np.subtract(dh, dxg, out=dxg)
            dxg -= m
            dxg *= inv                              # inv · (dh - m - xh · mx)
    return dx, dgamma_out, dbeta_out


def batchnorm_eval(x, gamma, beta, running_mean, running_var, eps=1e-5):
    inv = 1.0 / np.sqrt(running_var + eps)
    scale = inv if gamma is None else gamma * inv
    shift = -running_mean * scale + (0 if beta is None else beta)
    return x * scale.astype(x.dtype).reshape(-1, 1, 1, 1) + shift.astype(x.dtype).reshape(-1, 1, 1, 1)

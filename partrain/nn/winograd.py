"""Winograd F(m x m, 3x3) (Lavin & Gray 2016) for stride-1, pad-1 3x3 convolutions. Each m x m block
of outputs comes from an (m+2) x (m+2) input tile d:  Y = At [(G g Gt) * (Bt d B)] A, so the 9 m^2
multiplies per (filter, channel, block) of a direct/im2col conv become (m+2)^2 — 2.25x fewer for
m = 2 and 4x fewer for m = 4 — as one (F x C) @ (C x tiles) GEMM per tile position. The tile
transforms are applied separably, on columns then rows, as stacked GEMMs (`_transform`); the
filter transform, made once per step, is one Kronecker product. Backward is the exact
adjoint of that computation: the transformed output gradient dM feeds both dU = dM Vt (-> dW)
and dV = Ut dM (-> dX), so the gradient is that of the Winograd forward and equals the im2col
one up to float round-off.
m = 4 uses the interpolation points 0, 1, -1, 1/2, -2 (and infinity) rather than Lavin's
0, ±1, ±2: measured float32 error relative to the largest output ~3e-6 on airbench's shapes
(Lavin's matrices: ~1e-5; im2col: ~5e-7). The matrices are the Toom-Cook construction for those
points (At: powers of the points; G: rows p^k / prod_{q != p}(p - q); Bt solves the identity).

This module is the algorithm only: `functional.conv_forward` decides by shape when it is used
(`functional.winograd_eligible`) and keeps the im2col reference.
"""
from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import as_strided

from .workspace import buffer, scratch

_WINO = {  # output tile m -> (Bt, G, At) in float64
    2: (np.array([[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]], np.float64),
        np.array([[1, 0, 0], [.5, .5, .5], [.5, -.5, .5], [0, 0, 1]], np.float64),
        np.array([[1, 1, 1, 0], [0, 1, -1, -1]], np.float64)),
    4: (np.array([[1, -3 / 2, -2, 3 / 2, 1, 0], [0, -1, 1 / 2, 5 / 2, 1, 0],
                  [0, 1, -5 / 2, 1 / 2, 1, 0], [0, -2, -1, 2, 1, 0], [0, 1 / 2, -1, -1 / 2, 1, 0],
                  [0, 1, -3 / 2, -2, 3 / 2, 1]], np.float64),
        np.array([[1, 0, 0], [1 / 3, 1 / 3, 1 / 3], [-1 / 3, 1 / 3, -1 / 3],
                  [-16 / 15, -8 / 15, -4 / 15], [1 / 15, -2 / 15, 4 / 15], [0, 0, 1]], np.float64),
        np.array([[1, 1, 1, 1, 1, 0], [0, 1, -1, 1 / 2, -2, 0], [0, 1, 1, 1 / 4, 4, 0],
                  [0, 1, -1, 1 / 8, -8, 1]], np.float64)),
}
_WMATS: dict = {}


def _mats(dtype, m):
    mats = _WMATS.get((np.dtype(dtype), m))
    if mats is None:
        bt, g, at = _WINO[m]
        kg = np.kron(g, g)
        mats = tuple(np.ascontiguousarray(a, dtype)
                     for a in (bt, bt.T, kg, kg.T, at, at.T))
        _WMATS[(np.dtype(dtype), m)] = mats
    return mats  # Bt (a x a), B, KG (a2 x 9), KG^T, At (m x a), A; a = m + 2


def _transform(t: np.ndarray, src: np.ndarray, dst: np.ndarray, ws, role: str) -> None:
    """dst = kron(t, t) @ src, for src (q·q, X) and dst (p·p, X) (any row strides, unit column
    stride), t (p, q): applied separably, t on the tile's columns and then on its rows, as two
    stacked GEMMs, 2·p·q·(p + q) multiplies per column against (p·q)² for the Kronecker product
    (F(4x4, 3x3)'s output transform: 480 against 1 152) on GEMMs that stay in cache.
    One thread, 16 384 columns: 0.49 -> 0.29 ms (output), 0.88 -> 0.56 ms (input)."""
    p, q = t.shape
    X = src.shape[1]
    mid = scratch(ws, role, (q, p, X), src.dtype)
    np.matmul(t, src.reshape(q, q, X), out=mid)         # mid[a, j] = sum_b t[j, b] src[a, b]
    np.matmul(t, mid.transpose(1, 0, 2), out=dst.reshape(p, p, X).transpose(1, 0, 2))



BLOCK_BYTES = 1 << 20  # channel blocks for the gathers, scatters and transforms (cache-sized)


def _channel_blocks(n_channels: int, bytes_per_channel: int):
    """Slices of channels whose maps (or tiles) take about BLOCK_BYTES. The gathers into tiles and
    scatters out of them have strided ends; done for all channels at once they thrash the cache
    (F=256, 15x15, N=64: 45 ms for the output copy when the maps were (C, N, H, W); in 1 MB
    blocks 15 ms). The transforms go by the same blocks, so the tile buffers between two steps
    stay in cache and in the scratch pool at block size (conv1a's output tiles: 37 MB -> 1 MB)."""
    bs = max(1, BLOCK_BYTES // max(1, bytes_per_channel))
    return [slice(c0, min(n_channels, c0 + bs)) for c0 in range(0, n_channels, bs)]


def conv_forward(x, w, b, m, ws=None, key="conv", version=None):
    """3x3 stride-1 pad-1 conv of x (C, H, W, N) by Winograd F(m x m, 3x3) -> (F, H, W, N), cache.

    version: a tag of the parameters (None: unknown); the transformed filters U are kept in the
    workspace and reused while it stays the same (the chunks of one training step: 8 of them per
    step of a 512-image shard, 2-6 ms each for airbench's 256x256 layers).

    Inside, tiles are ordered (tile row, tile column, sample): the sample index is innermost, as
    in the maps, so every gather, transform, scatter and overlap-add runs over N contiguous values
    (with (N, H, W) order the inner loops would be one tile row long, 4 values on a 7x7 map, and
    numpy's per-loop overhead dominates). The transforms go channel block by channel block
    (`_channel_blocks`); only V (the transformed input, the cache for backward) and M (the
    products, which every output block needs whole) are full size.
    """
    al = m + 2
    C, H, W, N = x.shape
    F_ = w.shape[0]
    dt = x.dtype
    Bt, _, KG, _, At, _ = _mats(dt, m)
    th, tw = -(-H // m), -(-W // m)
    P = th * tw * N
    xp = scratch(ws, "wxpad", (C, m * th + 2, m * tw + 2, N), dt)   # padded, samples last
    xp[:, 0] = 0
    xp[:, H + 1:] = 0
    xp[:, 1:H + 1, 0] = 0
    xp[:, 1:H + 1, W + 1:] = 0
    xp[:, 1:H + 1, 1:W + 1] = x
    # U[ab] (F, C): transformed filters, from the (F·C, 9) filters read transposed (no copy).
    U = buffer(ws, key + "wU", (al * al, F_, C), dt)
    if ws is None or version is None or ws.tags.get(key + "wU") != version:
        np.matmul(KG, w.astype(dt, copy=False).reshape(F_ * C, 9).T, out=U.reshape(al * al, -1))
        if ws is not None:
            ws.tags[key + "wU"] = version
    sC, sH, sW, sN = xp.strides
    tiles = as_strided(xp, shape=(al, al, C, th, tw, N),
                       strides=(sH, sW, sC, m * sH, m * sW, sN), writeable=False)
    V = buffer(ws, key + "wV", (al * al, C * P), dt)
    blocks = _channel_blocks(C, al * al * P * dt.itemsize)
    D = scratch(ws, "wD", (al * al * (blocks[0].stop - blocks[0].start) * P,), dt)
    for cb in blocks:
        n = cb.stop - cb.start
        d = D[:al * al * n * P].reshape(al * al, n * P)
        np.copyto(d.reshape(al, al, n, th, tw, N), tiles[:, :, cb])
        _transform(Bt, d, V[:, cb.start * P:cb.stop * P], ws, "wT")
    M = scratch(ws, "wM", (al * al, F_ * P), dt)
    np.matmul(U, V.reshape(al * al, C, P), out=M.reshape(al * al, F_, P))
    out = buffer(ws, key + "out", (F_, H, W, N), dt)
    blocks = _channel_blocks(F_, m * m * P * dt.itemsize)
    Y = scratch(ws, "wY", (m * m * (blocks[0].stop - blocks[0].start) * P,), dt)
    for fb in blocks:
        n = fb.stop - fb.start
        y = Y[:m * m * n * P].reshape(m * m, n * P)
        _transform(At, M[:, fb.start * P:fb.stop * P], y, ws, "wT")
        y6 = y.reshape(m, m, n, th, tw, N)
        for a in range(m):
            for c in range(m):
                out[fb, a::m, c::m] = y6[a, c, :, :(H - a + m - 1) // m, :(W - c + m - 1) // m]
    if b is not None:
        out += b.reshape(-1, 1, 1, 1)
    return out, ("winograd", V, U, w, x.shape, b is not None, m)


def conv_backward(dout, cache, need_dx=True, dw_out=None, db_out=None, ws=None,
                           key="conv"):
    """Adjoint of conv_forward -> (dx or None, dw, db or None), block by block like it."""
    _, V, U, w, (C, H, W, N), has_bias, m = cache
    al = m + 2
    F_ = w.shape[0]
    dt = dout.dtype
    _, B, _, KGt, _, A = _mats(dt, m)
    th, tw = -(-H // m), -(-W // m)
    P = th * tw * N
    # Output gradient into the tile layout (zeros where the last tile row/column overhangs), then
    # to the transformed domain, a block of filters at a time.
    dM = scratch(ws, "wM", (al * al, F_ * P), dt)
    blocks = _channel_blocks(F_, m * m * P * dt.itemsize)
    G = scratch(ws, "wY", (m * m * (blocks[0].stop - blocks[0].start) * P,), dt)
    for fb in blocks:
        n = fb.stop - fb.start
        g = G[:m * m * n * P].reshape(m * m, n * P)
        g6 = g.reshape(m, m, n, th, tw, N)
        if H % m or W % m:
            g.fill(0)
        for a in range(m):
            for c in range(m):
                g6[a, c, :, :(H - a + m - 1) // m, :(W - c + m - 1) // m] = dout[fb, a::m, c::m]
        _transform(A, g, dM[:, fb.start * P:fb.stop * P], ws, "wT")
    dU = scratch(ws, "wdU", (al * al, F_, C), dt)
    np.matmul(dM.reshape(al * al, F_, P), V.reshape(al * al, C, P).transpose(0, 2, 1), out=dU)
    dw = dw_out if dw_out is not None else np.empty(w.shape, dt)
    if dw.flags.c_contiguous:  # (F·C, 9) = dU^T KG, written in place
        np.matmul(dU.reshape(al * al, F_ * C).T, KGt.T, out=dw.reshape(F_ * C, 9))
    else:
        dw[...] = (KGt @ dU.reshape(al * al, F_ * C)).reshape(3, 3, F_, C).transpose(2, 3, 0, 1)
    db = None
    if has_bias:
        db = db_out if db_out is not None else np.empty(F_, dt)
        np.sum(dout, axis=(1, 2, 3), out=db)
    if not need_dx:
        return None, dw, db
    dV = scratch(ws, "wD", (al * al, C * P), dt)
    np.matmul(U.transpose(0, 2, 1), dM.reshape(al * al, F_, P), out=dV.reshape(al * al, C, P))
    dx = buffer(ws, key + "wdx", (C, H, W, N), dt)
    blocks = _channel_blocks(C, al * al * P * dt.itemsize)
    nb = blocks[0].stop - blocks[0].start
    dD = scratch(ws, "wdD", (al * al * nb * P,), dt)
    Z = scratch(ws, "wZ", (m * m * nb * (th + 1) * (tw + 1) * N,), dt)
    for cb in blocks:
        n = cb.stop - cb.start
        d = dD[:al * al * n * P].reshape(al * al, n * P)
        _transform(B, dV[:, cb.start * P:cb.stop * P], d, ws, "wT")
        d6 = d.reshape(al, al, n, th, tw, N)
        # Overlap-add of the tiles (size m + 2, stride m) by phase: padded row m·u + p gets tile
        # row u at offset p and tile row u - 1 at offset p + m (when p + m < m + 2); likewise
        # for columns.
        z6 = Z[:m * m * n * (th + 1) * (tw + 1) * N].reshape(m, m, n, th + 1, tw + 1, N)
        z6.fill(0)
        for p in range(m):
            for q in range(m):
                z = z6[p, q]
                for k in range(2):
                    for l in range(2):
                        if p + m * k < al and q + m * l < al:
                            z[:, k:k + th, l:l + tw] += d6[p + m * k, q + m * l]
        # Unpadded row h is padded row h + 1 = m·u + p: p = (h + 1) % m, u = (h + 1) // m.
        for ph in range(m):
            for pw in range(m):
                nh, nw = (H - ph + m - 1) // m, (W - pw + m - 1) // m
                u0, v0 = (ph + 1) // m, (pw + 1) // m
                dx[cb, ph::m, pw::m] = z6[(ph + 1) % m, (pw + 1) % m, :, u0:u0 + nh, v0:v0 + nw]
    return dx, dw, db

"""Row-parallel weight gradients: a big affine layer's weight gradient made once for the whole
minibatch, by rows, each worker the rows of its own slice, straight into the summed gradient.

Why. Data parallelism makes every one of N workers write the full (M, D) weight gradient of its
shard, and the reduction read all N back: for the course model's 8192 -> 512 layer that is 16 MB
written per worker per step however few its samples (25 at batch 50 on two workers), plus
2·16 MB read and 16 MB written by the sum, all over the one memory bus two cores share. And
its GEMM, `dout.T @ x` with K = the shard's samples, is the least efficient product of the step.

How. In the compute phase such a layer (`Affine.deferred`) makes its bias and input gradients as
usual, but only copies its input x and output gradient dout into shared memory, at its shard's
place in the step's minibatch: B·(D + M) floats, 1.7 MB at batch 50. After every worker has
answered, in the reduce phase, worker w computes the rows of dW = dout.T @ x (over all B samples,
K = B) that lie in its slice of the flat vector, writing them into `reduced`; the sum of the N
buffers skips those ranges (`reduce.reduce_and_step`'s `deferred`). The bus carries each
weight-gradient element once instead of 2N + 1 times.

Used only where it is exact in meaning and simple in bookkeeping (`deferred_layers`): the sharded
reduction with N >= 2 workers on one machine, without micro-batches (those sum fixed rows for the
same bits at any N), without --accumulate's passes, a model that runs its shard in one piece (no
chunk_size), affine layers of at least MIN_WEIGHTS weights. The result equals the summed
per-worker gradients up to rounding (one sum over B samples instead of N partial sums).
"""
from __future__ import annotations

import numpy as np

from ..nn.layers import Affine

MIN_WEIGHTS = 1 << 20  # smaller layers: not worth the copies into shared memory


def deferred_layers(model, n_workers: int, sharded: bool, max_batch: int | None,
                    micro: int | None, chunk: int | None, across_machines: bool) -> list[str]:
    """Names of the model's affine layers whose weight gradient goes row-parallel (see the
    module docstring for when)."""
    if (n_workers < 2 or not sharded or not max_batch or micro or chunk or across_machines
            or model.chunk_size):
        return []
    return [layer.name for layer in model.layers
            if isinstance(layer, Affine) and layer.d_in * layer.d_out >= MIN_WEIGHTS]


def shm_specs(model, names: list[str], max_batch: int) -> dict:
    """The shared arrays: per layer its inputs (D·max_batch) and output gradients (max_batch·M)."""
    specs = {}
    for layer in (model.layers[model.layer_names.index(n)] for n in names):
        specs[f"rowx_{layer.name}"] = ((layer.d_in * max_batch,), model.dtype)
        specs[f"rowd_{layer.name}"] = ((max_batch * layer.d_out,), model.dtype)
    return specs


class DeferredWeight:
    """One layer's stash in shared memory and its share of the rows (in a worker).

    Per step: `begin(batch, offset)` (the step's size and where this shard starts in it), the
    layer's backward calls `put`, and after the barrier `fill` writes this worker's rows.
    model, index: the worker's model and the layer's place in it (None: a layer on its own)."""

    def __init__(self, layer, x_buf: np.ndarray, d_buf: np.ndarray, w_lo: int, model=None,
                 index: int = 0):
        self.layer, self.x_buf, self.d_buf = layer, x_buf, d_buf
        self.D, self.M = layer.d_in, layer.d_out
        self.w_lo, self.w_hi = w_lo, w_lo + self.D * self.M
        self.model, self.index = model, index
        self.batch = self.offset = 0

    def skipped(self) -> bool:
        """The model runs no backward through this layer (frozen before the first trainable)."""
        return self.model is not None and self.index < self.model.backward_from

    def begin(self, batch: int, offset: int) -> None:
        if batch * self.D > self.x_buf.size:
            raise ValueError(f"a step of {batch} samples is larger than max_batch "
                             f"({self.x_buf.size // self.D})")
        self.batch, self.offset = int(batch), int(offset)

    def _x(self) -> np.ndarray:  # (D, B): the layout of Flatten's transposed view
        return self.x_buf[:self.D * self.batch].reshape(self.D, self.batch)

    def _d(self) -> np.ndarray:  # (B, M)
        return self.d_buf[:self.batch * self.M].reshape(self.batch, self.M)

    def put(self, x: np.ndarray, dout: np.ndarray) -> None:
        """This shard's layer input (n, D) and output gradient (n, M), into its columns/rows."""
        n, a = len(dout), self.offset
        if a + n > self.batch:
            raise ValueError(f"shard [{a}, {a + n}) is outside the step of {self.batch}")
        np.copyto(self._x()[:, a:a + n], x.T)
        np.copyto(self._d()[a:a + n], dout)

    def fill(self, reduced: np.ndarray, lo: int, hi: int) -> None:
        """reduced[lo:hi] ∩ this layer's weights = those elements of dout.T @ x over the step."""
        a, b = max(lo, self.w_lo) - self.w_lo, min(hi, self.w_hi) - self.w_lo
        if b <= a:
            return
        if self.skipped():  # frozen before the first trainable layer: zero, as its views are
            reduced[self.w_lo + a:self.w_lo + b] = 0  # when not deferred (Model.set_frozen)
            return
        D, x, d = self.D, self._x(), self._d()
        dw = reduced[self.w_lo:self.w_hi].reshape(self.M, D)
        r0, r1 = -(-a // D), b // D          # whole rows [r0, r1)
        if r0 > r1:                          # a and b inside one row
            np.matmul(x[a % D:b % D], d[:, r1], out=dw[r1, a % D:b % D])
            return
        if r1 > r0:
            np.matmul(d[:, r0:r1].T, x.T, out=dw[r0:r1])
        if a % D:                            # the tail of row r0 - 1
            np.matmul(x[a % D:], d[:, r0 - 1], out=dw[r0 - 1, a % D:])
        if b % D:                            # the head of row r1
            np.matmul(x[:b % D], d[:, r1], out=dw[r1, :b % D])


class Deferred:
    """All deferred layers of a worker's model, as `reduce_and_step` uses them."""

    def __init__(self, parts: list[DeferredWeight]):
        self.parts = parts
        self.ranges = sorted((p.w_lo, p.w_hi) for p in parts)

    def begin(self, batch: int, offset: int) -> None:
        for p in self.parts:
            p.begin(batch, offset)

    def fill(self, reduced: np.ndarray, lo: int, hi: int) -> None:
        for p in self.parts:
            p.fill(reduced, lo, hi)


def attach(model, shm, names: list[str]) -> Deferred | None:
    """Point the named layers of a worker's model at their stashes; None when there are none."""
    if not names:
        return None
    parts = []
    for name in names:
        i = model.layer_names.index(name)
        layer = model.layers[i]
        layer.deferred = DeferredWeight(layer, shm[f"rowx_{name}"], shm[f"rowd_{name}"],
                                        model.layout.offsets[f"{name}.w"], model, i)
        parts.append(layer.deferred)
    return Deferred(parts)

"""One training step in this process: the reference path with no subprocess.

`LocalRunner` and `parallel.engine.ParallelRunner` share one contract (docs/INTERFACES.md) and the
two functions below, so that N workers compute exactly what one process computes, only split:
`split_shards` cuts a minibatch into contiguous shards of whole batch-norm groups, and
`shard_gradient` is what one process (or one worker) does with its shard.
"""
from __future__ import annotations

import numpy as np

from .batches import make_batch, normaliser
from .nn.models import build_model
from .optim import build_optimizer


def split_shards(lo: int, hi: int, n_workers: int, group_size: int = 1) -> list[tuple[int, int]]:
    """Contiguous [lo, hi) pieces of whole groups; group counts differ by at most one.

    Workers past the number of groups get an empty shard (lo == hi).
    """
    n_groups = -(-(hi - lo) // group_size)
    base, extra = divmod(n_groups, n_workers)
    shards, start = [], lo
    for w in range(n_workers):
        stop = min(hi, start + (base + (w < extra)) * group_size)
        shards.append((start, stop))
        start = stop
    return shards


def n_groups(n: int, group_size: int) -> int:
    return -(-n // group_size)


def shard_gradient(model, images, labels, idx, scale, shift, loss_scale, stats_out=None,
                   xbuf=None) -> tuple[float, int, np.ndarray | None]:
    """Gradient of loss_scale * (sum of losses over samples idx) into the model's bound grads.

    Returns (loss_sum, n_correct, xbuf) — xbuf is the reusable input buffer for the next call.
    An empty shard zeroes the gradient so that sums over workers stay right.
    """
    if len(idx) == 0:
        model.grads[:] = 0
        if stats_out is not None:
            stats_out[:] = 0
        return 0.0, 0, xbuf
    x, y = make_batch(images, labels, idx, scale, shift, out=xbuf, dtype=model.dtype)
    loss_sum, correct = model.train_step(x, y, loss_scale, stats_out)
    return loss_sum, correct, (xbuf if xbuf is not None and xbuf.shape[0] >= len(idx) else x)


def make_optimizer(model, optimizer_spec: tuple[str, dict]):
    name, hyper = optimizer_spec
    return build_optimizer(name, decay_ranges=model.layout.decay_ranges(),
                           lr_scale_ranges=model.layout.lr_scale_ranges(), **hyper)


class LocalRunner:
    """The whole step in this process: gradient, batch-norm statistics, optimizer."""

    def __init__(self, model_spec: tuple[str, dict], optimizer_spec: tuple[str, dict],
                 images: np.ndarray, labels: np.ndarray, mean, std, seed: int = 0):
        name, options = model_spec
        self.model = build_model(name, **options)
        m = self.model
        self.params = np.zeros(m.layout.size, m.dtype)
        self.grads = np.zeros(m.layout.size, m.dtype)
        self.state = np.zeros(m.state_layout.size, m.dtype)
        self.stats = np.zeros(m.stats_size, m.dtype) if m.stats_size else None
        m.bind(self.params, self.grads, self.state)
        m.init_params(np.random.default_rng(seed))
        self.optimizer = make_optimizer(m, optimizer_spec)
        self.opt_state = {k: np.zeros(m.layout.size, m.dtype) for k in self.optimizer.state_names}
        self.images, self.labels = images, labels
        self.scale, self.shift = normaliser(mean, std)
        self.order = np.arange(len(labels))
        self._xbuf = None

    def set_order(self, order: np.ndarray) -> None:
        self.order = np.asarray(order)

    def step(self, lo: int, hi: int, lr: float, t: int) -> tuple[float, int]:
        n = hi - lo
        loss, correct, self._xbuf = shard_gradient(
            self.model, self.images, self.labels, self.order[lo:hi], self.scale, self.shift,
            1.0 / n, self.stats, self._xbuf)
        if self.stats is not None:
            self.model.merge_stats(self.stats, n_groups(n, self.model.group_size))
        self.optimizer.step(self.params, self.grads, self.opt_state, t, lr)
        return loss, correct

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

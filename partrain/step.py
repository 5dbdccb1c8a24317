"""What one process does for a training step, shared by both runners and every worker.

`runner.LocalRunner` and `parallel.engine.ParallelRunner` compute exactly the same thing, only
split: `split_shards` cuts a minibatch into contiguous shards of whole batch-norm groups, and
`shard_gradient` is what one process (or one worker) does with its shard; `merge_stats` adds the
shards' batch-norm statistics in a fixed order. `init_model` is the one way a process sets up its
replica of the model (the parent initialises it, a worker binds it to shared memory), so N
workers start from exactly what one process starts from.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence, Union

import numpy as np

from .batches import make_batch, normaliser
from .nn.model import params_version
from .nn.models import build_model
from .optim import make_optimizer

Arrays = tuple[np.ndarray, np.ndarray, np.ndarray]  # params, grads, state


@dataclass
class Replica:
    """One process's model, bound to its flat vectors, with its optimizer and normaliser."""

    model: object
    optimizer: object
    params: np.ndarray
    grads: np.ndarray
    state: np.ndarray
    scale: np.ndarray
    shift: np.ndarray

    def initialise(self, seed: int, images, init_idx, mean, std) -> None:
        """`init_params(default_rng(seed))`, then `init_from_data` on images[init_idx] (the
        training indices; None: all): what the parent does once, before any step."""
        self.model.init_params(np.random.default_rng(seed))
        self.model.init_from_data(images, init_idx, mean, std)


def init_model(model_spec, optimizer_spec, mean, std,
               arrays: Union[Arrays, Callable[[object, object], Arrays], None] = None,
               seed: int | None = None, images=None, init_idx=None) -> Replica:
    """Build the model of `model_spec` = (name or factory, options) and its optimizer, and bind it.

    arrays: the (params, grads, state) vectors to bind, or a function (model, optimizer) -> them
    for a caller that sizes shared memory by the model; None: fresh zeros in this process.
    seed: `Replica.initialise` them from (seed, images, init_idx) (the parent); None: they are
    already there (a worker reads them from shared memory) or the caller initialises them.
    """
    name, options = model_spec
    options = dict(options or {})
    model = build_model(name, **options) if isinstance(name, str) else name(**options)
    optimizer = make_optimizer(model, optimizer_spec)
    if arrays is None:
        arrays = (np.zeros(model.layout.size, model.dtype), np.zeros(model.layout.size, model.dtype),
                  np.zeros(model.state_layout.size, model.dtype))
    elif callable(arrays):
        arrays = arrays(model, optimizer)
    params, grads, state = arrays
    model.bind(params, grads, state)
    rep = Replica(model, optimizer, params, grads, state, *normaliser(mean, std))
    if seed is not None:
        rep.initialise(seed, images, init_idx, mean, std)
    return rep


def active_augment(augment):
    """The AugmentSpec the workers apply, or None when it would change nothing."""
    return augment if augment is not None and augment.active else None


def split_shards(lo: int, hi: int, n_workers: int, group_size: int = 1) -> list[tuple[int, int]]:
    """Contiguous [lo, hi) pieces of whole groups; group counts differ by at most one.

    Workers past the number of groups get an empty shard (lo == hi).
    """
    base, extra = divmod(n_groups(hi - lo, group_size), n_workers)
    shards, start = [], lo
    for w in range(n_workers):
        stop = min(hi, start + (base + (w < extra)) * group_size)
        shards.append((start, stop))
        start = stop
    return shards


def n_groups(n: int, group_size: int) -> int:
    return -(-n // group_size)


def shard_gradient(model, images, labels, idx, scale, shift, loss_scale, stats_out=None,
                   xbuf=None, augment=None, epoch: int = 0) -> tuple[float, int, np.ndarray | None]:
    """Gradient of loss_scale * (sum of losses over samples idx) into the model's bound grads.

    augment: an `augment.AugmentSpec` or None; each sample is flipped/translated as (seed, epoch,
    its index) decide, so the result does not depend on who computes which shard.
    Returns (loss_sum, n_correct, xbuf) — xbuf is the reusable input buffer for the next call.
    An empty shard zeroes the gradient so that sums over workers stay right.
    """
    if len(idx) == 0:
        model.grads[:] = 0
        if stats_out is not None:
            stats_out[:] = 0
        return 0.0, 0, xbuf
    x, y = make_batch(images, labels, idx, scale, shift, out=xbuf, dtype=model.dtype,
                      augment=augment, epoch=epoch)
    loss_sum, correct = model.train_step(x, y, loss_scale, stats_out)
    return loss_sum, correct, (xbuf if xbuf is not None and xbuf.shape[0] >= len(idx) else x)


# ------------------------------------------------------- accumulation (--accumulate K, no rows)
# An optimizer step of K batches of --batch-size B, computed one batch ("pass") at a time so that
# activations are held for one pass only: each pass is cut into shards as a step is (by machine,
# then by worker), and each process adds its shards' gradients in pass order. With micro-batches
# none of this is needed: a step of K·B samples is a run of micro-batches, each its own pass.

def pass_shards(lo: int, hi: int, chunk: int, group: int,
                parts: Sequence[tuple[int, int]] = ()) -> list[tuple[int, int]]:
    """This process's [a, b) of each pass of `chunk` samples of the step [lo, hi): every pass cut
    by `split_shards` level by level, parts = [(n, i), ...] (e.g. [(ranks, rank), (workers, w)];
    none: the whole pass)."""
    out = []
    for start in range(lo, hi, chunk):
        a, b = start, min(hi, start + chunk)
        for n, i in parts:
            a, b = split_shards(a, b, n, group)[i]
        out.append((a, b))
    return out


def stats_batch(batch: int, chunk: int | None, group: int) -> int:
    """The sample count whose `n_groups` is the number of batch-norm groups of a step of `batch`
    samples in passes of `chunk` (each pass ends its last group): what `merge_stats` divides by."""
    if not chunk or chunk >= batch:
        return batch
    return group * sum(n_groups(min(chunk, batch - a), group) for a in range(0, batch, chunk))


def accumulated_gradient(model, images, labels, order, passes, scale, shift, loss_scale,
                         stats_out=None, xbuf=None, augment=None, epoch: int = 0,
                         aside: dict | None = None) -> tuple[float, int, np.ndarray | None]:
    """`shard_gradient` of the samples order[a:b] of each pass (a, b), summed in pass order into
    the bound grads (and stats_out): before each later pass the sum so far is put aside (into
    `aside`, the caller's buffers, kept between steps) and added back after it, as
    `Model.train_step` does with its chunks. One pass is exactly `shard_gradient`."""
    loss, correct = 0.0, 0
    aside = {} if aside is None else aside
    for j, (a, b) in enumerate(passes):
        sums = [v for v in (model.grads, stats_out) if v is not None] if j else []
        saved = [_copy_into(aside, i, v) for i, v in enumerate(sums)]
        pass_loss, pass_correct, xbuf = shard_gradient(model, images, labels, order[a:b], scale,
                                                       shift, loss_scale, stats_out, xbuf,
                                                       augment, epoch)
        for v, kept in zip(sums, saved):
            v += kept
        loss, correct = ((loss + pass_loss, correct + pass_correct) if j
                         else (pass_loss, pass_correct))
    return loss, correct, xbuf


def _copy_into(buffers: dict, slot: int, vector: np.ndarray) -> np.ndarray:
    kept = buffers.get(slot)
    if kept is None or kept.shape != vector.shape:
        kept = buffers[slot] = np.empty_like(vector)
    np.copyto(kept, vector)
    return kept


# ---------------------------------------------------------------- micro-batches (any N, same bits)
# With `micro_batch` M set, a step's samples are cut into micro-batches of M (the last may be
# shorter) that never depend on who computes them: each one's gradient, batch-norm statistics,
# loss and correct count go into a row of their own (row k for micro-batch k), and the rows are
# summed in the order k = 0, 1, ... Workers (and machines) get contiguous runs of whole
# micro-batches (`split_shards` with group M), so the arithmetic is the same for any N.

def n_micro(n: int, micro: int) -> int:
    """Micro-batches in a step of n samples."""
    return -(-n // micro)


def micro_gradients(model, images, labels, order, step_lo: int, lo: int, hi: int, micro: int,
                    grad_rows, result_rows, stats_rows, scale, shift, loss_scale, xbuf=None,
                    augment=None, epoch: int = 0):
    """The micro-batches order[lo:hi] of a step that starts at order[step_lo] (lo - step_lo a
    multiple of `micro`): micro-batch k's gradient of loss_scale·(sum of its losses) into
    grad_rows[k], its batch-norm statistics into stats_rows[k] (None: the model has none), its
    (loss sum, n correct) into result_rows[k]. Returns the input buffer for the next call.

    Each micro-batch is one `train_step` with the grads bound to its row (`Model.bind_grads`),
    so its bits do not depend on the rows around it; the model stays bound to the last row.
    They share one parameters version (what layers compute from the parameters alone is kept)."""
    version = params_version()
    for a in range(lo, hi, micro):
        k = (a - step_lo) // micro
        b = min(hi, a + micro)
        model.bind_grads(grad_rows[k])
        x, y = make_batch(images, labels, order[a:b], scale, shift, out=xbuf, dtype=model.dtype,
                          augment=augment, epoch=epoch)
        if xbuf is None or xbuf.shape[0] < b - a:
            xbuf = x
        stats = stats_rows[k] if stats_rows is not None else None
        result_rows[k] = model.train_step(x, y, loss_scale, stats, version)
    return xbuf


def sum_results(rows: np.ndarray) -> tuple[float, int]:
    """(loss sum, n correct) of result rows (k, 2), added in the order k = 0, 1, ..."""
    loss, correct = 0.0, 0
    for k in range(len(rows)):
        loss += float(rows[k, 0])
        correct += int(rows[k, 1])
    return loss, correct


def sum_stats(stats: Sequence[np.ndarray]) -> np.ndarray:
    """The shards' batch-norm statistics (one row per shard) summed in order w = 0..N-1, so
    bit-reproducibly, into a new array."""
    total = np.array(stats[0])
    for row in stats[1:]:
        total += row
    return total


def merge_stats(model, stats: Sequence[np.ndarray], batch: int) -> None:
    """Fold the shards' batch-norm statistics of a step of `batch` samples into the model's
    running statistics."""
    if model.stats_size:
        model.merge_stats(sum_stats(stats), n_groups(batch, model.group_size))

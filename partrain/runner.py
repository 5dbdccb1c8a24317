"""One training step in this process (the reference path, no subprocess), and the runner choice.

`LocalRunner` and `parallel.engine.ParallelRunner` share one contract (docs/INTERFACES.md) and
the step core in `step`, so that N workers compute exactly what one process computes, only split.
"""
from __future__ import annotations

import numpy as np

from .clipping import Clipper
from .optim import sync_frozen
from .parallel.engine import ParallelRunner
from .parallel.reduce import sum_into
from .step import (accumulated_gradient, active_augment, init_model, merge_stats,
                   micro_gradients, n_micro, pass_shards, stats_batch, sum_results)


class LocalRunner:
    """The whole step in this process: gradient, batch-norm statistics, optimizer."""

    def __init__(self, model_spec: tuple[str, dict], optimizer_spec: tuple[str, dict],
                 images: np.ndarray, labels: np.ndarray, mean, std, seed: int = 0,
                 augment=None, init_idx=None, micro_batch: int | None = None,
                 clip_norm: float | None = None, chunk: int | None = None):
        """augment: an `augment.AugmentSpec` or None; init_idx: the training indices that
        `init_from_data` may look at (None: all images); micro_batch: sum over micro-batches of
        this size in a fixed order (`step.micro_gradients`), as the engine does with any N;
        clip_norm: clip the summed gradient to this global L2 norm (`clipping`); chunk: compute
        a step in passes of this many samples (--accumulate; `step.accumulated_gradient`)."""
        rep = init_model(model_spec, optimizer_spec, mean, std, seed=seed, images=images,
                         init_idx=init_idx)
        self.model, self.optimizer = rep.model, rep.optimizer
        m = self.model
        self.params, self.grads, self.state = rep.params, rep.grads, rep.state
        self.scale, self.shift = rep.scale, rep.shift
        self.stats = np.zeros(m.stats_size, m.dtype) if m.stats_size else None
        self.opt_state = {k: np.zeros(m.layout.size, m.dtype) for k in self.optimizer.state_names}
        self.images, self.labels = images, labels
        self.order = np.arange(len(labels))
        self.epoch = 0
        self.augment = active_augment(augment)
        self._xbuf = None
        self.micro = micro_batch
        self._rows = None  # micro-batch gradient rows (k, P), results (k, 2), stats (k, S)
        self.chunk, self._aside = chunk, {}
        self.clip = Clipper(clip_norm, m.layout.size) if clip_norm else None

    def set_order(self, order: np.ndarray, epoch: int = 0) -> None:
        """The coming epoch's permutation of train indices, and its number (for augmentation)."""
        self.order = np.asarray(order)
        self.epoch = int(epoch)

    def step(self, lo: int, hi: int, lr: float, t: int) -> tuple[float, int]:
        n = hi - lo
        sync_frozen(self.model, self.optimizer, t)
        if self.micro:
            return self._micro_step(lo, hi, lr, t)
        group = self.model.group_size
        passes = pass_shards(lo, hi, self.chunk, group) if self.chunk else [(lo, hi)]
        loss, correct, self._xbuf = accumulated_gradient(
            self.model, self.images, self.labels, self.order, passes, self.scale, self.shift,
            1.0 / n, self.stats, self._xbuf, self.augment, self.epoch, self._aside)
        if self.stats is not None:
            merge_stats(self.model, [self.stats], stats_batch(n, self.chunk, group))
        if self.clip is not None:
            self.clip.clip(self.grads)
        self.optimizer.step(self.params, self.grads, self.opt_state, t, lr)
        return loss, correct

    def _micro_step(self, lo: int, hi: int, lr: float, t: int) -> tuple[float, int]:
        """The step as sums over micro-batch rows in the order k = 0, 1, ... (what every worker
        count computes), into self.grads, then the optimizer."""
        m, k = self.model, n_micro(hi - lo, self.micro)
        if self._rows is None or len(self._rows[0]) < k:
            self._rows = (np.zeros((k, m.layout.size), m.dtype), np.zeros((k, 2)),
                          np.zeros((k, m.stats_size), m.dtype) if m.stats_size else None)
        grads, results, stats = self._rows
        self._xbuf = micro_gradients(m, self.images, self.labels, self.order, lo, lo, hi,
                                     self.micro, grads, results, stats, self.scale, self.shift,
                                     1.0 / (hi - lo), self._xbuf, self.augment, self.epoch)
        m.bind_grads(self.grads)  # the model's gradient views back on the summed vector
        sum_into(list(grads[:k]), self.grads, 0, m.layout.size)
        if stats is not None:
            merge_stats(m, stats[:k], hi - lo)
        if self.clip is not None:
            self.clip.clip(self.grads)
        self.optimizer.step(self.params, self.grads, self.opt_state, t, lr)
        return sum_results(results[:k])

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def make_runner(cfg, data, model_spec, opt_spec, train_idx=None, stop=None, cross=None,
                log_dir=None, step_timeout=None, micro_batch=None, on_restart=None,
                normalization=None):
    """LocalRunner for one worker, the engine for more; both initialise the model identically
    (init_from_data sees only `train_idx`) and augment as cfg says. stop: the driver's
    `interrupt.StopFlag`, so that the engine installs no signal handler of its own. log_dir,
    step_timeout: the engine's (where failing workers write; how long a silent one may take).
    micro_batch: the order-free sum's micro-batch (None: off). on_restart: told what each
    restart after a lost worker did (cfg.on_worker_failure "restart"; one worker has none).
    normalization: the run's (mean, std) (`batches.normalization`; None: the store's).
    --accumulate K: a step is K batches of --batch-size, computed a batch at a time (with
    micro-batches, a micro-batch at a time: no passes needed); --clip-norm: the clipping."""
    mean, std = normalization if normalization is not None else (data.mean, data.std)
    accumulate = cfg.accumulate
    common = dict(seed=cfg.seed, augment=cfg.augment_spec(), init_idx=train_idx,
                  micro_batch=micro_batch, clip_norm=cfg.clip_norm,
                  chunk=cfg.batch_size if accumulate > 1 and not micro_batch else None)
    if cfg.workers == 1 and cross is None:  # under MPI a rank is always a parent of workers
        return LocalRunner(model_spec, opt_spec, data.train_images, data.train_labels,
                           mean, std, **common)
    return ParallelRunner(model_spec, opt_spec, data.train_images, data.train_labels,
                          mean, std, n_workers=cfg.workers, reduction=cfg.reduction,
                          stop=stop, cross=cross, log_dir=log_dir, step_timeout=step_timeout,
                          max_batch=cfg.batch_size * accumulate,
                          on_worker_failure=cfg.on_worker_failure,
                          on_restart=on_restart, **common)

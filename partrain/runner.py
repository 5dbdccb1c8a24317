"""One training step in this process (the reference path, no subprocess), and the runner choice.

`LocalRunner` and `parallel.engine.ParallelRunner` share one contract (docs/INTERFACES.md) and
the step core in `step`, so that N workers compute exactly what one process computes, only split.
"""
from __future__ import annotations

import numpy as np

from .optim import sync_frozen
from .parallel.engine import ParallelRunner
from .step import active_augment, init_model, merge_stats, shard_gradient


class LocalRunner:
    """The whole step in this process: gradient, batch-norm statistics, optimizer."""

    def __init__(self, model_spec: tuple[str, dict], optimizer_spec: tuple[str, dict],
                 images: np.ndarray, labels: np.ndarray, mean, std, seed: int = 0,
                 augment=None, init_idx=None):
        """augment: an `augment.AugmentSpec` or None; init_idx: the training indices that
        `init_from_data` may look at (None: all images)."""
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

    def set_order(self, order: np.ndarray, epoch: int = 0) -> None:
        """The coming epoch's permutation of train indices, and its number (for augmentation)."""
        self.order = np.asarray(order)
        self.epoch = int(epoch)

    def step(self, lo: int, hi: int, lr: float, t: int) -> tuple[float, int]:
        n = hi - lo
        sync_frozen(self.model, self.optimizer, t)
        loss, correct, self._xbuf = shard_gradient(
            self.model, self.images, self.labels, self.order[lo:hi], self.scale, self.shift,
            1.0 / n, self.stats, self._xbuf, self.augment, self.epoch)
        if self.stats is not None:
            merge_stats(self.model, [self.stats], n)
        self.optimizer.step(self.params, self.grads, self.opt_state, t, lr)
        return loss, correct

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def make_runner(cfg, data, model_spec, opt_spec, train_idx=None, stop=None, cross=None,
                log_dir=None, step_timeout=None):
    """LocalRunner for one worker, the engine for more; both initialise the model identically
    (init_from_data sees only `train_idx`) and augment as cfg says. stop: the driver's
    `interrupt.StopFlag`, so that the engine installs no signal handler of its own. log_dir,
    step_timeout: the engine's (where failing workers write; how long a silent one may take)."""
    common = dict(seed=cfg.seed, augment=cfg.augment_spec(), init_idx=train_idx)
    if cfg.workers == 1 and cross is None:  # under MPI a rank is always a parent of workers
        return LocalRunner(model_spec, opt_spec, data.train_images, data.train_labels,
                           data.mean, data.std, **common)
    return ParallelRunner(model_spec, opt_spec, data.train_images, data.train_labels,
                          data.mean, data.std, n_workers=cfg.workers, reduction=cfg.reduction,
                          stop=stop, cross=cross, log_dir=log_dir, step_timeout=step_timeout,
                          **common)

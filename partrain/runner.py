"""One training step in this process: the reference path with no subprocess.

`LocalRunner` and `parallel.engine.ParallelRunner` share one contract (docs/INTERFACES.md) and the
two functions below, so that N workers compute exactly what one process computes, only split:
`split_shards` cuts a minibatch into contiguous shards of whole batch-norm groups, and
`shard_gradient` is what one process (or one worker) does with its shard.

Both runners also do the same things before the first step, in the parent: `init_params(seed)`,
then `init_from_data` (models whose initialisation needs the training images, as airbench's
whitening filters), and both build their optimizer with `make_optimizer`, which can freeze named
parameters after a given step (airbench's whitening bias after 3 epochs).
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


def make_optimizer(model, optimizer_spec: tuple[str, dict]):
    """The optimizer of `optimizer_spec` = (name, hyper) over the model's flat vector: weight decay
    on the model's decay ranges, its per-parameter learning-rate scales.

    hyper may hold "freeze": {parameter name or layer prefix: step count s}: from step t = s + 1
    on, those parameters get a learning-rate scale of 0, i.e. stay exactly as they are (p - 0·d
    == p), as PyTorch's requires_grad = False leaves them. That is one optimizer per phase,
    chosen by t (`PhasedOptimizer`): no state, so a resumed run freezes at the same step.
    """
    name, hyper = optimizer_spec
    hyper = dict(hyper)
    freeze = {k: int(v) for k, v in (hyper.pop("freeze", None) or {}).items()}
    specs = model.layout.specs
    for key in freeze:
        if not any(_matches(s.name, key) for s in specs):
            raise ValueError(f"cannot freeze {key!r}: the model has no such parameter "
                             f"({', '.join(s.name for s in specs)})")

    def build(frozen: set[str]):
        scales = [(model.layout.offsets[s.name], model.layout.offsets[s.name] + s.size,
                   0.0 if any(_matches(s.name, k) for k in frozen) else s.lr_scale)
                  for s in specs if s.size]
        return build_optimizer(name, decay_ranges=model.layout.decay_ranges(),
                               lr_scale_ranges=[r for r in scales if r[2] != 1.0], **hyper)

    if not freeze:
        return build(set())
    starts = sorted({0} | {s + 1 for s in freeze.values()})
    frozen = {t0: {k for k, s in freeze.items() if s + 1 <= t0} for t0 in starts}
    return PhasedOptimizer([(t0, build(frozen[t0])) for t0 in starts], frozen)


def _matches(param: str, key: str) -> bool:
    return param == key or param.startswith(key + ".")


class PhasedOptimizer:
    """Optimizers with the same hyperparameters and state, each used from its first step t on.

    Only their learning-rate scales differ (parameters frozen from some step), so they share the
    flat state vectors; like every optimizer here, stepping a slice equals stepping the whole.
    """

    def __init__(self, phases: list[tuple[int, object]], frozen: dict[int, set] | None = None):
        self.phases = sorted(phases, key=lambda p: p[0])
        self.state_names = self.phases[0][1].state_names
        self.frozen = frozen or {}

    def frozen_at(self, t: int) -> set:
        """The names (parameters or layer prefixes) frozen at step t."""
        return next((self.frozen.get(t0, set()) for t0, _ in reversed(self.phases) if t >= t0),
                    set())

    def at(self, t: int):
        """The optimizer that step t (1-based) uses."""
        chosen = self.phases[0][1]
        for t0, opt in self.phases:
            if t >= t0:
                chosen = opt
        return chosen

    def step(self, params, grads, state, t, lr=None, lo=0, hi=None) -> None:
        self.at(t).step(params, grads, state, t, lr, lo, hi)


def sync_frozen(model, optimizer, t: int) -> None:
    """Tell the model which whole layers the optimizer has frozen by step t, so that it skips
    their backward work (airbench: conv0a's input gradient once the whitening bias is frozen).
    Their parameters stay as they are either way (learning-rate scale 0); this only saves time."""
    if isinstance(optimizer, PhasedOptimizer):
        for key in optimizer.frozen_at(t):
            if key in model.layer_names and key not in model.frozen:
                model.set_frozen(key)


def init_from_data(model, images, idx, mean, std) -> bool:
    """Data-dependent initialisation, after `init_params`, in the parent before any step: the
    model's own `init_from_data` on the training images `images[idx]` (airbench: its whitening
    filters). Returns whether anything was done."""
    return model.init_from_data(images, idx, mean, std)



class LocalRunner:
    """The whole step in this process: gradient, batch-norm statistics, optimizer."""

    def __init__(self, model_spec: tuple[str, dict], optimizer_spec: tuple[str, dict],
                 images: np.ndarray, labels: np.ndarray, mean, std, seed: int = 0,
                 augment=None, init_idx=None):
        """augment: an `augment.AugmentSpec` or None; init_idx: the training indices that
        `init_from_data` may look at (None: all images)."""
        name, options = model_spec
        self.model = build_model(name, **options)
        m = self.model
        self.params = np.zeros(m.layout.size, m.dtype)
        self.grads = np.zeros(m.layout.size, m.dtype)
        self.state = np.zeros(m.state_layout.size, m.dtype)
        self.stats = np.zeros(m.stats_size, m.dtype) if m.stats_size else None
        m.bind(self.params, self.grads, self.state)
        m.init_params(np.random.default_rng(seed))
        init_from_data(m, images, init_idx, mean, std)
        self.optimizer = make_optimizer(m, optimizer_spec)
        self.opt_state = {k: np.zeros(m.layout.size, m.dtype) for k in self.optimizer.state_names}
        self.images, self.labels = images, labels
        self.scale, self.shift = normaliser(mean, std)
        self.order = np.arange(len(labels))
        self.epoch = 0
        self.augment = augment if augment is not None and augment.active else None
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
            self.model.merge_stats(self.stats, n_groups(n, self.model.group_size))
        self.optimizer.step(self.params, self.grads, self.opt_state, t, lr)
        return loss, correct

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

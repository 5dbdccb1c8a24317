"""What "best" means for best.h5, and when --early-stop ends a run.

best.h5 holds the epoch with the best value of --early-stop-on: the validation accuracy (higher
is better; the default, and what best.h5 always meant) or the validation loss (lower is better).
Improving means strictly better than every earlier epoch, so a plateau is no improvement. With
--early-stop PATIENCE the run ends after the first epoch that is PATIENCE epochs past the best
one (never after the last epoch: that run simply ends), and it is finished: its checkpoint says
so and a --resume is refused.
"""
from __future__ import annotations

import math

import numpy as np


def validate(model, images, labels, scale, shift, idx, batch: int = 1000,
             phase=None) -> tuple[float, float]:
    """(accuracy, mean cross-entropy) of `model` on images[idx], from one pass: the accuracy is
    `evaluate.accuracy`'s (the same batches, the same argmax); the loss is the plain softmax
    cross-entropy of the logits, in float64 (no label smoothing, whatever training uses).
    phase: a progress.Phase told of every batch."""
    from .evaluate import batched_logits
    if not len(idx):
        return float("nan"), float("nan")
    right, loss = 0, 0.0
    for lo, z, _ in batched_logits(model, images, idx, scale, shift, batch=batch, phase=phase):
        y = labels[idx[lo:lo + len(z)]].astype(np.int64)
        right += int((z.argmax(axis=1) == y).sum())
        top = z.max(axis=1, keepdims=True)
        lse = top[:, 0] + np.log(np.exp(z - top).sum(axis=1))
        loss += float((lse - z[np.arange(len(y)), y]).sum())
    return right / len(idx), loss / len(idx)


def observe(state, cfg, val_acc: float, val_loss: float) -> bool:
    """Record the validation of the epoch just ended (state.epoch, 1-based) in `state`; True
    when it is the new best by cfg.early_stop_on (best.h5 is then written)."""
    acc_better = val_acc > state.best_val  # NaN (no validation set) is never better
    loss_better = math.isfinite(val_loss) and (state.best_val_loss is None
                                               or val_loss < state.best_val_loss)
    state.best_val = max(state.best_val, val_acc)
    if loss_better:
        state.best_val_loss = val_loss
    improved = loss_better if cfg.early_stop_on == "val_loss" else acc_better
    if improved:
        state.best_epoch = state.epoch
    return improved


def stop_reason(state, cfg) -> str | None:
    """The line that ends the run after epoch state.epoch, or None while it goes on."""
    if not cfg.early_stop or state.epoch >= cfg.epochs:
        return None
    waited = state.epoch - state.best_epoch
    if waited < cfg.early_stop:
        return None
    what = cfg.early_stop_on
    if not state.best_epoch:
        return f"stopped early: {what} has not been finite for {waited} epochs"
    best = (f"{state.best_val_loss:.4f}" if what == "val_loss"
            else f"{100 * state.best_val:.1f} %")
    return (f"stopped early: {what} has not improved for {waited} epochs since epoch "
            f"{state.best_epoch} (best {best})")

"""Named training presets: `partrain fit --recipe NAME` sets these TrainConfig fields in one word.

A recipe only fills in settings: options given on the command line win over it, and the resulting
settings (with the recipe's name) are what config.json records, so `--resume` needs no recipe.

`airbench` is Keller Jordan's airbench94 (github.com/KellerJordan/airbench, 94 % on CIFAR-10 in
~3.8 s on an A100) for the model `airbench`, converted to our conventions:

- Loss. airbench SUMS the per-sample losses of a batch; we average them. With momentum μ = 0.85 it
  uses PyTorch SGD with lr_torch = 11.5 / (1024·(1 + 1/(1-μ))) on the summed loss, i.e. a step of
  lr_torch·Σ gᵢ = (lr_torch·bs)·mean gᵢ. On the mean loss that is lr = 11.5·bs / (1024·(1 +
  1/0.15)) = 1.5 for bs = 1024.
- Weight decay. airbench passes weight_decay = wd/lr_torch = 0.0153·bs/11.5 to PyTorch SGD, which
  adds it to the (summed-loss) gradient before momentum ("coupled"). Dividing the whole gradient
  by bs to get our mean-loss gradient, the coupled decay becomes 0.0153/11.5 ≈ 1.33e-3 for any bs
  (our SGD's default, decoupled=False, is exactly PyTorch's coupled form). Its effective per-step
  shrink lr·wd = 0.0153·bs/(1024·(1 + 1/0.15)) is airbench's `wd`. Decay applies to the conv and
  head weights only (the model's decay ranges); see nn/airbench.py for why the BN biases are not
  decayed.
- BN biases: learning rate × 64 (the model's ParamSpec lr_scale, airbench's bias_scaler).
- Schedule: `onecycle`, 0.2 → 1 at 23 % of the steps → 0.07 at the end (airbench's triangle),
  label smoothing 0.2 (the model's default).
- Epochs: airbench94 trains 9.9 epochs (ceil(48·9.9) = 476 steps, the last epoch cut short). Our
  epochs are whole: we round to 10 (480 steps of 1024 on the 49,000 images left after the default
  1,000-image validation split: 47 full batches and one of 872 per epoch).
- Whitening: the first conv's filters come from the 2×2 patch covariance of the first 5000
  training-split images (`runner.init_from_data`); its bias trains for 3 epochs, then is frozen
  (`freeze_after`: learning-rate scale 0 from step 3·steps_per_epoch + 1 on, exactly as PyTorch's
  requires_grad = False leaves it).
- Augmentation: alternating flips and translation by up to 2 px (reflect padding), keyed by
  (seed, epoch, sample index). TTA level 2 (`flip_translate`) for the final test accuracy.
- Lookahead as airbench94's: every 5 steps the weights and batch-norm statistics are pulled to a
  slow average with decay 0.95⁵·(t/T)³, and the run ends on the average (`train.AirbenchLookahead`).
- Not here: airbench94's last-epoch fraction (see Epochs); batch-norm statistics over ghost
  batches of 64 instead of the whole batch (see nn/airbench.py).

A different --batch-size with the recipe rescales its lr (lr ∝ batch size) unless --lr is given.

`airbench-short` is the same for 3 epochs (whitening bias frozen after 1), for a run of minutes on
a few CPU cores rather than a full one.
"""
from __future__ import annotations

from .errors import PartrainError

MOMENTUM = 0.85
BATCH = 1024


def airbench_lr(batch_size: int = BATCH, lr_per_1024: float = 11.5,
                momentum: float = MOMENTUM) -> float:
    """airbench's learning rate for our mean-reduced loss (see the module docstring)."""
    return lr_per_1024 * batch_size / (1024 * (1 + 1 / (1 - momentum)))


AIRBENCH = dict(
    model="airbench", model_options={}, optimizer="sgd", lr=airbench_lr(), momentum=MOMENTUM,
    nesterov=True, weight_decay=0.0153 / 11.5, schedule="onecycle", warmup_epochs=0.0,
    batch_size=BATCH, epochs=10, augment_flip=True, augment_translate=2,
    freeze_after={"whiten_bias": 3}, tta="flip_translate", lookahead=True)

RECIPES: dict[str, dict] = {
    "airbench": AIRBENCH,
    "airbench-short": {**AIRBENCH, "epochs": 3, "freeze_after": {"whiten_bias": 1}},
}


def apply_recipe(name: str, settings: dict, explicit: set[str]) -> dict:
    """`settings` (TrainConfig fields) with the preset filled in where not `explicit`ly given.

    model_options merge (the command line's on top of the preset's). An explicit batch size
    without an explicit lr rescales airbench's lr with it (lr ∝ batch size on the mean loss,
    as airbench's formula gives); its weight decay needs no change.
    """
    preset = recipe(name)
    out = dict(settings)
    for key, value in preset.items():
        if key == "model_options":
            out[key] = {**value, **settings.get(key, {})}
        elif key not in explicit:
            out[key] = value
    if name.startswith("airbench") and "batch_size" in explicit and "lr" not in explicit:
        out["lr"] = airbench_lr(out["batch_size"])
    out["recipe"] = name
    return out


def recipe(name: str) -> dict:
    """A copy of the named preset's settings (TrainConfig field -> value)."""
    try:
        preset = RECIPES[name]
    except KeyError:
        raise PartrainError(f"unknown recipe {name!r}; choose from {', '.join(RECIPES)}") from None
    return {k: (dict(v) if isinstance(v, dict) else v) for k, v in preset.items()}

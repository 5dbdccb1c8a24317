"""What `--recipe NAME` fills in (RECIPES, `apply_recipe`), and the optimizer a run's settings
ask for (`optimizer_spec`): the settings turned into things the loop uses, beside config.py's one
schema of them."""
from __future__ import annotations

import dataclasses

from .config import TrainConfig
from .errors import PartrainError


def optimizer_spec(cfg: TrainConfig, model, steps_per_epoch: int = 1) -> tuple[str, dict]:
    """(name, hyper) for `runner.make_optimizer`; freeze_after's epochs become step counts."""
    wd = model.weight_decay if cfg.weight_decay is None else cfg.weight_decay
    hyper = {"weight_decay": wd}  # the learning rate goes with every step (the schedule)
    if cfg.freeze_after:
        names = [s.name for s in model.layout.specs]
        for key in cfg.freeze_after:
            if not any(n == key or n.startswith(key + ".") for n in names):
                raise PartrainError(f"--freeze-after {key}: model {cfg.model} has no such "
                                    f"parameter or layer (see partrain fit --dry-run)")
        hyper["freeze"] = {k: int(round(v * steps_per_epoch)) for k, v in cfg.freeze_after.items()}
    if cfg.optimizer == "sgd":
        hyper.update(momentum=cfg.momentum, nesterov=cfg.nesterov)
    return cfg.optimizer, hyper  # adam, adamw: optim.build_optimizer's own betas


# ----------------------------------------------------------------------------------- recipes
# `partrain fit --recipe NAME` fills in these settings where the command line does not give them;
# config.json records the result (with the recipe's name), so --resume needs no recipe.
#
# `airbench` is Keller Jordan's airbench94 (github.com/KellerJordan/airbench, 94 % on CIFAR-10 in
# ~3.8 s on an A100) for the model `airbench`, in our conventions:
# - Loss: airbench SUMS the batch's losses, we average them. Its PyTorch SGD (momentum μ = 0.85)
#   has lr_torch = 11.5 / (1024·(1 + 1/(1-μ))) on the sum, a step of (lr_torch·bs)·mean gᵢ: on
#   the mean loss lr = 11.5·bs / (1024·(1 + 1/0.15)) = 1.5 for bs = 1024 (`airbench_lr`).
# - Weight decay: airbench's weight_decay = 0.0153·bs/11.5 is coupled (added to the summed-loss
#   gradient before momentum, as our SGD's default); divided by bs for our mean-loss gradient it is
#   0.0153/11.5 ≈ 1.33e-3 for any bs, and lr·wd is airbench's per-step shrink. It decays the conv
#   and head weights only (the model's decay ranges; nn/airbench.py says why not the BN biases).
# - From the model: BN biases learn 64× faster (airbench's bias_scaler), label smoothing 0.2.
# - Schedule `onecycle`: 0.2 → 1 at 23 % of the steps → 0.07 at the end (airbench's triangle).
# - Epochs: airbench94 trains 9.9 epochs; ours are whole, so 10 (480 steps of 1024 on the 49,000
#   images left by the 1,000-image validation split).
# - Whitening: the first conv's filters come from the training images (the airbench model's `init_from_data`);
#   its bias trains for 3 epochs, then is frozen (learning-rate scale 0, as requires_grad=False).
# - Alternating flips, translation by up to 2 px, TTA `flip_translate`, and Lookahead every 5 steps
#   with decay 0.95⁵·(t/T)³, ending on the average (`train.AirbenchLookahead`).
# - Not here: the fractional last epoch; BN statistics over ghost batches of 64 (nn/airbench.py).
# A different --batch-size rescales the lr (∝ batch size) unless --lr is given; the weight decay
# needs no change. `airbench-short` is the same in 3 epochs, for minutes on a few CPU cores.

AIRBENCH_MOMENTUM, AIRBENCH_BATCH = 0.85, 1024


def airbench_lr(batch_size: int = AIRBENCH_BATCH, lr_per_1024: float = 11.5,
                momentum: float = AIRBENCH_MOMENTUM) -> float:
    """airbench's learning rate for our mean-reduced loss (see the derivation above)."""
    return lr_per_1024 * batch_size / (1024 * (1 + 1 / (1 - momentum)))


_AIRBENCH = TrainConfig(
    model="airbench", optimizer="sgd", lr=airbench_lr(), momentum=AIRBENCH_MOMENTUM, nesterov=True,
    weight_decay=0.0153 / 11.5, schedule="onecycle", batch_size=AIRBENCH_BATCH, epochs=10,
    augment_flip=True, augment_translate=2, freeze_after={"whiten_bias": 3}, tta="flip_translate",
    lookahead=True, recipe="airbench")

RECIPES: dict[str, TrainConfig] = {
    "airbench": _AIRBENCH,
    "airbench-short": dataclasses.replace(_AIRBENCH, epochs=3, freeze_after={"whiten_bias": 1},
                                          recipe="airbench-short"),
}


def apply_recipe(name: str, settings: dict, explicit: set[str]) -> dict:
    """`settings` (TrainConfig fields) with the recipe's changes filled in where not `explicit`ly
    given; model_options merge, the command line's on top of the recipe's."""
    try:
        preset = RECIPES[name].changes()
    except KeyError:
        raise PartrainError(f"unknown recipe {name!r}; choose from {', '.join(RECIPES)}") from None
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

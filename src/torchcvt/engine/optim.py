"""What learns and how fast: parameter groups, frozen stages, optimiser, LR schedule, mixup and loss."""

from __future__ import annotations

from typing import Any

import torch
from timm.models import group_parameters
from torch import nn

from ..errors import TorchcvtError
from ..model import CvT
from .train_config import AugSettings, OptimSettings, SchedSettings


def param_groups(model: CvT, weight_decay: float, layer_decay: float | None = None) -> list[dict[str, Any]]:
    """Trainable parameters grouped by weight decay (none on norms, biases, tokens) and LR scale."""
    skip = model.no_weight_decay()
    # Layers as timm's layer decay numbers them, from the model's group_matcher: the stem, each block (a
    # stage's token embedding and class token with its first block), the final norm, then the head.
    ids = group_parameters(model, model.group_matcher(coarse=False), reverse=True)
    num_layers = max(ids.values()) + 1
    groups: dict[tuple[bool, int], dict[str, Any]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        no_decay = param.ndim <= 1 or name.endswith(".bias") or name in skip
        layer = ids[name]
        key = (no_decay, layer if layer_decay else 0)
        if key not in groups:
            scale = layer_decay ** (num_layers - 1 - layer) if layer_decay else 1.0
            groups[key] = {"params": [], "weight_decay": 0.0 if no_decay else weight_decay, "lr_scale": scale}
        groups[key]["params"].append(param)
    return [groups[key] for key in sorted(groups)]


def freeze_stages(model: CvT, count: int) -> None:
    """Stop gradients to the first `count` stages (their BN layers are kept in eval mode by the loop)."""
    if count > model.config.num_stages:
        raise TorchcvtError(f"model.freeze_stages={count} but the model has {model.config.num_stages} stages")
    for stage in model.stages[:count]:
        stage.requires_grad_(False)


def learning_rate(optim: OptimSettings, global_batch: int) -> float:
    """optim.lr, or base_lr scaled linearly from base_batch_size to the global batch."""
    if optim.lr is not None:
        return optim.lr
    return optim.base_lr * global_batch / optim.base_batch_size


# optim.opt names timm's optimisers, except for SGD: `sgd` is plain (heavy-ball) momentum, as
# torch.optim.SGD and ViT's fine-tuning code (google-research/vision_transformer vit_jax/momentum_clip.py
# lines 74-75 at 33241214: m = 0.9 m + g; p -= lr m), and `sgd_nesterov` is Nesterov momentum, which timm
# calls `sgd` (and `nesterov`).
_TIMM_OPTIMIZERS = {"sgd": "momentum", "sgd_nesterov": "nesterov"}


def timm_optimizer(opt: str) -> str:
    """timm's name for optim.opt."""
    return _TIMM_OPTIMIZERS.get(opt.lower(), opt.lower())


def is_nesterov(opt: str) -> bool:
    """Whether optim.opt is SGD with Nesterov momentum."""
    return timm_optimizer(opt).split("_")[-1] == "nesterov"


def build_optimizer(model: CvT, optim: OptimSettings, lr: float) -> torch.optim.Optimizer:
    """timm's optimiser of the configured kind over param_groups(model)."""
    from timm.optim import create_optimizer_v2

    groups = param_groups(model, optim.weight_decay, optim.layer_decay)
    return create_optimizer_v2(
        groups, opt=timm_optimizer(optim.opt), lr=lr, weight_decay=optim.weight_decay,
        **optimizer_extras(optim),
    )


def optimizer_extras(optim: OptimSettings) -> dict[str, Any]:
    """The hyper-parameters besides lr and weight decay that the configured optimiser takes."""
    if "adam" in optim.opt:
        return {"betas": optim.betas, "eps": optim.eps}
    if "sgd" in optim.opt or "momentum" in optim.opt or "nesterov" in optim.opt:
        return {"momentum": optim.momentum}
    return {}


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    sched: SchedSettings,
    epochs: int,
    steps_per_epoch: int,
    total_steps: int | None = None,
) -> Any:
    """Cosine over epochs - cooldown (warm-up included), then min_lr to the end; with total_steps (a run
    counted in steps), cosine over those steps after sched.warmup_steps of warm-up.

    sched.interval 'step' moves the LR every optimizer step; 'epoch' once per epoch, as the official
    code's timm scheduler (t_initial in epochs, epoch 0 entirely at warmup_lr). Drive it with update_lr.
    """
    from timm.scheduler import CosineLRScheduler

    if total_steps is not None:
        # As ViT's fine-tuning code: linear warm-up to the peak, then cosine over the remaining steps.
        warmup = sched.warmup_steps or 0
        return CosineLRScheduler(
            optimizer, t_initial=total_steps - warmup, lr_min=sched.min_lr, warmup_t=warmup,
            warmup_lr_init=sched.warmup_lr, warmup_prefix=True, t_in_epochs=False,
        )
    cooldown = sched.cooldown_epochs
    per_epoch = sched.interval == "epoch"
    unit = 1 if per_epoch else steps_per_epoch
    return CosineLRScheduler(
        optimizer,
        t_initial=(epochs - cooldown) * unit,
        lr_min=sched.min_lr,
        warmup_t=sched.warmup_epochs if per_epoch else int(sched.warmup_epochs * unit),
        warmup_lr_init=sched.warmup_lr,
        t_in_epochs=per_epoch,
    )


def update_lr(scheduler: Any, interval: str, epoch: int, global_step: int) -> None:
    """Put in force the schedule's LR at (epoch, global_step): per-epoch schedules read the epoch (0-based),
    per-step ones the number of optimizer steps taken."""
    if interval == "epoch":
        scheduler.step(epoch)
    else:
        scheduler.step_update(global_step)


def build_loss(aug: AugSettings, num_classes: int) -> tuple[Any, nn.Module]:
    """Mixup/CutMix (None when off) and the matching loss: soft targets, label smoothing or plain CE."""
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

    if aug.mixup > 0 or aug.cutmix > 0:
        from timm.data import Mixup

        mixup = Mixup(
            mixup_alpha=aug.mixup,
            cutmix_alpha=aug.cutmix,
            prob=aug.mixup_prob,
            switch_prob=aug.mixup_switch_prob,
            mode=aug.mixup_mode,
            label_smoothing=aug.label_smoothing,
            num_classes=num_classes,
        )
        return mixup, SoftTargetCrossEntropy()
    if aug.label_smoothing > 0:
        return None, LabelSmoothingCrossEntropy(smoothing=aug.label_smoothing)
    return None, nn.CrossEntropyLoss()

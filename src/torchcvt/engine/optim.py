"""What learns and how fast: parameter groups, frozen stages, optimiser, LR schedule, mixup and loss."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..model import CvT


def _layer_ids(model: CvT) -> tuple[dict[str, int], int]:
    """Depth of every parameter for layer-wise LR decay: token embedding and each block one layer."""
    ids, layer = {}, 0
    for i, stage in enumerate(model.stages):
        for name, _ in stage.named_parameters():
            if not name.startswith("blocks."):
                ids[f"stage{i}.{name}"] = layer
        layer += 1
        for b, block in enumerate(stage.blocks):
            for name, _ in block.named_parameters():
                ids[f"stage{i}.blocks.{b}.{name}"] = layer
            layer += 1
    return ids, layer + 1


def param_groups(model: CvT, weight_decay: float, layer_decay: float | None = None) -> list[dict[str, Any]]:
    """Trainable parameters grouped by weight decay (none on norms, biases, tokens) and LR scale."""
    skip = model.no_weight_decay()
    ids, num_layers = _layer_ids(model)
    groups: dict[tuple[bool, int], dict[str, Any]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        no_decay = param.ndim <= 1 or name.endswith(".bias") or name in skip
        layer = ids.get(name, num_layers - 1)
        key = (no_decay, layer if layer_decay else 0)
        if key not in groups:
            scale = layer_decay ** (num_layers - 1 - layer) if layer_decay else 1.0
            groups[key] = {"params": [], "weight_decay": 0.0 if no_decay else weight_decay, "lr_scale": scale}
        groups[key]["params"].append(param)
    return [groups[key] for key in sorted(groups)]


def freeze_stages(model: CvT, count: int) -> None:
    """Stop gradients to the first `count` stages (their BN layers are kept in eval mode by the loop)."""
    if count > model.config.num_stages:
        raise ValueError(f"model.freeze_stages={count} but the model has {model.config.num_stages} stages")
    for stage in model.stages[:count]:
        stage.requires_grad_(False)


def learning_rate(optim: dict[str, Any], global_batch: int) -> float:
    """optim.lr, or base_lr scaled linearly from base_batch_size to the global batch."""
    if optim["lr"] is not None:
        return float(optim["lr"])
    return float(optim["base_lr"]) * global_batch / optim["base_batch_size"]


def build_optimizer(model: CvT, optim: dict[str, Any], lr: float) -> torch.optim.Optimizer:
    """timm's optimiser of the configured kind over param_groups(model)."""
    from timm.optim import create_optimizer_v2

    groups = param_groups(model, float(optim["weight_decay"]), optim["layer_decay"])
    return create_optimizer_v2(
        groups, opt=optim["opt"], lr=lr, weight_decay=float(optim["weight_decay"]), **optimizer_extras(optim)
    )


def optimizer_extras(optim: dict[str, Any]) -> dict[str, Any]:
    """The hyper-parameters besides lr and weight decay that the configured optimiser takes."""
    if "adam" in optim["opt"]:
        return {"betas": tuple(optim["betas"]), "eps": float(optim["eps"])}
    if "sgd" in optim["opt"] or "momentum" in optim["opt"]:
        return {"momentum": float(optim["momentum"])}
    return {}


def build_scheduler(
    optimizer: torch.optim.Optimizer, sched: dict[str, Any], epochs: int, steps_per_epoch: int
) -> Any:
    """Per-step cosine over epochs - cooldown (warm-up included), then min_lr to the end."""
    from timm.scheduler import CosineLRScheduler

    cooldown = int(sched["cooldown_epochs"])
    if epochs <= cooldown:
        raise ValueError(f"train.epochs={epochs} must exceed sched.cooldown_epochs={cooldown}")
    if sched["name"] != "cosine":
        raise ValueError(f"sched.name must be 'cosine' (the paper's schedule), got {sched['name']!r}")
    return CosineLRScheduler(
        optimizer,
        t_initial=(epochs - cooldown) * steps_per_epoch,
        lr_min=float(sched["min_lr"]),
        warmup_t=int(sched["warmup_epochs"] * steps_per_epoch),
        warmup_lr_init=float(sched["warmup_lr"]),
        t_in_epochs=False,
    )


def build_loss(aug: dict[str, Any], num_classes: int) -> tuple[Any, nn.Module]:
    """Mixup/CutMix (None when off) and the matching loss: soft targets, label smoothing or plain CE."""
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

    if aug["mixup"] > 0 or aug["cutmix"] > 0:
        from timm.data import Mixup

        mixup = Mixup(
            mixup_alpha=aug["mixup"],
            cutmix_alpha=aug["cutmix"],
            prob=aug["mixup_prob"],
            switch_prob=aug["mixup_switch_prob"],
            mode=aug["mixup_mode"],
            label_smoothing=aug["label_smoothing"],
            num_classes=num_classes,
        )
        return mixup, SoftTargetCrossEntropy()
    if aug["label_smoothing"] > 0:
        return None, LabelSmoothingCrossEntropy(smoothing=aug["label_smoothing"])
    return None, nn.CrossEntropyLoss()

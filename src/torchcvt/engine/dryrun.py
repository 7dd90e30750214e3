"""A dry run: what a training config would run on N processes, worked out without data, model or steps."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ..config import get_variant, variant_config
from ..data import eval_transform, train_transform
from ..errors import TorchcvtError
from .optim import build_scheduler, learning_rate, update_lr
from .train_config import AugSettings, TrainConfig, as_train_config, per_process_batch

# The per-step schedule's LR at an epoch's first step does not depend on the number of steps per epoch
# (a fractional warm-up aside, rounded to whole steps), so the dry run uses a nominal count, not the data.
NOMINAL_STEPS_PER_EPOCH = 1000


def sampler_name(aug: AugSettings) -> str:
    """The training sampler a config selects, as the dry run reports it."""
    repeats = aug.repeated_aug
    return f"RepeatAugSampler(num_repeats={repeats})" if repeats else "DistributedSampler"


def lr_per_epoch(cfg: TrainConfig, lr: float, steps_per_epoch: int = NOMINAL_STEPS_PER_EPOCH) -> list[float]:
    """The LR in force at the first step of every epoch, from the scheduler the training loop uses."""
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    epochs = cfg.train.epochs
    scheduler = build_scheduler(optimizer, cfg.sched, epochs, steps_per_epoch)
    values = []
    for epoch in range(epochs):
        update_lr(scheduler, cfg.sched.interval, epoch, epoch * steps_per_epoch)
        values.append(optimizer.param_groups[0]["lr"])
    return values


def lr_at_steps(cfg: TrainConfig, lr: float) -> dict[int, float]:
    """A run counted in steps: the LR at its first step, the end of warm-up, the middle and the last step."""
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    steps = cfg.train.steps
    scheduler = build_scheduler(optimizer, cfg.sched, 1, steps, steps)
    values = {}
    for step in sorted({0, cfg.sched.warmup_steps or 0, steps // 2, steps - 1}):
        update_lr(scheduler, "step", 0, step)
        values[step] = optimizer.param_groups[0]["lr"]
    return values


def dry_run(cfg: TrainConfig | Mapping[str, Any], world_size: int = 1) -> dict[str, Any]:
    """What `train(cfg)` would run on world_size processes: batch, LR per epoch, precision, transforms.

    Reads no images and builds no model or dataset.
    """
    cfg = as_train_config(cfg)
    if world_size < 1:
        raise TorchcvtError(f"world_size must be a positive number of processes, got {world_size}")
    m, a, o, s, t = cfg.model, cfg.aug, cfg.optim, cfg.sched, cfg.train
    data_config = get_variant(m.name).data_config()
    model_config = variant_config(m.name, **m.overrides)
    batch = per_process_batch(t, world_size)
    lr = learning_rate(o, batch * world_size)
    by_steps = t.steps is not None
    return {
        "model": m.name,
        "pretrained": m.pretrained,
        "checkpoint": m.checkpoint,
        "head": m.head,
        "per_process_batch": batch,
        "global_batch": batch * world_size,
        "world_size": world_size,
        "optimizer": o.opt,
        "peak_lr": lr,
        "weight_decay": o.weight_decay,
        # A run counted in steps has as many epochs as its steps take on the data, unknown here.
        "steps": t.steps,
        "epochs": None if by_steps else t.epochs,
        "warmup_steps": s.warmup_steps,
        "warmup_epochs": None if by_steps else s.warmup_epochs,
        "warmup_lr": s.warmup_lr,
        "min_lr": s.min_lr,
        "cooldown_epochs": s.cooldown_epochs,
        "lr_per_epoch": None if by_steps else lr_per_epoch(cfg, lr),
        "lr_at_steps": lr_at_steps(cfg, lr) if by_steps else None,
        "sched_on": s.interval,
        "amp": t.amp,
        "val_amp": t.val_amp if t.val_amp is not None else t.amp,
        "sampler": sampler_name(a),
        "train_transform": repr(train_transform(a, data_config)),
        "eval_transform": repr(eval_transform(data_config)),
        "mixup": a.mixup,
        "cutmix": a.cutmix,
        "label_smoothing": a.label_smoothing,
        "drop_path_rate": list(model_config.drop_path_rate),
        "clip_grad": o.clip_grad,
        "ema": t.ema,
    }

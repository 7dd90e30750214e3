"""One optimiser step at a time: the forward and backward pass, divergence tracking without host syncs, and
batches that keep at least two readable images when unreadable ones were dropped."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from .build import Components
from .runtime import Runtime

Batch = tuple[torch.Tensor | None, torch.Tensor | None, list]


class TrainingDiverged(RuntimeError):
    """The loss or the weights became NaN or infinite; the last good checkpoint is kept."""


def _join(first: tuple[torch.Tensor, torch.Tensor], second: tuple[torch.Tensor, torch.Tensor]) -> tuple:
    return torch.cat([first[0], second[0]]), torch.cat([first[1], second[1]])


def merge_lone_images(
    batches: Iterable[Batch], batch_size: int, on_left_out: Callable[[int], None]
) -> Iterator[Batch]:
    """The loader's batches, one out per batch in; with batch_size 2 or more, none with a single image.

    BatchNorm on a 1x1 key/value grid needs two images, so a batch that unreadable files left with one
    readable image gives it to the batch before it (held back one batch for this), or at the start of an
    epoch to the next one, and trains nothing itself. on_left_out(1) is called for an image no other
    readable image in the epoch could join.
    """
    held: Batch | None = None
    lone: tuple[torch.Tensor, torch.Tensor] | None = None
    for images, targets, bad in batches:
        if lone is not None and images is not None and targets is not None:
            (images, targets), lone = _join(lone, (images, targets)), None
        if images is not None and targets is not None and len(images) < min(2, batch_size):
            if held is not None and held[0] is not None and held[1] is not None:
                held = (*_join((held[0], held[1]), (images, targets)), held[2])
            else:
                lone = (images, targets)
            images = targets = None
        if held is not None:
            yield held
        held = (images, targets, bad)
    if held is not None:
        yield held
    if lone is not None:  # every other batch since it was unreadable
        on_left_out(len(lone[0]))


class StepRunner:
    """Forward, backward and optimiser step on one batch; remembers a non-finite loss on the device."""

    def __init__(self, parts: Components, runtime: Runtime, clip_grad: float | None):
        self.parts, self.runtime, self.clip_grad = parts, runtime, clip_grad
        # The first step whose loss was not finite and that loss, kept on the device ([-1, 0]: none yet).
        self._diverged = torch.tensor([-1.0, 0.0], dtype=torch.float64, device=runtime.device)
        # The last batch this rank trained on: a stand-in (weight 0) for an unreadable batch under DDP.
        self._previous_batch: tuple[torch.Tensor, torch.Tensor] | None = None
        self.left_out = 0  # readable images no step could take (mixup's odd one out, a lone image)

    def step(self, images: torch.Tensor | None, targets: torch.Tensor | None, global_step: int) -> Any:
        """One optimiser step; the loss on the device, or None for a batch with nothing readable.

        Under DDP every rank must take part in every step, so a rank without a batch steps on its
        previous one with weight 0 (it adds no gradient).
        """
        parts, device = self.parts, self.runtime.device
        if images is not None and targets is not None and parts.mixup is not None and len(images) % 2:
            # Mixup pairs images, so it needs an even batch: the odd one out is left out, and counted.
            images, targets = images[:-1], targets[:-1]
            self.left_out += 1
        weight = 1.0
        if images is None or targets is None:
            if not self.runtime.distributed:
                return None
            images, targets = self._previous_batch or self._blank_batch()
            weight = 0.0
        else:
            self._previous_batch = (images, targets)
        images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
        if parts.mixup is not None:
            images, targets = parts.mixup(images, targets)
        amp_dtype = parts.amp_dtype
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            loss = parts.criterion(parts.ddp(images), targets) * weight
        value = loss.detach().double()
        # Remembered on the device, read at the next check: no host sync per step.
        first = (~torch.isfinite(value)) & (self._diverged[0] < 0)
        at = torch.stack([torch.full_like(value, global_step + 1), value])
        self._diverged = torch.where(first, at, self._diverged)
        parts.optimizer.zero_grad(set_to_none=True)
        parts.scaler.scale(loss).backward()
        if self.clip_grad:
            parts.scaler.unscale_(parts.optimizer)
            nn.utils.clip_grad_norm_(parts.model.parameters(), float(self.clip_grad))
        parts.scaler.step(parts.optimizer)
        parts.scaler.update()
        if parts.ema is not None:
            # The count of updates so far, this one included, as timm's train.py passes it: the first
            # update copies the weights, and the average starts at the second.
            parts.ema.update(parts.model, step=global_step + 1)
        return value

    def zero(self) -> torch.Tensor:
        return torch.zeros((), dtype=torch.float64, device=self.runtime.device)

    def check_finite(self, window_loss: torch.Tensor, kept: str) -> float:
        """TrainingDiverged if any rank's loss was not finite since the run (re)started; else the window's
        summed loss. One host sync (and one collective when distributed)."""
        numbers = torch.cat([self._diverged, window_loss.reshape(1)])
        if self.runtime.distributed:
            # The first diverged step over all ranks: MIN over steps, with "none" as +inf.
            key = torch.where(numbers[0] < 0, torch.full_like(numbers[0], math.inf), numbers[0]).reshape(1)
            dist.all_reduce(key, op=dist.ReduceOp.MIN)
            numbers = torch.cat([key, numbers[1:]])
        step, value, total = numbers.tolist()
        if 0 <= step < math.inf:
            shown = value if not math.isfinite(value) else "not finite"
            raise TrainingDiverged(f"loss is {shown} at step {int(step)}; stopped, {kept}")
        return total

    def _blank_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        size = self.parts.model.pretrained_cfg["input_size"]
        return torch.zeros(2, *size), torch.zeros(2, dtype=torch.long)

"""Where a run stands and its checkpoints: the training checkpoint a run writes, and resuming from one."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from ..errors import TorchcvtError
from ..runrecord import BEST_NAME, LAST_NAME, TrainingCheckpoint
from .build import Components
from .optim import update_lr
from .runtime import Runtime, agree_on_failure, rng_state, set_rng_state
from .state import read_training_state, save_training_state
from .steps import TrainingDiverged
from .train_config import TrainConfig

logger = logging.getLogger(__name__)


@dataclass
class LoopState:
    """Where the run stands; a checkpoint records it and resuming restores it."""

    global_step: int = 0
    start_epoch: int = 0
    # Images drawn from the start epoch (over all ranks) before this run segment: a count of images, not
    # of steps, so a resumed run with another batch size starts at the right image.
    start_images: int = 0
    best_top1: float = -1.0
    best_top5: float = -1.0
    wall_before: float = 0.0
    train_images: int = 0
    train_seconds: float = 0.0
    skipped: set[str] = field(default_factory=set)  # paths of unreadable training images, on this rank
    left_out: int = 0  # readable images no step could take, on this rank, before this run segment
    last_val: dict[str, float] | None = None  # the latest validation, so a finished run can report


class Checkpointer:
    """Writes the training checkpoint of a run (rank 0) and restores a run from one."""

    def __init__(self, cfg: TrainConfig, runtime: Runtime, parts: Components, loop: LoopState):
        self.cfg, self.runtime, self.parts, self.loop = cfg, runtime, parts, loop
        self._checked_finite_at = -1  # the step whose weights save() last found finite
        self.started = time.perf_counter()

    def gather(self, value: Any) -> list[Any]:
        """value from every rank, in rank order."""
        if not self.runtime.distributed:
            return [value]
        gathered: list[Any] = [None] * self.runtime.world_size
        dist.all_gather_object(gathered, value)
        return gathered

    def state(self, epoch: int, epoch_images: int, left_out: int) -> TrainingCheckpoint:
        """The training checkpoint: weights, optimiser, schedule, EMA, RNG of every rank and loop state."""
        parts, loop = self.parts, self.loop
        gathered = self.gather({"rng": rng_state(), "skipped": sorted(loop.skipped), "left_out": left_out})
        return TrainingCheckpoint(
            state_dict=parts.model.state_dict(),
            model_name=self.cfg.model.name,
            config=parts.model.config.to_dict(),
            class_names=list(parts.class_names),
            ema=parts.ema.module.state_dict() if parts.ema is not None else None,
            train_config=self.cfg.to_dict(),
            optimizer=parts.optimizer.state_dict(),
            scheduler=parts.scheduler.state_dict(),
            scaler=parts.scaler.state_dict(),
            epoch=epoch,
            step_in_epoch=epoch_images // parts.global_batch,
            epoch_images=epoch_images,
            global_step=loop.global_step,
            best_top1=loop.best_top1,
            best_top5=loop.best_top5,
            world_size=self.runtime.world_size,
            rng=[rank["rng"] for rank in gathered],
            skipped_images=sorted(set().union(*(rank["skipped"] for rank in gathered))),
            left_out_images=sum(rank["left_out"] for rank in gathered),
            last_val=loop.last_val,
            wall_seconds=loop.wall_before + time.perf_counter() - self.started,
            train_images=loop.train_images,
            train_seconds=loop.train_seconds,
        )

    def save(self, name: str, epoch: int, epoch_images: int, left_out: int) -> None:
        """Write OUTPUT/name (rank 0); non-finite weights are never written, the run stops instead.

        A write that fails (a full disk) stops every rank with one line; the previous file is kept.
        """
        # best.pth and last.pth are written at the same step: one check (one host sync) serves both.
        if self._checked_finite_at != self.loop.global_step and not self._weights_finite():
            raise TrainingDiverged(
                f"weights are not finite after step {self.loop.global_step}; stopped without writing "
                f"{name}, {self.kept()}"
            )
        self._checked_finite_at = self.loop.global_step
        state = self.state(epoch, epoch_images, left_out)
        error = None
        if self.runtime.is_main:
            path = self.parts.output / name
            try:
                save_training_state(state, path, keep_previous=name == LAST_NAME)
            except OSError as failed:
                kept = f"{path} is unchanged" if path.exists() else "nothing was written"
                reason = (failed.strerror or str(failed)).lower()
                error = TorchcvtError(f"cannot write checkpoint {path}: {reason}; {kept}")
        agree_on_failure(self.runtime, error)

    def _weights_finite(self) -> bool:
        parts = self.parts
        modules = [parts.model] + ([parts.ema.module] if parts.ema is not None else [])
        tensors = [t for m in modules for t in m.state_dict().values() if t.is_floating_point()]
        # One host sync for all tensors, not one per tensor.
        finite = torch.stack([torch.isfinite(t).all() for t in tensors]).all().to(torch.float32)
        if self.runtime.distributed:
            finite = finite.to(self.runtime.device)
            dist.all_reduce(finite, op=dist.ReduceOp.MIN)
        return bool(finite)

    def kept(self) -> str:
        last = self.parts.output / LAST_NAME
        return f"the last good checkpoint is {last}" if last.exists() else "no checkpoint was written yet"

    def restore(self, state: TrainingCheckpoint) -> None:
        """Continue from a training checkpoint."""
        parts, loop = self.parts, self.loop
        parts.model.load_state_dict(state.state_dict)
        # The optimiser's moments come from the checkpoint; its hyper-parameters (lr, weight decay, betas,
        # ...) and the schedule from this run's config, so a run can be extended or re-tuned.
        groups = parts.optimizer.param_groups
        configured = [{k: v for k, v in group.items() if k != "params"} for group in groups]
        parts.optimizer.load_state_dict(state.optimizer)
        for group, values in zip(parts.optimizer.param_groups, configured, strict=True):
            group.update(values)
        if state.scaler is not None:
            parts.scaler.load_state_dict(state.scaler)
        if parts.ema is not None and state.ema is not None:
            parts.ema.module.load_state_dict(state.ema)
        loop.start_epoch, loop.start_images = int(state.epoch), int(state.epoch_images)
        left = len(parts.sampler.sampler) - loop.start_images // self.runtime.world_size
        if left // parts.batch_size == 0:  # the epoch is done
            loop.start_epoch, loop.start_images = loop.start_epoch + 1, 0
        loop.global_step = int(state.global_step)
        update_lr(parts.scheduler, self.cfg.sched.interval, loop.start_epoch, loop.global_step)
        loop.best_top1, loop.best_top5 = float(state.best_top1), float(state.best_top5)
        self._adopt_best_score()
        loop.skipped = set(state.skipped_images)
        # Counted on rank 0 alone from here on, so the sum over ranks stays right.
        loop.left_out = int(state.left_out_images) if self.runtime.is_main else 0
        loop.last_val = state.last_val
        loop.wall_before = float(state.wall_seconds)
        loop.train_images, loop.train_seconds = int(state.train_images), float(state.train_seconds)
        rng = state.rng
        if len(rng) == self.runtime.world_size:
            set_rng_state(rng[self.runtime.rank])
        elif self.runtime.is_main:
            logger.info(
                f"checkpoint was written by {len(rng)} process(es), this run has {self.runtime.world_size}: "
                "random streams restart, so results will differ from an uninterrupted run"
            )

    def _adopt_best_score(self) -> None:
        # best.pth is written before last.pth: after a kill between the two it holds a newer best score.
        best, loop = self.parts.output / BEST_NAME, self.loop
        if not best.is_file():
            return
        try:
            saved = read_training_state(best)
        except ValueError as error:
            logger.warning(f"{error}; the next epoch that improves on {loop.best_top1:.4f} replaces it")
            return
        if float(saved.best_top1) > loop.best_top1:
            loop.best_top1, loop.best_top5 = float(saved.best_top1), float(saved.best_top5)


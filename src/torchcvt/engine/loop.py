"""The training loop: a Trainer runs epochs of steps on built components, validates, checkpoints, reports."""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from .build import Components, build_components
from .evaluate import evaluate
from .optim import update_lr
from .reporting import MetricsLog, Progress, plot_curves
from .runtime import Runtime, agree_on_failure, init_runtime, rng_state, set_rng_state, torch_settings
from .state import read_training_state, save_training_state
from .train_config import TrainConfig, as_train_config

logger = logging.getLogger(__name__)


class TrainingDiverged(RuntimeError):
    """The loss or the weights became NaN or infinite; the last good checkpoint is kept."""


class Trainer:
    """Runs one training run on components built by build_components; rank 0 alone logs and saves."""

    def __init__(self, cfg: TrainConfig, runtime: Runtime, parts: Components):
        self.cfg, self.runtime, self.parts = cfg, runtime, parts
        self.model, self.ddp = parts.model, parts.ddp
        self.optimizer, self.scheduler, self.scaler, self.ema = (
            parts.optimizer, parts.scheduler, parts.scaler, parts.ema,
        )
        self.output, self.class_names = parts.output, parts.class_names
        self.lr, self.epochs, self.steps_per_epoch = parts.lr, parts.epochs, parts.steps_per_epoch
        self.global_batch = parts.global_batch
        # Loop state: where the run stands; restore() replaces it from a checkpoint.
        self.global_step, self.start_epoch, self.start_step = 0, 0, 0
        self.best_top1 = self.best_top5 = -1.0
        self.wall_before, self.train_images, self.train_seconds = 0.0, 0, 0.0
        self.skipped: set[str] = set()  # paths of unreadable training images, on this rank
        self.last_val: dict[str, float] | None = None  # the latest validation, so a finished run can report
        # The first step whose loss was not finite and that loss, kept on the device ([-1, 0]: none yet).
        self._diverged = torch.tensor([-1.0, 0.0], dtype=torch.float64, device=runtime.device)
        # The last batch this rank trained on: a stand-in (weight 0) for an unreadable batch under DDP.
        self._previous_batch: tuple[torch.Tensor, torch.Tensor] | None = None
        self._checked_finite_at = -1  # the step whose weights save() last found finite
        self.started = time.perf_counter()
        self.metrics: MetricsLog | None = None

    @classmethod
    def from_config(cls, cfg: TrainConfig | Mapping[str, Any], runtime: Runtime) -> Trainer:
        """Build every component from cfg (checking every input) and hand them to a Trainer."""
        cfg = as_train_config(cfg)
        return cls(cfg, runtime, build_components(cfg, runtime))

    # -- state

    def _gather(self, value: Any) -> list[Any]:
        """value from every rank, in rank order."""
        if not self.runtime.distributed:
            return [value]
        gathered: list[Any] = [None] * self.runtime.world_size
        dist.all_gather_object(gathered, value)
        return gathered

    def state(self, epoch: int, step_in_epoch: int) -> dict[str, Any]:
        """The training checkpoint: weights, optimiser, schedule, EMA, RNG of every rank and loop state."""
        gathered = self._gather({"rng": rng_state(), "skipped": sorted(self.skipped)})
        return {
            "state_dict": self.model.state_dict(),
            "model_name": self.cfg.model.name,
            "config": self.model.config.to_dict(),
            "class_names": list(self.class_names),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "ema": self.ema.module.state_dict() if self.ema is not None else None,
            "epoch": epoch,
            "step_in_epoch": step_in_epoch,
            "global_step": self.global_step,
            "best_top1": self.best_top1,
            "best_top5": self.best_top5,
            "world_size": self.runtime.world_size,
            "rng": [rank["rng"] for rank in gathered],
            "skipped_images": sorted(set().union(*(rank["skipped"] for rank in gathered))),
            "last_val": self.last_val,
            "train_config": self.cfg.to_dict(),
            "wall_seconds": self.wall_before + time.perf_counter() - self.started,
            "train_images": self.train_images,
            "train_seconds": self.train_seconds,
        }

    def save(self, name: str, epoch: int, step_in_epoch: int) -> None:
        """Write OUTPUT/name (rank 0); non-finite weights are never written, the run stops instead."""
        # best.pth and last.pth are written at the same step: one check (one host sync) serves both.
        if self._checked_finite_at != self.global_step and not self._weights_finite():
            raise TrainingDiverged(
                f"weights are not finite after step {self.global_step}; stopped without writing {name}, "
                f"{self._kept()}"
            )
        self._checked_finite_at = self.global_step
        state = self.state(epoch, step_in_epoch)
        if self.runtime.is_main:
            save_training_state(state, self.output / name, keep_previous=name == "last.pth")

    def _weights_finite(self) -> bool:
        modules = [self.model] + ([self.ema.module] if self.ema is not None else [])
        tensors = [t for m in modules for t in m.state_dict().values() if t.is_floating_point()]
        # One host sync for all tensors, not one per tensor.
        finite = torch.stack([torch.isfinite(t).all() for t in tensors]).all().to(torch.float32)
        if self.runtime.distributed:
            finite = finite.to(self.runtime.device)
            dist.all_reduce(finite, op=dist.ReduceOp.MIN)
        return bool(finite)

    def _kept(self) -> str:
        last = self.output / "last.pth"
        return f"the last good checkpoint is {last}" if last.exists() else "no checkpoint was written yet"

    def restore(self, state: dict[str, Any]) -> None:
        """Continue from a training checkpoint."""
        self.model.load_state_dict(state["state_dict"])
        # The optimiser's moments come from the checkpoint; its hyper-parameters (lr, weight decay, betas,
        # ...) and the schedule from this run's config, so a run can be extended or re-tuned.
        groups = self.optimizer.param_groups
        configured = [{k: v for k, v in group.items() if k != "params"} for group in groups]
        self.optimizer.load_state_dict(state["optimizer"])
        for group, values in zip(self.optimizer.param_groups, configured, strict=True):
            group.update(values)
        self.scaler.load_state_dict(state["scaler"])
        if self.ema is not None and state.get("ema") is not None:
            self.ema.module.load_state_dict(state["ema"])
        self.start_epoch, self.start_step = int(state["epoch"]), int(state["step_in_epoch"])
        if self.start_step >= self.steps_per_epoch:
            self.start_epoch, self.start_step = self.start_epoch + 1, 0
        self.global_step = int(state["global_step"])
        update_lr(self.scheduler, self.cfg.sched.interval, self.start_epoch, self.global_step)
        self.best_top1, self.best_top5 = float(state["best_top1"]), float(state["best_top5"])
        self._adopt_best_score()
        self.skipped = set(state.get("skipped_images", []))
        self.last_val = state.get("last_val")
        self.wall_before = float(state.get("wall_seconds", 0.0))
        self.train_images, self.train_seconds = int(state["train_images"]), float(state["train_seconds"])
        rng = state["rng"]
        if len(rng) == self.runtime.world_size:
            set_rng_state(rng[self.runtime.rank])
        else:
            self._log(
                f"checkpoint was written by {len(rng)} process(es), this run has {self.runtime.world_size}: "
                "random streams restart, so results will differ from an uninterrupted run"
            )

    def _adopt_best_score(self) -> None:
        # best.pth is written before last.pth: after a kill between the two it holds a newer best score.
        best = self.output / "best.pth"
        if not best.is_file():
            return
        try:
            saved = read_training_state(best)
        except ValueError as error:
            logger.warning(f"{error}; the next epoch that improves on {self.best_top1:.4f} replaces it")
            return
        if float(saved.get("best_top1", -1.0)) > self.best_top1:
            self.best_top1, self.best_top5 = float(saved["best_top1"]), float(saved["best_top5"])

    def _log(self, text: str) -> None:
        if self.runtime.is_main:
            logger.info(text)

    # -- loop

    def set_train_mode(self) -> None:
        self.ddp.train()
        for stage in self.model.stages[: self.cfg.model.freeze_stages]:
            stage.eval()

    def run(self) -> dict[str, Any]:
        """Train from where the run stands to the last epoch; returns the summary."""
        t, parts = self.cfg.train, self.parts
        self.started = time.perf_counter()
        if parts.resume_state is not None:
            self.restore(parts.resume_state)
            self._log(
                f"resuming from {parts.resume_path} at epoch {self.start_epoch + 1}, step {self.global_step}"
            )
            parts.resume_state = None
        if self.start_epoch >= self.epochs:
            return self._finished()
        main = self.runtime.is_main
        self.metrics = (
            MetricsLog(self.output, self.global_step if parts.resume_path else None) if main else None
        )
        progress = Progress(main, t.quiet, t.log_every_steps)
        self._log(
            f"training {self.cfg.model.name} on {len(parts.train_set)} images of "
            f"{len(self.class_names)} classes ({parts.train_dir}), {self.runtime.world_size} process(es) on "
            f"{self.runtime.device}, global batch {self.global_batch}, lr {self.lr:.3g}, "
            f"{self._length()}; output {self.output}"
        )
        every = t.checkpoint_every_steps
        interval = self.cfg.sched.interval
        last_val: dict[str, Any] = {}
        try:
            for epoch in range(self.start_epoch, self.epochs):
                start = self.start_step if epoch == self.start_epoch else 0
                parts.sampler.set_epoch(epoch, start * parts.batch_size)
                update_lr(self.scheduler, interval, epoch, self.global_step)
                self.set_train_mode()
                progress.start(epoch, self.epochs, self.steps_per_epoch, start)
                window_loss, window_steps, tick = self._zero(), 0, time.perf_counter()
                for step, (images, targets, bad) in enumerate(parts.train_loader, start=start + 1):
                    if parts.max_steps is not None and self.global_step >= parts.max_steps:
                        break  # a run counted in steps ends mid-epoch
                    error = None
                    try:
                        self._report_bad(bad)
                    except ValueError as raised:
                        error = raised
                    agree_on_failure(self.runtime, error)
                    loss = self.train_step(images, targets)
                    if loss is None:
                        continue
                    self.global_step += 1
                    update_lr(self.scheduler, interval, epoch, self.global_step)
                    window_loss, window_steps = window_loss + loss, window_steps + 1
                    self.train_images += self.global_batch
                    log = (
                        self.global_step % progress.every == 0
                        or step == self.steps_per_epoch
                        or self.global_step == parts.max_steps
                    )
                    saving = bool(every) and self.global_step % every == 0
                    mean_loss = None
                    if log or saving:
                        # The one host sync of a logging interval: divergence check and the window's loss.
                        mean_loss = self._check_finite(window_loss) / window_steps
                    elapsed = time.perf_counter() - tick
                    lr = self.optimizer.param_groups[-1]["lr"]
                    speed = window_steps * self.global_batch / max(elapsed, 1e-9)
                    progress.update(step, mean_loss if log else None, lr, speed)
                    if log:
                        if main:
                            self.metrics.write(
                                {
                                    "kind": "train",
                                    "step": self.global_step,
                                    "epoch": epoch + step / self.steps_per_epoch,
                                    "loss": mean_loss,
                                    "lr": lr,
                                    "images_per_second": speed,
                                }
                            )
                        self.train_seconds += elapsed
                        window_loss, window_steps, tick = self._zero(), 0, time.perf_counter()
                    if saving:
                        self.save("last.pth", epoch, step)
                self._check_finite(window_loss)
                self.train_seconds += time.perf_counter() - tick if window_steps else 0.0
                progress.close()
                last_val = self.validate(epoch)
                self.last_val = {key: last_val[key] for key in ("top1", "top5", "loss")}
                # best.pth first: last.pth then records a best score that best.pth already holds.
                if last_val["top1"] > self.best_top1:
                    self.best_top1, self.best_top5 = last_val["top1"], last_val["top5"]
                    self.save("best.pth", epoch + 1, 0)
                self.save("last.pth", epoch + 1, 0)
        finally:
            progress.close()
            if self.metrics is not None:
                self.metrics.close()
        return self.finish(last_val)

    def _length(self) -> str:
        steps = self.parts.max_steps
        return f"{steps} steps ({self.epochs} epochs)" if steps is not None else f"{self.epochs} epochs"

    def _finished(self) -> dict[str, Any]:
        """A run resumed after its last epoch: its summary, unchanged (written now if a kill prevented it)."""
        # Resumed with fewer epochs than it trained: the summary counts the epochs its metrics hold.
        self.epochs = max(self.epochs, self.start_epoch)
        self._log(f"the run in {self.output} is already finished ({self.epochs} epochs); nothing to do")
        summary = self.output / "summary.json"
        if summary.is_file():
            return json.loads(summary.read_text())
        if self.last_val is None:
            self.last_val = self.validate(self.epochs - 1)
        return self.finish(self.last_val)

    def _report_bad(self, bad: list) -> None:
        for sample in bad:
            if self.cfg.data.strict:
                raise ValueError(
                    f"unreadable image {sample.path} ({sample.error}); data.strict stops the run"
                )
            self.skipped.add(sample.path)
            if self.runtime.is_main:
                logger.warning(
                    f"skipped unreadable image {sample.path} ({sample.error}); "
                    f"{len(self.skipped)} skipped so far"
                )

    def train_step(self, images: torch.Tensor | None, targets: torch.Tensor | None) -> float | None:
        """One optimiser step; the loss, or TrainingDiverged when it is not finite on any rank.

        A batch with nothing readable is skipped (None). Under DDP every rank must take part in every
        step, so such a rank steps on its previous batch with weight 0 (it adds no gradient).
        """
        device = self.runtime.device
        if images is not None and targets is not None and self.parts.mixup is not None and len(images) % 2:
            # Mixup pairs images, so it needs an even batch; a single readable image cannot be paired.
            images, targets = (images[:-1], targets[:-1]) if len(images) > 1 else (None, None)
        weight = 1.0
        if images is None or targets is None:
            if not self.runtime.distributed:
                return None
            images, targets = self._previous_batch or self._blank_batch()
            weight = 0.0
        else:
            self._previous_batch = (images, targets)
        images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
        if self.parts.mixup is not None:
            images, targets = self.parts.mixup(images, targets)
        amp_dtype = self.parts.amp_dtype
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            loss = self.parts.criterion(self.ddp(images), targets) * weight
        value = loss.detach().double()
        # Remembered on the device, read at the next check: no host sync per step.
        first = (~torch.isfinite(value)) & (self._diverged[0] < 0)
        at = torch.stack([torch.full_like(value, self.global_step + 1), value])
        self._diverged = torch.where(first, at, self._diverged)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        clip = self.cfg.optim.clip_grad
        if clip:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.model.parameters(), float(clip))
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if self.ema is not None:
            self.ema.update(self.model, step=self.global_step)
        return value

    def _zero(self) -> torch.Tensor:
        return torch.zeros((), dtype=torch.float64, device=self.runtime.device)

    def _check_finite(self, window_loss: torch.Tensor) -> float:
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
            raise TrainingDiverged(f"loss is {shown} at step {int(step)}; stopped, {self._kept()}")
        return total

    def _blank_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.zeros(2, *self.model.pretrained_cfg["input_size"]), torch.zeros(2, dtype=torch.long)

    def validate(self, epoch: int) -> dict[str, Any]:
        """Score the model (and its EMA) on the validation set; logged and written to metrics.jsonl."""
        parts = self.parts
        val_amp = parts.val_amp_dtype
        args = (parts.val_loader, self.runtime.device, len(self.class_names), self.runtime, val_amp)
        strict = self.cfg.data.strict
        result = evaluate(self.model, *args, strict=strict)
        record = {
            "kind": "val",
            "step": self.global_step,
            "epoch": epoch + 1,
            "top1": result["top1"],
            "top5": result["top5"],
            "loss": result["loss"],
            "images": result["images"],
            "unreadable": result["unreadable"],
        }
        if self.ema is not None:
            ema = evaluate(self.ema.module, *args, strict=strict)
            record.update(ema_top1=ema["top1"], ema_top5=ema["top5"], ema_loss=ema["loss"])
        if self.metrics is not None:
            self.metrics.write(record)
        self._log(
            f"epoch {epoch + 1}/{self.epochs}: val top-1 {100 * result['top1']:.2f}% "
            f"top-5 {100 * result['top5']:.2f}% loss {result['loss']:.4f}"
        )
        return result

    def finish(self, last_val: dict[str, Any]) -> dict[str, Any]:
        """Write summary.json and curves.png (rank 0); returns the summary."""
        skipped = set().union(*self._gather(self.skipped))
        wall = self.wall_before + time.perf_counter() - self.started
        summary = {
            "model": self.cfg.model.name,
            "best_val_top1": max(self.best_top1, last_val["top1"]),
            "best_val_top5": self.best_top5 if self.best_top1 >= last_val["top1"] else last_val["top5"],
            "final_val_top1": last_val["top1"],
            "final_val_top5": last_val["top5"],
            "final_val_loss": last_val["loss"],
            "epochs": self.epochs,
            "steps": self.global_step,
            "wall_seconds": wall,
            "images_per_second": self.train_images / max(self.train_seconds, 1e-9),
            "world_size": self.runtime.world_size,
            "skipped_images": len(skipped),
            "checkpoint": str(self.output / "best.pth"),
            "last_checkpoint": str(self.output / "last.pth"),
            "curves": str(self.output / "curves.png"),
            "metrics": str(self.output / "metrics.jsonl"),
            "summary": str(self.output / "summary.json"),
        }
        if self.runtime.is_main:
            (self.output / "summary.json").write_text(json.dumps(summary, indent=2))
            plot_curves(self.output / "metrics.jsonl", self.output / "curves.png")
        return summary


def train(cfg: TrainConfig | Mapping[str, Any]) -> dict[str, Any]:
    """Run one experiment from a config (see load_config); returns the summary written to summary.json."""
    cfg = as_train_config(cfg)
    runtime = init_runtime(cfg.train.device)
    try:
        with torch_settings(cfg.train.deterministic, runtime.device):
            return Trainer.from_config(cfg, runtime).run()
    finally:
        if runtime.distributed and dist.is_initialized():
            dist.destroy_process_group()


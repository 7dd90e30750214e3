"""The training loop: a Trainer runs epochs of steps on built components, validates, checkpoints, reports."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from ..runrecord import BEST_NAME, LAST_NAME
from .build import Components, build_components, make_run_folder, remove_created, with_run_folder
from .optim import update_lr
from .reporting import MetricsLog, Progress
from .runlock import RunLock
from .runtime import Runtime, agree_on_failure, init_runtime, torch_settings
from .snapshot import Checkpointer, LoopState
from .steps import StepRunner, TrainingDiverged, merge_lone_images
from .summary import RunReport
from .train_config import TrainConfig, as_train_config

__all__ = ["Trainer", "TrainingDiverged", "train"]

logger = logging.getLogger(__name__)


class Trainer:
    """Runs one training run on components built by build_components; rank 0 alone logs and saves."""

    def __init__(self, cfg: TrainConfig, runtime: Runtime, parts: Components, lock: RunLock | None = None):
        self.cfg, self.runtime, self.parts, self.lock = cfg, runtime, parts, lock
        self.model, self.optimizer, self.ema = parts.model, parts.optimizer, parts.ema
        self.output, self.class_names = parts.output, parts.class_names
        self.lr, self.epochs, self.steps_per_epoch = parts.lr, parts.epochs, parts.steps_per_epoch
        self.global_batch = parts.global_batch
        self.loop = LoopState()  # where the run stands; restored from a checkpoint when resuming
        self.checkpoints = Checkpointer(cfg, runtime, parts, self.loop)
        self.steps = StepRunner(parts, runtime, cfg.optim.clip_grad)
        self.report = RunReport(cfg, runtime, parts, self.loop, self.checkpoints.gather)
        self.metrics: MetricsLog | None = None

    @classmethod
    def from_config(cls, cfg: TrainConfig | Mapping[str, Any], runtime: Runtime) -> Trainer:
        """Lock the run folder, then build every component from cfg (checking every input) for a Trainer.

        The lock comes first, so a second training on a folder in use moves nothing aside; every rank
        stops when rank 0 cannot take it.
        """
        cfg = with_run_folder(as_train_config(cfg), runtime)
        output = Path(cfg.train.output)
        lock, error, created = RunLock(output), None, []
        if runtime.is_main:
            try:
                created = make_run_folder(output)
                if not lock.path.exists():
                    created.insert(0, lock.path)
                lock.acquire()
            except ValueError as raised:
                error = raised
        agree_on_failure(runtime, error)
        try:
            return cls(cfg, runtime, build_components(cfg, runtime), lock)
        except BaseException:
            lock.release()
            remove_created(created)
            raise

    def _log(self, text: str) -> None:
        if self.runtime.is_main:
            logger.info(text)

    def set_train_mode(self) -> None:
        self.parts.ddp.train()
        for stage in self.model.stages[: self.cfg.model.freeze_stages]:
            stage.eval()

    def run(self) -> dict[str, Any]:
        """Train from where the run stands to the last epoch; returns the summary. Releases the run folder."""
        try:
            return self._run()
        finally:
            if self.lock is not None:
                self.lock.release()

    def _run(self) -> dict[str, Any]:
        t, parts, loop = self.cfg.train, self.parts, self.loop
        self.checkpoints.started = self.report.started = time.perf_counter()
        if parts.resume_state is not None:
            self.checkpoints.restore(parts.resume_state)
            parts.resume_state = None
            if loop.start_epoch >= self.epochs:
                return self.report.finished()
            self._log(f"resuming from {parts.resume_path} at epoch {loop.start_epoch + 1}, "
                      f"step {loop.global_step}")
        main = self.runtime.is_main
        resumed_at = loop.global_step if parts.resume_path else None
        self.metrics = MetricsLog(self.output, resumed_at) if main else None
        progress = Progress(main, t.quiet, t.log_every_steps)
        self._log(
            f"training {self.cfg.model.name} on {len(parts.train_set)} images of "
            f"{len(self.class_names)} classes ({parts.train_dir}), {self.runtime.world_size} process(es) on "
            f"{self.runtime.device}, global batch {self.global_batch}, lr {self.lr:.3g}, "
            f"{self._length()}; output {self.output}"
        )
        if parts.amp_dtype is not None or parts.val_amp_dtype is not None:
            self._log(_precision(parts.amp_dtype, parts.val_amp_dtype))
        last_val: dict[str, Any] = {}
        try:
            for epoch in range(loop.start_epoch, self.epochs):
                self._train_epoch(epoch, progress)
                last_val = self.report.validate(epoch, self.metrics, progress)
                loop.last_val = {key: last_val[key] for key in ("top1", "top5", "loss")}
                self.report.warn_unlearnable_classes()
                # best.pth first: last.pth then records a best score that best.pth already holds.
                if last_val["top1"] > loop.best_top1:
                    loop.best_top1, loop.best_top5 = last_val["top1"], last_val["top5"]
                    self._save(BEST_NAME, epoch + 1, 0)
                self._save(LAST_NAME, epoch + 1, 0)
        finally:
            progress.close()
            if self.metrics is not None:
                self.metrics.close()
        return self.report.finish(last_val, self.steps.left_out)

    def _length(self) -> str:
        steps = self.parts.max_steps
        return f"{steps} steps ({self.epochs} epochs)" if steps is not None else f"{self.epochs} epochs"

    def _save(self, name: str, epoch: int, epoch_images: int) -> None:
        self.checkpoints.save(name, epoch, epoch_images, self.loop.left_out + self.steps.left_out)

    def _train_epoch(self, epoch: int, progress: Progress) -> None:
        """The steps of one epoch, from the image a resumed run stopped at (counted in images, not steps,
        so a batch size changed on resume neither skips nor repeats any)."""
        parts, loop, world = self.parts, self.loop, self.runtime.world_size
        every, interval = self.cfg.train.checkpoint_every_steps, self.cfg.sched.interval
        batch = parts.batch_size
        # Per rank: images drawn before this segment, and the images one whole epoch trains.
        first = loop.start_images // world if epoch == loop.start_epoch else 0
        steps, whole = (len(parts.sampler.sampler) - first) // batch, self.steps_per_epoch * batch
        parts.sampler.set_epoch(epoch, first)
        update_lr(parts.scheduler, interval, epoch, loop.global_step)
        self.set_train_mode()
        progress.start(epoch, self.epochs, first // batch + steps, first // batch)
        window_loss, window_steps, tick = self.steps.zero(), 0, time.perf_counter()
        batches = merge_lone_images(parts.train_loader, batch, self._left_out)
        for done, (images, targets, bad) in enumerate(batches, start=1):
            if parts.max_steps is not None and loop.global_step >= parts.max_steps:
                break  # a run counted in steps ends mid-epoch
            error = None
            try:
                self.report.unreadable(bad)
            except ValueError as raised:
                error = raised
            agree_on_failure(self.runtime, error)
            loss = self.steps.step(images, targets, loop.global_step)
            if loss is None:
                continue
            loop.global_step += 1
            update_lr(parts.scheduler, interval, epoch, loop.global_step)
            window_loss, window_steps = window_loss + loss, window_steps + 1
            loop.train_images += self.global_batch
            drawn = first + done * batch
            at_end = done == steps or loop.global_step == parts.max_steps
            log = loop.global_step % progress.every == 0 or at_end  # a metrics record and a line
            show = log or progress.due()  # a line only: a log file shows progress every so often
            saving = bool(every) and loop.global_step % every == 0
            mean_loss = None
            if log or saving:
                # The one host sync of a logging interval: divergence check and the window's loss.
                mean_loss = self.steps.check_finite(window_loss, self.checkpoints.kept()) / window_steps
            elif show:
                # A line by the clock is rank 0's alone: its own window's loss, without a collective.
                mean_loss = float(window_loss) / window_steps
            elapsed = time.perf_counter() - tick
            lr = self.optimizer.param_groups[-1]["lr"]
            speed = window_steps * self.global_batch / max(elapsed, 1e-9)
            progress.update(first // batch + done, mean_loss if show else None, lr, speed)
            if log:
                if self.metrics is not None:
                    self.metrics.write({"kind": "train", "step": loop.global_step,
                                        "epoch": epoch + min(1.0, drawn / whole), "loss": mean_loss,
                                        "lr": lr, "images_per_second": speed})
                loop.train_seconds += elapsed
                window_loss, window_steps, tick = self.steps.zero(), 0, time.perf_counter()
            if saving:
                self._save(LAST_NAME, epoch, drawn * world)
        self.steps.check_finite(window_loss, self.checkpoints.kept())
        loop.train_seconds += time.perf_counter() - tick if window_steps else 0.0
        progress.close()

    def _left_out(self, count: int) -> None:
        self.steps.left_out += count
        logger.warning(f"left out {count} readable image(s) of an epoch whose other images were all "
                       "unreadable: a training batch needs two")


def _precision(train: torch.dtype | None, val: torch.dtype | None) -> str:
    """The one line that says a run uses mixed precision, and which (timm's train.py says it too)."""
    def name(dtype: torch.dtype | None) -> str:
        return {torch.bfloat16: "bf16 autocast", torch.float16: "fp16 autocast"}.get(dtype, "float32")

    scaling = " with loss scaling" if train is torch.float16 else ""
    return f"mixed precision: training in {name(train)}{scaling}, validation in {name(val)}"


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

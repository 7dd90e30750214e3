"""What a run reports: validation per epoch, unreadable and unlearnable data, summary.json and curves.png."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from ..errors import TorchcvtError
from ..runrecord import BEST_NAME, CURVES_NAME, LAST_NAME, METRICS_NAME, SUMMARY_NAME, RunSummary
from .build import Components
from .evaluate import evaluate
from .reporting import MetricsLog, Progress, accuracy_text, plot_curves, train_loss_label
from .runtime import Runtime
from .snapshot import LoopState
from .train_config import TrainConfig

logger = logging.getLogger(__name__)


class RunReport:
    """Validation, notices about the data, and the summary of a run (written by rank 0)."""

    def __init__(self, cfg: TrainConfig, runtime: Runtime, parts: Components, loop: LoopState,
                 gather: Callable[[Any], list[Any]]):
        self.cfg, self.runtime, self.parts, self.loop, self.gather = cfg, runtime, parts, loop, gather
        self.strict = cfg.data.strict
        self.warned_classes: set[str] = set()
        self.epochs = parts.epochs
        self.started = time.perf_counter()

    def _log(self, text: str) -> None:
        if self.runtime.is_main:
            logger.info(text)

    def unreadable(self, bad: list) -> None:
        """Count and name unreadable training images; a ValueError under data.strict."""
        for sample in bad:
            if self.strict:
                raise TorchcvtError(
                    f"unreadable image {sample.path} ({sample.error}); data.strict stops the run"
                )
            self.loop.skipped.add(sample.path)
            if self.runtime.is_main:
                logger.warning(f"skipped unreadable image {sample.path}: {sample.error}; "
                               f"{len(self.loop.skipped)} skipped so far")

    def warn_unlearnable_classes(self) -> None:
        """Warn (once a class) about a class none of whose training images could be read."""
        skipped = set().union(*self.gather(self.loop.skipped))
        paths: dict[int, list[str]] = {}
        for path, target in self.parts.train_set.samples:
            paths.setdefault(target, []).append(path)
        for target, files in sorted(paths.items()):
            name = self.parts.class_names[target]
            if name not in self.warned_classes and all(path in skipped for path in files):
                self.warned_classes.add(name)
                if self.runtime.is_main:
                    logger.warning(f"class {name!r} has no readable training image ({len(files)} "
                                   "unreadable): the model cannot learn it")

    def validate(self, epoch: int, metrics: MetricsLog | None, progress: Progress | None = None
                 ) -> dict[str, Any]:
        """Score the model (and its EMA) on the validation set, shown by progress; logged and written to
        metrics.jsonl."""
        parts = self.parts
        loader = parts.val_loader
        if progress is not None:
            loader = progress.validating(loader, len(parts.val_loader))
        args = (self.runtime.device, len(parts.class_names), self.runtime, parts.val_amp_dtype)
        result = evaluate(parts.model, loader, *args, strict=self.strict)
        record = {
            "kind": "val",
            "step": self.loop.global_step,
            "epoch": epoch + 1,
            "top1": result["top1"],
            "top5": result["top5"],
            "loss": result["loss"],
            "images": result["images"],
            "unreadable": result["unreadable"],
        }
        if parts.ema is not None:
            ema = evaluate(parts.ema.module, parts.val_loader, *args, strict=self.strict)
            record.update(ema_top1=ema["top1"], ema_top5=ema["top5"], ema_loss=ema["loss"])
            result = {**result, "ema_top1": ema["top1"], "ema_top5": ema["top5"]}
        if metrics is not None:
            metrics.write(record)
        ema_scores = (f", EMA {accuracy_text(result['ema_top1'], result['ema_top5'], len(parts.class_names))}"
                      if "ema_top1" in result else "")
        scores = accuracy_text(result["top1"], result["top5"], len(parts.class_names))
        self._log(
            f"epoch {epoch + 1}/{self.epochs}: val {scores} loss {result['loss']:.4f}{ema_scores}"
        )
        return result

    def finished(self) -> dict[str, Any]:
        """A run resumed after its last epoch: its summary, unchanged (written now if a kill prevented it)."""
        output = self.parts.output
        # Resumed with fewer epochs than it trained: the summary counts the epochs its metrics hold.
        self.epochs = max(self.epochs, self.loop.start_epoch)
        self._log(f"the run in {output} is already finished ({self.epochs} epochs); nothing to do")
        summary = output / SUMMARY_NAME
        if summary.is_file():
            try:
                return RunSummary.read(summary).to_dict()
            except TorchcvtError as error:  # left torn by a kill or a full disk before writes were atomic
                logger.warning(f"{error}; writing it again from {output / LAST_NAME}")
        if self.loop.last_val is None:
            self.loop.last_val = self.validate(self.epochs - 1, None)
        return self.finish(self.loop.last_val)

    def finish(self, last_val: dict[str, Any], left_out: int = 0) -> dict[str, Any]:
        """Write summary.json and curves.png (rank 0); returns the summary (RunSummary.to_dict())."""
        loop, output = self.loop, self.parts.output
        skipped = set().union(*self.gather(loop.skipped))
        left_out = sum(self.gather(loop.left_out + left_out))
        best_is_last = loop.best_top1 < last_val["top1"]
        summary = RunSummary(
            model=self.cfg.model.name,
            best_val_top1=max(loop.best_top1, last_val["top1"]),
            best_val_top5=last_val["top5"] if best_is_last else loop.best_top5,
            final_val_top1=last_val["top1"],
            final_val_top5=last_val["top5"],
            final_val_loss=last_val["loss"],
            epochs=self.epochs,
            steps=loop.global_step,
            wall_seconds=loop.wall_before + time.perf_counter() - self.started,
            images_per_second=loop.train_images / max(loop.train_seconds, 1e-9),
            world_size=self.runtime.world_size,
            skipped_images=len(skipped),
            left_out_images=left_out,
            checkpoint=str(output / BEST_NAME),
            last_checkpoint=str(output / LAST_NAME),
            curves=str(output / CURVES_NAME),
            metrics=str(output / METRICS_NAME),
            summary=str(output / SUMMARY_NAME),
            ema_final_val_top1=last_val.get("ema_top1"),
            ema_final_val_top5=last_val.get("ema_top5"),
            classes=len(self.parts.class_names),
        )
        if self.runtime.is_main:
            summary.write(output / SUMMARY_NAME)
            plot_curves(output / METRICS_NAME, output / CURVES_NAME, len(self.parts.class_names),
                        train_loss_label(self.cfg.aug.label_smoothing, self.parts.mixup is not None))
        return summary.to_dict()

"""A run folder's records, typed: the training checkpoint (best.pth, last.pth) and the run summary
(summary.json), each with a format version, and the names of every file a run writes.

The engine writes them; the weights layer, the model card and the ablation report read them, through the
record types here and nowhere else. Imports nothing of torchcvt above files and errors.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import TorchcvtError
from .files import read_json, write_json

LAST_NAME = "last.pth"
BEST_NAME = "best.pth"
PREVIOUS_NAME = "last.prev.pth"  # the last.pth a new one replaced, kept as a fallback
SUMMARY_NAME = "summary.json"
METRICS_NAME = "metrics.jsonl"
CURVES_NAME = "curves.png"
TENSORBOARD_NAME = "tensorboard"
# Everything a run writes in its folder: what starting afresh there sets aside rather than overwrites.
RUN_FILES = (LAST_NAME, PREVIOUS_NAME, BEST_NAME, METRICS_NAME, SUMMARY_NAME, CURVES_NAME, TENSORBOARD_NAME)

# Training checkpoint formats: 0 (no format_version field) and 1 are recognised by their model_name and
# config keys; 2 adds RECORD_KIND. Bumped whenever a key's meaning changes.
CHECKPOINT_FORMAT = 2
CHECKPOINT_KIND = "torchcvt.training_checkpoint"
# Summaries without a format_version field were written before it existed (0); 1 adds the EMA scores.
SUMMARY_FORMAT = 1


@dataclass
class TrainingCheckpoint:
    """best.pth / last.pth: the model with what it is (variant, model config, classes, training config),
    its EMA average, and where the run stands (optimiser, schedule, loop counters, every rank's RNG).

    Older files lack some fields (None or the default here); `resume_gaps` names those a resume needs.
    """

    state_dict: dict[str, Any] | None = None
    model_name: str | None = None
    config: dict[str, Any] | None = None  # the CvtConfig, as to_dict gives it
    class_names: list[str] | None = None
    ema: dict[str, Any] | None = None  # the EMA model's state dict (train.ema), else None
    train_config: dict[str, Any] | None = None  # the TrainConfig, as to_dict gives it
    optimizer: dict[str, Any] | None = None
    scheduler: dict[str, Any] | None = None
    scaler: dict[str, Any] | None = None
    epoch: int | None = None  # epochs finished (the one in progress for a mid-epoch checkpoint)
    step_in_epoch: int | None = None
    epoch_images: int | None = None  # images drawn from the epoch in progress, over all ranks
    global_step: int | None = None
    best_top1: float = -1.0
    best_top5: float = -1.0
    world_size: int = 1
    rng: list[Any] | None = None  # one RNG state per rank
    skipped_images: list[str] = dataclasses.field(default_factory=list)
    left_out_images: int = 0
    last_val: dict[str, float] | None = None
    wall_seconds: float = 0.0
    train_images: int = 0
    train_seconds: float = 0.0
    format_version: int = CHECKPOINT_FORMAT

    RESUME_FIELDS = ("state_dict", "optimizer", "scheduler", "epoch", "step_in_epoch", "global_step", "rng")

    @staticmethod
    def recognise(obj: Any) -> bool:
        """Whether a loaded file is a training checkpoint (formats 0 and 1 by their keys alone)."""
        if not isinstance(obj, Mapping):
            return False
        return obj.get("record") == CHECKPOINT_KIND or ("model_name" in obj and isinstance(obj.get("config"),
                                                                                           dict))

    @classmethod
    def from_dict(cls, obj: Mapping[str, Any], path: str | Path) -> TrainingCheckpoint:
        """The record a loaded file holds; a newer format than this torchcvt reads is a one-line error."""
        version = int(obj.get("format_version", 0))
        if version > CHECKPOINT_FORMAT:
            raise TorchcvtError(
                f"checkpoint {path} has training-state format {version}; this torchcvt reads up to "
                f"{CHECKPOINT_FORMAT}: upgrade torchcvt"
            )
        known = {f.name for f in dataclasses.fields(cls)}
        record = cls(**{key: value for key, value in obj.items() if key in known})
        if record.epoch_images is None and record.step_in_epoch is not None:
            # Format 0 counted steps: images drawn = steps x the batch it ran at x its processes.
            batch = ((record.train_config or {}).get("train") or {}).get("batch_size", 0)
            record.epoch_images = int(record.step_in_epoch) * int(batch) * int(record.world_size)
        return record

    def to_dict(self) -> dict[str, Any]:
        """What torch.save writes (tensors and plain data only): every field, the format and the kind."""
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return {**fields, "format_version": CHECKPOINT_FORMAT, "record": CHECKPOINT_KIND}

    def resume_gaps(self) -> list[str]:
        """The fields a resume needs that this record lacks (a weights-only file lacks them all)."""
        return [name for name in self.RESUME_FIELDS if getattr(self, name) is None]


@dataclass(frozen=True)
class RunSummary:
    """summary.json: a finished run's scores (fractions), length, speed, data counts and file paths."""

    model: str
    best_val_top1: float
    best_val_top5: float
    final_val_top1: float
    final_val_top5: float
    final_val_loss: float
    epochs: int
    steps: int
    wall_seconds: float
    images_per_second: float
    world_size: int
    skipped_images: int
    left_out_images: int
    checkpoint: str  # best.pth
    last_checkpoint: str
    curves: str
    metrics: str
    summary: str
    # The EMA model's scores after the last epoch (train.ema), beside the plain model's; else None.
    ema_final_val_top1: float | None = None
    ema_final_val_top5: float | None = None
    # The number of classes, so a report can leave out top-5 where it is always 100% (None: not recorded).
    classes: int | None = None
    format_version: int = SUMMARY_FORMAT

    @classmethod
    def read(cls, path: str | Path) -> RunSummary:
        """summary.json read; a torn or foreign file is a one-line error naming it."""
        path = Path(path)
        data = read_json(path, "run summary")
        version = int(data.get("format_version", 0))
        if version > SUMMARY_FORMAT:
            raise TorchcvtError(f"run summary {path} has format {version}; this torchcvt reads up to "
                                f"{SUMMARY_FORMAT}: upgrade torchcvt")
        fields = {f.name for f in dataclasses.fields(cls)}
        missing = sorted(f.name for f in dataclasses.fields(cls) if f.name not in data
                         and f.default is dataclasses.MISSING)
        if missing:
            raise TorchcvtError(f"run summary {path} lacks {', '.join(missing)}: it is no torchcvt summary")
        return cls(**{key: value for key, value in data.items() if key in fields and key != "format_version"})

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "format_version": SUMMARY_FORMAT}

    def write(self, path: str | Path) -> None:
        """Write as JSON, atomically (files.write_json): a full disk leaves an older summary whole."""
        write_json(path, self.to_dict())

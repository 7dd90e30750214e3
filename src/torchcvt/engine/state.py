"""The training checkpoint (runrecord.TrainingCheckpoint) on disk: written atomically, read safely, and
checked against a new config before a run resumes from it."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch

from ..config import ARCHITECTURE_FIELDS, CvtConfig, architecture_differences
from ..errors import TorchcvtError
from ..files import replace_file
from ..paths import input_file_problem
from ..runrecord import CHECKPOINT_FORMAT as FORMAT_VERSION
from ..runrecord import LAST_NAME, PREVIOUS_NAME, RUN_FILES, TrainingCheckpoint
from ..typed import UNSET, differences, flatten
from ..weights.io import load_torch
from .train_config import TrainConfig

__all__ = ["FORMAT_VERSION", "TrainingCheckpoint", "read_training_state", "save_training_state"]
# The start of a torch.save file (a zip archive) and of what an interrupted write may leave of one.
ZIP_MAGIC = b"PK\x03\x04"

logger = logging.getLogger(__name__)


def previous_path(path: str | Path) -> Path:
    """Where save_training_state(keep_previous=True) keeps the file it replaces: last.pth -> last.prev.pth."""
    path = Path(path)
    if path.name == LAST_NAME:
        return path.with_name(PREVIOUS_NAME)
    return path.with_name(f"{path.stem}.prev{path.suffix}")


def save_training_state(
    state: TrainingCheckpoint | dict[str, Any], path: str | Path, keep_previous: bool = False
) -> None:
    """Write a training checkpoint (or any dict of tensors and plain data) atomically: a temporary file in
    the same folder, fsync, then rename over the old one.

    keep_previous keeps the replaced file as previous_path(path), a fallback should the new one be damaged.
    A failed write (a full disk) raises its OSError and leaves the old file as it was.
    """
    path = Path(path)
    data = state.to_dict() if isinstance(state, TrainingCheckpoint) else {**state,
                                                                          "format_version": FORMAT_VERSION}
    with replace_file(path, previous_path(path) if keep_previous else None) as handle:
        torch.save(data, handle)


def remove_leftover_temporaries(folder: str | Path) -> list[Path]:
    """Delete the temporary files a kill during save_training_state left in folder; returns them."""
    leftovers = sorted(Path(folder).glob(".*.pth.tmp-*"))
    for leftover in leftovers:
        leftover.unlink(missing_ok=True)
    if leftovers:
        logger.warning(
            f"removed {len(leftovers)} temporary file(s) left by an interrupted checkpoint write: "
            + ", ".join(str(p) for p in leftovers)
        )
    return leftovers


def set_aside_previous_run(folder: str | Path) -> Path | None:
    """Move a previous run's files in folder to folder/previous-N (the first free N); returns that folder."""
    folder = Path(folder)
    present = [folder / name for name in RUN_FILES if (folder / name).exists()]
    if not any(path.suffix in (".pth", ".jsonl", ".json") for path in present):
        return None
    n = 1
    while (folder / f"previous-{n}").exists():
        n += 1
    aside = folder / f"previous-{n}"
    aside.mkdir()
    for path in present:
        os.replace(path, aside / path.name)
    logger.warning(f"{folder} held a run and this one starts afresh: moved its files to {aside}")
    return aside


def read_training_state(path: str | Path) -> TrainingCheckpoint:
    """A training checkpoint (tensors and plain data only, so weights_only loading works).

    A file that is damaged or is no training checkpoint is a one-line ValueError naming it.
    """
    path = Path(path)
    if path.is_dir():
        raise TorchcvtError(
            f"checkpoint {path} is a folder without last.pth; give a training checkpoint file")
    problem = input_file_problem(path)
    if problem is not None:
        raise TorchcvtError(f"checkpoint {path} {problem}")
    state = load_torch(path, lambda: _damaged(path))
    if not isinstance(state, dict):
        raise TorchcvtError(f"checkpoint {path} holds a {type(state).__name__}, not a training checkpoint")
    return TrainingCheckpoint.from_dict(state, path)


def check_training_state(state: TrainingCheckpoint, path: str | Path) -> None:
    """One-line error when a checkpoint holds weights only (an official .pth, a weights file)."""
    missing = state.resume_gaps()
    if missing:
        raise TorchcvtError(
            f"checkpoint {path} is not a torchcvt training checkpoint (it lacks {', '.join(missing)}); "
            f"to start from its weights, set model.checkpoint={path} and train without resuming"
        )


def _damaged(path: Path) -> str:
    with open(path, "rb") as handle:
        head = handle.read(len(ZIP_MAGIC))
    if head and not ZIP_MAGIC.startswith(head):
        return "it is not a torch checkpoint file"
    return _fallback(path)


def _fallback(path: Path) -> str:
    previous = previous_path(path)
    try:
        read_training_state(previous)
    except (ValueError, FileNotFoundError):
        return "no intact previous checkpoint is kept: start afresh with --no-resume"
    return f"the previous checkpoint {previous} is intact: resume from it with --resume {previous}"


# Changing one of these cannot continue a run: another model, other starting weights (a resumed run keeps
# its own weights, so new ones would be ignored), or an optimiser state of another layout.
FIXED_ON_RESUME = (
    "model.name", "model.pretrained", "model.checkpoint", "model.freeze_stages", "optim.opt",
    "optim.layer_decay",
)
# How to leave a run folder's run behind instead of resuming it.
START_AFRESH = "start afresh with --no-resume (the old run moves to OUTPUT/previous-N) or a new --output"
# Where and how to resume, not what to train: never reported as a change (a run folder copied or moved
# to a new name resumes there as the same run).
RESUME_KEYS = ("train.resume", "train.auto_resume", "train.output")


def config_changes(saved: dict[str, Any], new: TrainConfig, model: dict[str, Any] | None = None
                   ) -> dict[str, tuple[Any, Any]]:
    """Every dotted key whose value differs between a checkpoint's train_config and a new config.

    A model.overrides entry the new config adds with the value of the model the checkpoint holds (model,
    its recorded model config) is no change: that run's config left it to the starting weights.
    """
    changes = differences(saved, new, ignore=RESUME_KEYS)
    prefix = "model.overrides."
    return {key: (old, ours) for key, (old, ours) in changes.items()
            if not (old is UNSET and key.startswith(prefix) and model is not None
                    and flatten(model).get(key[len(prefix):], UNSET) == ours)}


def check_resumable(
    state: TrainingCheckpoint, cfg: TrainConfig, config: CvtConfig, class_names: list[str], path: Path
) -> dict[str, tuple[Any, Any]]:
    """The config keys changed since the checkpoint; a one-line error for a change a run cannot survive."""
    saved_config = state.config
    if isinstance(saved_config, dict):
        fields = (*ARCHITECTURE_FIELDS, "img_size")
        differences = architecture_differences(saved_config, config.to_dict(), fields)
        if differences:
            field, theirs, ours = differences[0]
            raise TorchcvtError(
                f"cannot resume from {path}: model {field} is {theirs} there but {ours} in this config; "
                f"{START_AFRESH}"
            )
    saved_classes = state.class_names
    if saved_classes is not None and list(saved_classes) != class_names:
        raise TorchcvtError(
            f"cannot resume from {path}: it was trained on {len(saved_classes)} classes "
            f"{_preview(saved_classes)} but the data has {len(class_names)} classes {_preview(class_names)}; "
            f"{START_AFRESH}"
        )
    changes = config_changes(state.train_config or {}, cfg,
                             saved_config if isinstance(saved_config, dict) else None)
    for key in FIXED_ON_RESUME:
        if key in changes:
            old, new = changes[key]
            raise TorchcvtError(
                f"cannot resume from {path}: {key} is {old!r} there but {new!r} in this config; "
                f"{START_AFRESH}"
            )
    return changes


def _preview(names: Any, limit: int = 5) -> str:
    names = list(names)
    return str(names[:limit])[:-1] + (", ...]" if len(names) > limit else "]")

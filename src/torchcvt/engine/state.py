"""The training checkpoint: a versioned dict of tensors and plain data, written atomically."""

from __future__ import annotations

import logging
import os
import pickle
import shutil
from pathlib import Path
from typing import Any

import torch

from ..config import ARCHITECTURE_FIELDS, CvtConfig

# Bumped whenever a key's meaning changes; files without the field were written before it existed (0).
FORMAT_VERSION = 1

# What resuming needs; a file without these keys (an official .pth, a weights file) holds weights only.
RESUME_KEYS = ("state_dict", "optimizer", "scheduler", "epoch", "step_in_epoch", "global_step", "rng")
# The start of a torch.save file (a zip archive) and of what an interrupted write may leave of one.
ZIP_MAGIC = b"PK\x03\x04"

logger = logging.getLogger(__name__)


def previous_path(path: str | Path) -> Path:
    """Where save_training_state(keep_previous=True) keeps the file it replaces: last.pth -> last.prev.pth."""
    path = Path(path)
    return path.with_name(f"{path.stem}.prev{path.suffix}")


def save_training_state(state: dict[str, Any], path: str | Path, keep_previous: bool = False) -> None:
    """Write atomically: a temporary file in the same folder, fsync, then rename over the old one.

    keep_previous keeps the replaced file as previous_path(path), a fallback should the new one be damaged.
    """
    path = Path(path)
    state = {**state, "format_version": FORMAT_VERSION}
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    previous = previous_path(path)
    previous_tmp = previous.with_name(f".{previous.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as handle:
            torch.save(state, handle)
            handle.flush()
            os.fsync(handle.fileno())
        if keep_previous and path.is_file():
            # A second name for the old file, so `path` exists at every moment a kill may come.
            try:
                os.link(path, previous_tmp)
            except OSError:
                shutil.copyfile(path, previous_tmp)
            os.replace(previous_tmp, previous)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
        previous_tmp.unlink(missing_ok=True)
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


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


# Everything a run writes in its folder: what starting afresh there sets aside rather than overwrites.
RUN_FILES = (
    "last.pth", "last.prev.pth", "best.pth", "metrics.jsonl", "summary.json", "curves.png", "tensorboard",
)


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


def read_training_state(path: str | Path) -> dict[str, Any]:
    """A training checkpoint dict (tensors and plain data only, so weights_only loading works).

    A file that is damaged or is no training checkpoint is a one-line ValueError naming it.
    """
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"checkpoint {path} is a folder without last.pth; give a training checkpoint file")
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise ValueError(
            f"checkpoint {path} is not a torchcvt training checkpoint: it holds pickled Python objects, "
            "which are not loaded (only tensors and plain data are)"
        ) from None
    except (RuntimeError, EOFError) as error:
        with open(path, "rb") as handle:
            head = handle.read(len(ZIP_MAGIC))
        if head and not ZIP_MAGIC.startswith(head[: len(ZIP_MAGIC)]):
            reason = str(error).splitlines()[0] if str(error) else type(error).__name__
            raise ValueError(f"checkpoint {path} is not a torch checkpoint file ({reason})") from None
        raise ValueError(f"checkpoint {path} is damaged (cut short or corrupt); {_fallback(path)}") from None
    if not isinstance(state, dict):
        raise ValueError(f"checkpoint {path} holds a {type(state).__name__}, not a training checkpoint")
    version = state.get("format_version", 0)
    if version > FORMAT_VERSION:
        raise ValueError(
            f"checkpoint {path} has training-state format {version}; this torchcvt reads up to "
            f"{FORMAT_VERSION}: upgrade torchcvt"
        )
    return state


def check_resumable(state: dict[str, Any], path: str | Path) -> None:
    """One-line error when a checkpoint holds weights only (an official .pth, a weights file)."""
    missing = [key for key in RESUME_KEYS if key not in state]
    if missing:
        raise ValueError(
            f"checkpoint {path} is not a torchcvt training checkpoint (it lacks {', '.join(missing)}); "
            f"to start from its weights, set model.checkpoint={path} and train without resuming"
        )


def _fallback(path: Path) -> str:
    previous = previous_path(path)
    try:
        read_training_state(previous)
    except (ValueError, FileNotFoundError):
        return "no intact previous checkpoint is kept: start afresh with --no-resume"
    return f"the previous checkpoint {previous} is intact: resume from it with --resume {previous}"


def check_same_architecture(
    checkpoint: dict[str, Any], config: CvtConfig, name: str, path: str | Path
) -> None:
    """One-line error when a torchcvt checkpoint holds another architecture than the model being built."""
    saved = checkpoint.get("config")
    if not isinstance(saved, dict):
        return
    ours = config.to_dict()
    differing = [f for f in ARCHITECTURE_FIELDS if f in saved and _plain(saved[f]) != _plain(ours[f])]
    if differing:
        field = differing[0]
        raise ValueError(
            f"checkpoint {path} holds a {checkpoint.get('model_name', 'different model')} whose {field} is "
            f"{saved[field]} but this run builds {name} with {field} {ours[field]}"
        )


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value

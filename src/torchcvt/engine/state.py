"""The training checkpoint: a versioned dict of tensors and plain data, written atomically."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from ..config import ARCHITECTURE_FIELDS, CvtConfig

# Bumped whenever a key's meaning changes; files without the field were written before it existed (0).
FORMAT_VERSION = 1


def save_training_state(state: dict[str, Any], path: str | Path) -> None:
    """Write atomically: a temporary file in the same folder, fsync, then rename over the old one."""
    path = Path(path)
    state = {**state, "format_version": FORMAT_VERSION}
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as handle:
            torch.save(state, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def read_training_state(path: str | Path) -> dict[str, Any]:
    """A training checkpoint dict (tensors and plain data only, so weights_only loading works)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    state = torch.load(path, map_location="cpu", weights_only=True)
    version = state.get("format_version", 0) if isinstance(state, dict) else None
    if version is not None and version > FORMAT_VERSION:
        raise ValueError(
            f"checkpoint {path} has training-state format {version}; this torchcvt reads up to "
            f"{FORMAT_VERSION}: upgrade torchcvt"
        )
    return state


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


# Changing one of these cannot continue a run: another model, or an optimiser state of another layout.
FIXED_ON_RESUME = ("model.name", "model.freeze_stages", "optim.opt", "optim.layer_decay")
# Where and how to resume, not what to train: never reported as a change.
RESUME_KEYS = ("train.resume", "train.auto_resume")


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = _plain(value)
    return flat


def config_changes(saved: dict[str, Any], new: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """Every dotted key whose value differs between a checkpoint's train_config and a new config."""
    old, ours = _flatten(saved), _flatten(new)
    return {
        key: (old.get(key), ours.get(key))
        for key in sorted(set(old) | set(ours))
        if key not in RESUME_KEYS and old.get(key) != ours.get(key)
    }


def check_resumable(
    state: dict[str, Any], cfg: dict[str, Any], config: CvtConfig, class_names: list[str], path: Path
) -> dict[str, tuple[Any, Any]]:
    """The config keys changed since the checkpoint; a one-line error for a change a run cannot survive."""
    saved_config = state.get("config")
    if isinstance(saved_config, dict):
        ours = config.to_dict()
        for field in (*ARCHITECTURE_FIELDS, "img_size"):
            if field in saved_config and _plain(saved_config[field]) != _plain(ours[field]):
                raise ValueError(
                    f"cannot resume from {path}: model {field} is {_plain(saved_config[field])} there but "
                    f"{_plain(ours[field])} in this config"
                )
    saved_classes = state.get("class_names")
    if saved_classes is not None and list(saved_classes) != class_names:
        raise ValueError(
            f"cannot resume from {path}: it was trained on {len(saved_classes)} classes "
            f"{_preview(saved_classes)} but the data has {len(class_names)} classes {_preview(class_names)}"
        )
    changes = config_changes(state.get("train_config") or {}, cfg)
    for key in FIXED_ON_RESUME:
        if key in changes:
            old, new = changes[key]
            raise ValueError(f"cannot resume from {path}: {key} is {old!r} there but {new!r} in this config")
    return changes


def _preview(names: Any, limit: int = 5) -> str:
    names = list(names)
    return str(names[:limit])[:-1] + (", ...]" if len(names) > limit else "]")

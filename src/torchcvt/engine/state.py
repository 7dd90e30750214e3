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

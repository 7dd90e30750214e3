"""Checks of user-given output paths and devices, made before any work so a bad one costs nothing."""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from .errors import TorchcvtError


def check_output_file(path: str | Path, what: str = "output") -> Path:
    """Raise a one-line TorchcvtError unless path can be written as a file; returns it."""
    path = Path(path)
    if path.is_dir():
        raise TorchcvtError(f"{what} {path} is a folder: give a file name")
    folder = path.parent
    if not folder.exists():
        raise TorchcvtError(f"output folder {folder} does not exist")
    if not folder.is_dir():
        raise TorchcvtError(f"{what} {path}: {folder} is a file, not a folder")
    _check_writable(folder, what)
    return path


def check_output_folder(path: str | Path, what: str = "output") -> Path:
    """A one-line TorchcvtError unless path is a writable folder or can be created as one; returns it."""
    path = Path(path)
    existing = next((p for p in (path, *path.parents) if p.exists()), Path("."))
    if not existing.is_dir():
        raise TorchcvtError(f"{what} {path}: {existing} is a file, not a folder")
    _check_writable(existing, what)
    return path


def _check_writable(folder: Path, what: str) -> None:
    # Try it: permission bits say nothing for root, and nothing about read-only file systems.
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as error:
        raise TorchcvtError(f"{what}: cannot write in folder {folder} ({error.strerror or error})") from None


def resolve_device(device: str | torch.device = "auto", what: str = "device") -> torch.device:
    """'auto' (CUDA if present, else CPU) or a torch device name, checked to exist on this machine."""
    name = str(device)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        chosen = torch.device(device)
    except (RuntimeError, TypeError):
        raise TorchcvtError(f"{what}={name!r} is not a device: use auto, cpu, cuda or cuda:N") from None
    if chosen.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if not count:
            raise TorchcvtError(f"{what}={name!r} but CUDA is not available on this machine; use cpu")
        if chosen.index is not None and chosen.index >= count:
            raise TorchcvtError(f"{what}={name!r} does not exist: this machine has {count} CUDA device(s)")
    elif chosen.type == "mps" and not torch.backends.mps.is_available():
        raise TorchcvtError(f"{what}={name!r} but MPS is not available on this machine; use cpu")
    elif chosen.type not in ("cpu", "cuda", "mps"):
        raise TorchcvtError(f"{what}={name!r} is not supported: use auto, cpu, cuda or cuda:N")
    return chosen

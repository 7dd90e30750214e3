"""Checks of user-given output paths and devices, made before any work so a bad one costs nothing."""

from __future__ import annotations

import tempfile
from collections.abc import Iterable
from pathlib import Path

import torch

from .errors import TorchcvtError
from .files import refuse_special, special_kind


def check_output_file(path: str | Path, what: str = "output", reads: Iterable[str | Path | None] = (),
                      stream: bool = False) -> Path:
    """Raise a one-line TorchcvtError unless path can be written as a file by this command; returns it.

    Refused: a folder, a missing or read-only folder, an input of the same command (one of the files in
    reads, under any name), and a device, FIFO or socket unless the command
    streams to one on purpose (stream, said in its --help).
    """
    path = Path(path)
    if special_kind(path) is not None:
        if stream:
            return path
        refuse_special(path, what)
    if path.is_dir():
        raise TorchcvtError(f"{what} {path} is a folder: give a file name")
    folder = path.parent
    if not folder.exists():
        raise TorchcvtError(f"output folder {folder} does not exist")
    if not folder.is_dir():
        raise TorchcvtError(f"{what} {path}: {folder} is a file, not a folder")
    for given in _existing(reads):
        # samefile compares inodes, so a hard link or a symlink to the input is caught too.
        if path.exists() and path.samefile(given):
            raise TorchcvtError(f"{what} {path} is an input of this command ({given}): writing it would "
                                "destroy it, give another path")
    _check_writable(folder, what)
    return path


def check_output_folder(path: str | Path, what: str = "output", reads: Iterable[str | Path | None] = ()
                        ) -> Path:
    """Raise a one-line TorchcvtError unless path is a writable folder or can be created as one, holding
    no input of this command (reads); returns it."""
    path = Path(path)
    refuse_special(path, what)
    existing = next((p for p in (path, *path.parents) if p.exists()), Path("."))
    if not existing.is_dir():
        raise TorchcvtError(f"{what} {path}: {existing} is a file, not a folder")
    if path.is_dir():
        for given in _existing(reads):
            if given.samefile(path) or _inside(given, path):
                raise TorchcvtError(f"{what} {path} is or holds an input of this command ({given}): "
                                    "writing it would destroy it, give another folder")
    _check_writable(existing, what)
    return path


def _existing(paths: Iterable[str | Path | None]) -> list[Path]:
    return [Path(p) for p in paths if p is not None and not isinstance(p, bool) and Path(p).exists()]


def _inside(path: Path, folder: Path) -> bool:
    """Whether path lies somewhere under folder (links resolved, so another name for it counts)."""
    return any(parent.exists() and parent.samefile(folder) for parent in path.resolve().parents)


def _check_writable(folder: Path, what: str) -> None:
    """The one writability check: try it. Permission bits say nothing for root, and nothing about
    read-only file systems."""
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

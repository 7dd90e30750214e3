"""Tensor files in and out: safetensors and weights-only torch pickles, written through files.py.

Nothing here knows about CvT: it reads and writes dicts of tensors and the metadata beside them.
"""

from __future__ import annotations

import codecs
import json
import pickle
import re
import struct
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as safetensors_bytes

from ..errors import TorchcvtError
from ..files import replace_file, write_bytes

StateDict = dict[str, torch.Tensor]

# Wrappers whose prefix a saved state dict may carry: DistributedDataParallel and torch.compile.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")
# Where training checkpoints keep the model's state dict.
NESTED_KEYS = ("state_dict", "model")


def read_tensor_file(path: Path) -> tuple[Any, dict[str, str]]:
    """The object a safetensors or torch.save file holds, and the safetensors metadata ({} for torch files).

    Nothing beyond tensors and plain containers is unpickled; anything that is neither format is a one-line
    ValueError saying what the file is.
    """
    size = path.stat().st_size
    if size == 0:
        raise TorchcvtError(f"{path} is empty, not a checkpoint")
    with open(path, "rb") as file:
        head = file.read(512)
    if len(head) >= 9 and head[8:9] == b"{":
        (header_len,) = struct.unpack("<Q", head[:8])
        if header_len <= size - 8:
            return _read_safetensors(path)
        raise TorchcvtError(f"{path} is a truncated safetensors file ({size} bytes, its header alone needs "
                         f"{header_len + 8})")
    if head.startswith(b"PK\x03\x04") or head.startswith(b"\x80"):  # torch.save's zip format or legacy pickle
        return load_torch(path), {}
    try:  # incremental, so that a character cut at byte 512 does not count as binary
        codecs.getincrementaldecoder("utf-8")().decode(head)
        found = "a text file" if b"\0" not in head else "unrecognised binary data"
    except UnicodeDecodeError:
        found = "unrecognised binary data"
    raise TorchcvtError(
        f"{path} is not a checkpoint: it is {found}, neither safetensors nor a torch.save file")


def _read_safetensors(path: Path) -> tuple[StateDict, dict[str, str]]:
    try:
        with safe_open(path, framework="pt") as file:
            return {key: file.get_tensor(key) for key in file.keys()}, file.metadata() or {}
    except (SafetensorError, OSError, ValueError) as error:
        raise TorchcvtError(
            f"{path} is a damaged or truncated safetensors file ({first_line(error)})") from None


def load_torch(path: Path, damaged: Callable[[], str] | None = None) -> Any:
    """The one torch.load: weights only (tensors and plain containers), on the CPU, without torch's notice
    about a pickle protocol; anything else is a one-line error naming path, ending in damaged() when the
    file is a damaged torch file (where to turn instead)."""
    try:
        with warnings.catch_warnings():
            # A pickle protocol other than torch.save's is what an unsafe file often has: it is refused
            # below in one line, without torch's notice about the protocol before it.
            warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        found = re.search(r"GLOBAL (\S+)", str(error))
        what = f" ({found.group(1)})" if found else ""
        raise TorchcvtError(
            f"{path} holds pickled Python objects besides tensors{what}; torchcvt loads weights only "
            "(torch.load weights_only=True): save the model's state_dict alone"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as error:  # how torch reports a damaged archive
        hint = f"; {damaged()}" if damaged is not None else ""
        raise TorchcvtError(
            f"{path} is not a readable PyTorch checkpoint, truncated or damaged ({first_line(error)}){hint}"
        ) from None


def unwrap_state_dict(obj: Any, path: Path) -> StateDict:
    """The state dict inside a plain or training checkpoint, without DDP / torch.compile prefixes."""
    if not isinstance(obj, dict):
        raise TorchcvtError(f"{path} holds a {type(obj).__name__}, not a state dict")
    nested = next((obj[key] for key in NESTED_KEYS if isinstance(obj.get(key), dict)), None)
    if nested is not None and not any(isinstance(value, torch.Tensor) for value in obj.values()):
        obj = nested
    others = [key for key, value in obj.items() if not isinstance(value, torch.Tensor)]
    if others or not obj:
        found = f"non-tensor entries {preview(others)}" if obj else "it is empty"
        raise TorchcvtError(f"{path} is not a state dict of tensors: {found}")
    for prefix in WRAPPER_PREFIXES:
        if all(key.startswith(prefix) for key in obj):
            obj = {key[len(prefix):]: value for key, value in obj.items()}
    return obj


def parse_json(text: str, where: str) -> dict[str, Any]:
    """A JSON object, or a one-line ValueError naming where the text came from."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise TorchcvtError(f"{where} is not valid JSON ({error})") from None
    if not isinstance(data, dict):
        raise TorchcvtError(f"{where} holds JSON {type(data).__name__}, not an object")
    return data


def contiguous(state_dict: StateDict) -> StateDict:
    """Detached, contiguous CPU copies: what both file formats need."""
    return {key: value.detach().cpu().contiguous() for key, value in state_dict.items()}


def save_safetensors(state_dict: StateDict, path: Path, metadata: dict[str, str] | None = None) -> Path:
    """Write tensors (and string metadata) as one safetensors file, atomically (files.write_bytes)."""
    data = safetensors_bytes(contiguous(state_dict), {"format": "pt", **(metadata or {})})
    return write_bytes(path, data)


def save_torch(obj: Any, path: Path) -> Path:
    """torch.save obj, atomically (files.replace_file)."""
    with replace_file(path) as handle:
        torch.save(obj, handle)
    return path


def preview(items: list[str], limit: int = 5) -> str:
    """The first few items, comma-separated, and how many more there are."""
    shown = ", ".join(items[:limit])
    return shown + (f", ... and {len(items) - limit} more" if len(items) > limit else "")


def first_line(error: BaseException) -> str:
    """An exception's first message line, or its type's name when it has none."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__

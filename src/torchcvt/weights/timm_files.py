"""timm.create_model(name, checkpoint_path=FILE) on any file torchcvt writes.

timm's load_checkpoint reads FILE's tensors (a train checkpoint's `state_dict`, a transformers folder's
model.safetensors) and hands them to model.load_state_dict, without the file's class names or config. The
pre-hook here renames a transformers layout to torchcvt's keys, and reads what FILE records beside its
tensors: class names into pretrained_cfg['label_names'], and a notice for a field that changes the outputs
without changing any tensor's shape (the activation, the norm epsilon) and so must be given to create_model.
"""

from __future__ import annotations

import inspect
import logging
from pathlib import Path
from typing import Any

from torch import nn

from ..config import architecture_differences
from ..errors import TorchcvtError
from .checkpoint import CONFIG_NAME, Checkpoint, read_checkpoint
from .formats import READ_FILTERS, detect_layout

logger = logging.getLogger(__name__)

# Fields that no tensor shape shows: a checkpoint recording other values loads, but computes otherwise.
SHAPELESS_FIELDS = ("activation", "layer_norm_eps")


def accept_checkpoint_files(model: nn.Module) -> None:
    """Let model.load_state_dict take every layout torchcvt reads, with what timm's checkpoint_path= loses."""
    model.register_load_state_dict_pre_hook(_load_hook)


def _load_hook(model: nn.Module, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
    if prefix:
        return
    if detect_layout(state_dict) == "hf":
        renamed = READ_FILTERS["hf"][1](dict(state_dict))
        state_dict.clear()
        state_dict.update(renamed)
    path = _timm_checkpoint_path()
    if path is not None:
        _apply_recorded(model, path)


def _timm_checkpoint_path() -> Path | None:
    """The file timm.models.load_checkpoint is loading, when it is what called load_state_dict: timm passes
    the tensors alone, so the file is found as timm's own frame names it."""
    from timm.models import load_checkpoint

    frame = inspect.currentframe()
    while frame is not None:
        if frame.f_code is load_checkpoint.__code__:
            path = frame.f_locals.get("checkpoint_path")
            return Path(path) if path is not None else None
        frame = frame.f_back
    return None


def recorded(path: Path) -> Checkpoint | None:
    """What a checkpoint file records about itself; a transformers folder's weights file is read with the
    config.json beside it. None for a file torchcvt cannot read (timm's load then speaks for itself)."""
    folder = path.parent
    source = folder if path.suffix == ".safetensors" and (folder / CONFIG_NAME).is_file() else path
    try:
        return read_checkpoint(source)
    except TorchcvtError:
        return None


def _apply_recorded(model: nn.Module, path: Path) -> None:
    stored = recorded(path)
    if stored is None:
        return
    names = stored.class_names
    if names and len(names) == getattr(model, "num_classes", None) and hasattr(model, "pretrained_cfg"):
        model.pretrained_cfg = {**model.pretrained_cfg, "label_names": tuple(names)}
    config = getattr(model, "config", None)
    differences = architecture_differences(stored.config or {}, config.to_dict(), SHAPELESS_FIELDS) \
        if config is not None else []
    if differences:
        given = ", ".join(f"{field}={saved!r}" for field, saved, _ in differences)
        ours = ", ".join(f"{field} {value!r}" for field, _, value in differences)
        logger.warning(f"{path} was saved with {given} but this model has {ours}: its outputs will differ; "
                       f"pass {given} to timm.create_model")

"""Reading a checkpoint of any supported format into torchcvt's key layout, with what it says about itself."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..config import CvtConfig
from ..errors import TorchcvtError
from .formats import READ_FILTERS, config_from_hf, detect_layout, recorded_architecture, recorded_names
from .io import parse_json, preview, read_tensor_file, unwrap_state_dict

FORMATS = ("official", "hf", "torchcvt")
WEIGHTS_NAME = "model.safetensors"
HF_BIN_NAME = "pytorch_model.bin"
CONFIG_NAME = "config.json"
TORCHCVT_FORMAT_VERSION = 1


@dataclass
class Checkpoint:
    """Weights in torchcvt's key layout and what the checkpoint records about itself.

    config holds only the CvtConfig fields the checkpoint records (none for an official .pth; no
    activation for a transformers folder torchcvt did not write); architecture is the variant, if recorded.
    """

    path: Path
    format: str
    state_dict: dict[str, torch.Tensor]
    config: dict[str, Any] | None = None
    architecture: str | None = None
    class_names: tuple[str, ...] | None = None
    train_config: dict[str, Any] | None = None  # `torchcvt train`'s config, in its best/last.pth

    @property
    def num_classes(self) -> int:
        head = self.state_dict.get("head.weight")
        return 0 if head is None else head.shape[0]


def read_checkpoint(path: str | Path) -> Checkpoint:
    """Read any supported checkpoint file or directory; ValueError saying what it is not if it is none."""
    path = Path(path)
    if not path.exists():
        raise TorchcvtError(f"checkpoint {path} does not exist")
    if not path.is_dir():
        return _read_weights_file(path)
    weights = next((path / name for name in (WEIGHTS_NAME, HF_BIN_NAME) if (path / name).is_file()), None)
    if weights is None:
        raise TorchcvtError(
            f"{path} is a directory without {WEIGHTS_NAME} or {HF_BIN_NAME}, not a checkpoint")
    checkpoint = _read_weights_file(weights)
    config_path = path / CONFIG_NAME
    if config_path.is_file():
        _apply_config_json(checkpoint, config_path)
    return checkpoint


def _read_weights_file(path: Path) -> Checkpoint:
    obj, metadata = read_tensor_file(path)
    state_dict = unwrap_state_dict(obj, path)
    layout = detect_layout(state_dict)
    if layout is None:
        raise TorchcvtError(
            f"{path} holds {len(state_dict)} tensors but none of a CvT (such as "
            f"stage0.patch_embed.proj.weight or cvt.encoder.stages.0.*): {preview(list(state_dict))}"
        )
    checkpoint = Checkpoint(path, layout, READ_FILTERS[layout][1](state_dict))
    if "torchcvt" in metadata:
        where = f"{path} (safetensors metadata torchcvt)"
        _apply_torchcvt_meta(checkpoint, parse_json(metadata["torchcvt"], where), where)
    elif isinstance(obj.get("config"), dict) and "model_name" in obj:  # `torchcvt train`'s best/last.pth
        _apply_torchcvt_meta(checkpoint, {**obj, "architecture": obj["model_name"]}, str(path))
        train_config = obj.get("train_config")
        checkpoint.train_config = train_config if isinstance(train_config, dict) else None
    return checkpoint


def _apply_config_json(checkpoint: Checkpoint, config_path: Path) -> None:
    meta = parse_json(config_path.read_text(encoding="utf-8", errors="replace"), str(config_path))
    if meta.get("format") == "torchcvt":
        _apply_torchcvt_meta(checkpoint, meta, str(config_path))
    elif meta.get("model_type") == "cvt":
        checkpoint.format = "hf"
        config, architecture, names = config_from_hf(meta, str(config_path))
        checkpoint.config, checkpoint.architecture, checkpoint.class_names = config, architecture, names
    else:
        raise TorchcvtError(
            f"{config_path} is neither a transformers CvT config (model_type 'cvt') nor a torchcvt config "
            f"(model_type {meta.get('model_type')!r})"
        )


def _apply_torchcvt_meta(checkpoint: Checkpoint, meta: dict[str, Any], where: str) -> None:
    try:
        config = CvtConfig.from_dict(meta["config"]).to_dict()
    except (KeyError, TypeError, ValueError) as error:
        raise TorchcvtError(f"{where}: torchcvt metadata has no valid config ({error})") from None
    checkpoint.format = "torchcvt"
    checkpoint.config = config
    checkpoint.architecture = recorded_architecture(meta.get("architecture"), where, "architecture")
    checkpoint.class_names = recorded_names(meta.get("class_names"), where, "class_names")

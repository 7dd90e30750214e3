"""Reading a checkpoint of any supported format into torchcvt's key layout, with what it says about itself."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..config import CvtConfig
from ..errors import TorchcvtError
from ..runrecord import TrainingCheckpoint
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
    # The EMA average of the weights a training run kept (train.ema; timm's state_dict_ema), if any.
    ema_state_dict: dict[str, torch.Tensor] | None = None
    is_ema: bool = False  # state_dict holds the EMA weights (ema_weights())

    @property
    def num_classes(self) -> int:
        head = self.state_dict.get("head.weight")
        return 0 if head is None else head.shape[0]

    def ema_weights(self) -> Checkpoint:
        """This checkpoint with its EMA weights as state_dict (timm's use_ema); a one-line error without."""
        if self.is_ema:
            return self
        if self.ema_state_dict is None:
            raise TorchcvtError(
                f"checkpoint {self.path} holds no EMA weights (a `torchcvt train` run writes them with "
                "train.ema=true, timm's as state_dict_ema); use its weights without --ema (use_ema)"
            )
        return dataclasses.replace(self, state_dict=self.ema_state_dict, is_ema=True)


def read_checkpoint(path: str | Path, use_ema: bool = False) -> Checkpoint:
    """Read any supported checkpoint file or directory; ValueError saying what it is not if it is none.

    use_ema: its EMA weights instead of the plain ones (a one-line error when it has none).
    """
    path = Path(path)
    if not path.exists():
        raise TorchcvtError(f"checkpoint {path} does not exist")
    if use_ema:
        return read_checkpoint(path).ema_weights()
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
    ema = obj.get("state_dict_ema")  # timm's train.py keeps its EMA weights there
    if "torchcvt" in metadata:
        where = f"{path} (safetensors metadata torchcvt)"
        _apply_torchcvt_meta(checkpoint, parse_json(metadata["torchcvt"], where), where)
    elif TrainingCheckpoint.recognise(obj):  # `torchcvt train`'s best/last.pth
        record = TrainingCheckpoint.from_dict(obj, path)
        _apply_torchcvt_meta(checkpoint, {"config": record.config, "architecture": record.model_name,
                                          "class_names": record.class_names}, str(path))
        checkpoint.train_config = record.train_config if isinstance(record.train_config, dict) else None
        ema = record.ema
    if isinstance(ema, dict) and ema:
        checkpoint.ema_state_dict = READ_FILTERS[layout][1](unwrap_state_dict(ema, path))
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

"""Weights, bottom to top: tensor I/O (io), format adapters (formats), reading (checkpoint), fitting a
checkpoint to a model (load), writing (save), the released weights (catalogue) and their download (hub).

Imports point down this list only; nothing here builds a model (factory.py does, on top of this layer).
"""

from .catalogue import CATALOGUE, WEIGHTS, PretrainedCfgDict, Weights, list_pretrained
from .checkpoint import CONFIG_NAME, FORMATS, HF_BIN_NAME, WEIGHTS_NAME, Checkpoint, read_checkpoint
from .formats import HF_KEY_MAP, hf_to_torchcvt, torchcvt_to_hf
from .hub import download_weights, read_pretrained
from .load import checkpoint_variant, head_size, load_checkpoint, load_into
from .save import check_destination, export_checkpoint, save_checkpoint, save_hf, save_official

__all__ = [
    "CATALOGUE", "CONFIG_NAME", "FORMATS", "HF_BIN_NAME", "HF_KEY_MAP", "WEIGHTS", "WEIGHTS_NAME",
    "Checkpoint",
    "PretrainedCfgDict", "Weights", "check_destination", "checkpoint_variant", "download_weights",
    "export_checkpoint", "head_size", "hf_to_torchcvt", "list_pretrained", "load_checkpoint", "load_into",
    "read_checkpoint", "read_pretrained", "save_checkpoint", "save_hf", "save_official", "torchcvt_to_hf",
]

"""torchcvt: the Convolutional vision Transformer (CvT, Wu et al. 2021) in PyTorch."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .attention import attention_map
    from .checkpoints import convert_checkpoint, load_checkpoint, save_checkpoint
    from .config import VARIANTS, CvtConfig, get_variant, variant_config
    from .export import export_model
    from .factory import create_model, list_models
    from .flops import count_flops, count_params, model_info
    from .model import CvT, CvtFeatures
    from .predict import Predictor, predictor

__version__ = "0.1.0"

# Public names load on first use: `import torchcvt` (and so `python -m torchcvt`) does not import torch, so
# the command answers --help at once and turns a Ctrl-C during its start-up into one line.
_HOMES = {
    "attention": ("attention_map",),
    "checkpoints": ("convert_checkpoint", "load_checkpoint", "save_checkpoint"),
    "config": ("VARIANTS", "CvtConfig", "get_variant", "variant_config"),
    "export": ("export_model",),
    "factory": ("create_model", "list_models"),
    "flops": ("count_flops", "count_params", "model_info"),
    "model": ("CvT", "CvtFeatures"),
    "predict": ("Predictor", "predictor"),
}
_HOME = {name: module for module, names in _HOMES.items() for name in names}


def __getattr__(name: str) -> Any:
    if name not in _HOME:
        raise AttributeError(f"module 'torchcvt' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_HOME[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_HOME})


__all__ = [
    "VARIANTS",
    "CvT",
    "CvtConfig",
    "CvtFeatures",
    "Predictor",
    "attention_map",
    "convert_checkpoint",
    "count_flops",
    "count_params",
    "create_model",
    "export_model",
    "get_variant",
    "list_models",
    "load_checkpoint",
    "model_info",
    "predictor",
    "save_checkpoint",
    "variant_config",
]

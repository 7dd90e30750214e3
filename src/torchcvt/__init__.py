"""torchcvt: the Convolutional vision Transformer (CvT, Wu et al. 2021) in PyTorch."""

from .attention import attention_map
from .checkpoints import convert_checkpoint, load_checkpoint, save_checkpoint
from .config import VARIANTS, CvtConfig, get_variant, variant_config
from .export import export_model
from .factory import create_model, list_models
from .flops import count_flops, count_params, model_info
from .fused import fused_linear_enabled, set_fused_linear
from .model import CvT, CvtFeatures
from .predict import Predictor, predictor

__version__ = "0.1.0"

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
    "fused_linear_enabled",
    "get_variant",
    "list_models",
    "load_checkpoint",
    "model_info",
    "predictor",
    "save_checkpoint",
    "set_fused_linear",
    "variant_config",
]

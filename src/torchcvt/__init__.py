"""torchcvt: the Convolutional vision Transformer (CvT, Wu et al. 2021) in PyTorch."""

from .config import VARIANTS, CvtConfig, get_variant, variant_config
from .factory import create_model, list_models
from .model import CvT, CvtFeatures

__version__ = "0.1.0"

__all__ = [
    "VARIANTS",
    "CvT",
    "CvtConfig",
    "CvtFeatures",
    "create_model",
    "get_variant",
    "list_models",
    "variant_config",
]

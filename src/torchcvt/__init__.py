"""torchcvt: the Convolutional vision Transformer (CvT, Wu et al. 2021) in PyTorch.

Importing it registers every variant with timm, so `timm.create_model("cvt_13")` works afterwards, and
changes nothing else: no signal handler, no logging set-up, no optional dependency, nothing of the command.
"""

from . import engine
from .attention_maps import attention_map
from .config import VARIANTS, CvtConfig, get_variant, variant_config
from .export import export_model
from .factory import convert_checkpoint, create_model, list_models
from .flops import count_flops, count_params, model_info
from .fused import fused_linear_enabled, set_fused_linear
from .inference import InferenceCvT, optimize_for_inference
from .model import CvT, CvtFeatures
from .predict import Predictor, predictor
from .version import __version__ as __version__
from .weightcache import clear_weight_cache, set_weight_cache
from .weights import load_checkpoint, save_checkpoint

__all__ = [
    "VARIANTS",
    "CvT",
    "CvtConfig",
    "CvtFeatures",
    "InferenceCvT",
    "Predictor",
    "attention_map",
    "clear_weight_cache",
    "convert_checkpoint",
    "count_flops",
    "count_params",
    "create_model",
    "engine",
    "export_model",
    "fused_linear_enabled",
    "get_variant",
    "list_models",
    "load_checkpoint",
    "model_info",
    "optimize_for_inference",
    "predictor",
    "save_checkpoint",
    "set_fused_linear",
    "set_weight_cache",
    "variant_config",
]

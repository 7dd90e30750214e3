"""torchcvt: the Convolutional vision Transformer (CvT, Wu et al. 2021) in PyTorch.

Importing it registers every variant with timm, so `timm.create_model("cvt_13")` works afterwards.
"""

import os
import sys
from contextlib import nullcontext

from .cli import hold_interrupt

# The torchcvt command (its script, or `python -m torchcvt`, during whose package import argv[0] is "-m"):
# a Ctrl-C while torch loads is held until the import ends, then reported as one line, not a traceback.
_COMMAND = bool(sys.argv) and (sys.argv[0] == "-m" or os.path.basename(sys.argv[0]) == "torchcvt")

try:
    with hold_interrupt() if _COMMAND else nullcontext():
        from .attention_maps import attention_map
        from .config import VARIANTS, CvtConfig, get_variant, variant_config
        from .export import export_model
        from .factory import convert_checkpoint, create_model, list_models
        from .flops import count_flops, count_params, model_info
        from .fused import fused_linear_enabled, set_fused_linear
        from .inference import InferenceCvT, optimize_for_inference
        from .model import CvT, CvtFeatures
        from .predict import Predictor, predictor
        from .weightcache import clear_weight_cache, set_weight_cache
        from .weights import load_checkpoint, save_checkpoint
except KeyboardInterrupt:
    if not _COMMAND:
        raise
    print(f"torchcvt {sys.argv[1] if len(sys.argv) > 1 else ''}".rstrip() + ": interrupted", file=sys.stderr)
    raise SystemExit(130) from None

from .version import __version__ as __version__  # noqa: E402  (after the guarded imports above)

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

"""Model code shipped inside a transformers folder, so that transformers runs the model exactly with
trust_remote_code=True. Its CvT hard-codes exact GELU and LayerNorm's default epsilon; the code below is
its CvtForImageClassification with the activation and epsilon that config.json's torchcvt key records.
Written only when asked (`convert --to hf --remote-code`): running a folder's code is the user's choice."""

from __future__ import annotations

from typing import Any

MODELING_NAME = "modeling_torchcvt.py"
MODEL_CLASS = "TorchcvtCvtForImageClassification"

# A file of its own in the exported folder: it imports transformers and torch only, never torchcvt.
MODELING_SOURCE = f'''"""CvT as torchcvt trained it, for transformers' trust_remote_code=True (from torchcvt).

transformers' CvtForImageClassification with the activation and LayerNorm epsilon that config.json records
under its "torchcvt" key: QuickGELU (x * sigmoid(1.702 x)) where the official CvT code used it, where
transformers' own CvT always runs exact GELU.
"""

import torch
from torch import nn
from transformers import CvtForImageClassification
from transformers.models.cvt.modeling_cvt import CvtIntermediate


class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x): the activation the official CvT weights were trained with."""

    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


class {MODEL_CLASS}(CvtForImageClassification):
    """CvtForImageClassification with config.json's recorded activation and LayerNorm epsilon."""

    def __init__(self, config):
        super().__init__(config)
        recorded = (getattr(config, "torchcvt", None) or {{}}).get("config", {{}})
        if recorded.get("activation") == "quick_gelu":
            for module in self.modules():
                if isinstance(module, CvtIntermediate):
                    module.activation = QuickGELU()
        eps = recorded.get("layer_norm_eps")
        if eps is not None:
            for module in self.modules():
                if isinstance(module, nn.LayerNorm):
                    module.eps = eps
'''


def remote_code_config(config: dict[str, Any]) -> dict[str, Any]:
    """config.json's keys with the auto_map that sends trust_remote_code=True loads to MODELING_NAME."""
    target = f"{MODELING_NAME.removesuffix('.py')}.{MODEL_CLASS}"
    return {**config, "auto_map": {"AutoModelForImageClassification": target}}

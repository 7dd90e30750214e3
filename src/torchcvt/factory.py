"""Model builders, one per variant, registered with timm; create_model and list_models."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from timm.models import register_model

from .config import VARIANTS, get_variant, variant_config
from .model import CvT, CvtFeatures

if TYPE_CHECKING:
    from .checkpoints import Checkpoint

# timm reads default_cfgs from the module that registers a model.
default_cfgs = {
    name: {**variant.data_config(), "num_classes": 1000, "first_conv": "stage0.patch_embed.proj",
           "classifier": "head", "license": "mit", "paper_ids": "arXiv:2103.15808"}
    for name, variant in VARIANTS.items()
}

_TIMM_ONLY_KWARGS = ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir")


def list_models() -> list[str]:
    """Names of all registered CvT variants."""
    return sorted(VARIANTS)


def create_model(
    name: str,
    *,
    num_classes: int = 1000,
    checkpoint: str | Path | Checkpoint | None = None,
    features_only: bool = False,
    **overrides: Any,
) -> CvT | CvtFeatures:
    """Build a registered variant; any config field can be overridden, weights load from `checkpoint`."""
    variant = get_variant(name)
    # A backbone has no head, so a checkpoint's head of any size is simply left out.
    model = CvT(variant_config(name, num_classes=0 if features_only else num_classes, **overrides))
    model.pretrained_cfg = {**variant.data_config(), "architecture": name, "num_classes": model.num_classes}
    if checkpoint is not None:
        from .checkpoints import load_checkpoint

        load_checkpoint(model, checkpoint)
    return CvtFeatures(model) if features_only else model


def _build(name: str, pretrained: bool, kwargs: dict[str, Any]) -> CvT | CvtFeatures:
    if pretrained:
        raise ValueError(
            f"{name}: torchcvt downloads nothing; pass checkpoint=PATH with a local official, "
            "transformers or torchcvt checkpoint instead of pretrained=True"
        )
    for key in _TIMM_ONLY_KWARGS:
        kwargs.pop(key, None)
    return create_model(name, **kwargs)


@register_model
def cvt_13(pretrained: bool = False, **kwargs: Any) -> CvT:
    """CvT-13 at 224: 20.0M parameters, 4.5 GFLOPs, 81.6% ImageNet top-1."""
    return _build("cvt_13", pretrained, kwargs)


@register_model
def cvt_13_384(pretrained: bool = False, **kwargs: Any) -> CvT:
    """CvT-13 at 384: 20.0M parameters, 16.3 GFLOPs, 83.0% ImageNet top-1."""
    return _build("cvt_13_384", pretrained, kwargs)


@register_model
def cvt_21(pretrained: bool = False, **kwargs: Any) -> CvT:
    """CvT-21 at 224: 31.6M parameters, 7.1 GFLOPs, 82.5% ImageNet top-1."""
    return _build("cvt_21", pretrained, kwargs)


@register_model
def cvt_21_384(pretrained: bool = False, **kwargs: Any) -> CvT:
    """CvT-21 at 384: 31.6M parameters, 24.9 GFLOPs, 83.3% ImageNet top-1."""
    return _build("cvt_21_384", pretrained, kwargs)


@register_model
def cvt_w24(pretrained: bool = False, **kwargs: Any) -> CvT:
    """CvT-W24 at 384, ImageNet-22k pre-trained: 277.2M parameters, 193.2 GFLOPs, 87.7% top-1."""
    return _build("cvt_w24", pretrained, kwargs)


@register_model
def cvt_digits(pretrained: bool = False, **kwargs: Any) -> CvT:
    """A small three-stage CvT for 32x32 inputs: the model `torchcvt train` fits to the embedded digits."""
    return _build("cvt_digits", pretrained, kwargs)

"""Model builders, one per variant, registered with timm with their pretrained tags; create_model."""

from __future__ import annotations

import dataclasses
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from timm.models import (
    PretrainedCfg,
    adapt_input_conv,
    generate_default_cfgs,
    register_model,
    resolve_pretrained_cfg,
    split_model_name_tag,
)

from .config import VARIANTS, Variant, get_variant, variant_config
from .hub import LICENSE, ORIGIN_URL, PAPER, PAPER_ID, PRETRAINED_TAGS, download_weights, read_pretrained
from .model import CvT, CvtFeatures

if TYPE_CHECKING:
    from .checkpoints import Checkpoint

FIRST_CONV = "stage0.patch_embed.proj"


def _cfg(variant: Variant, **extra: Any) -> dict[str, Any]:
    return {**variant.data_config(), "num_classes": 1000, "first_conv": FIRST_CONV, "classifier": "head",
            "license": LICENSE, "paper_name": PAPER, "paper_ids": PAPER_ID, "origin_url": ORIGIN_URL, **extra}


# timm reads default_cfgs from the module that registers a model: one entry per tag, the first the default.
default_cfgs = generate_default_cfgs({
    **{
        tag.name: _cfg(
            VARIANTS[tag.architecture], hf_hub_id=tag.hf_hub_id,
            description=f"official weights ({tag.pretraining} pre-training, ImageNet-1k fine-tuning and "
            "head), trained with QuickGELU",
            notes=(f"ImageNet-1k top-1 {tag.top1}% (CvT paper, Table 2)",),
        )
        for tag in PRETRAINED_TAGS
    },
    **{name: _cfg(variant) for name, variant in VARIANTS.items()
       if not any(tag.architecture == name for tag in PRETRAINED_TAGS)},
})
TOP1 = {tag.name: tag.top1 for tag in PRETRAINED_TAGS}


def list_models(pretrained: bool = False) -> list[str]:
    """Names of all registered CvT variants; with pretrained=True the tagged names that have weights."""
    if pretrained:
        return sorted(TOP1)
    return sorted(VARIANTS)


def resolve_pretrained(
    name: str,
    pretrained_cfg: str | dict[str, Any] | PretrainedCfg | None = None,
    pretrained_cfg_overlay: dict[str, Any] | None = None,
) -> tuple[str, PretrainedCfg]:
    """The architecture of `name` ('cvt_13' or 'cvt_13.ms_in1k') and its timm pretrained_cfg."""
    architecture, tag = split_model_name_tag(name)
    get_variant(architecture)
    if isinstance(pretrained_cfg, str):
        tag, pretrained_cfg = pretrained_cfg, None
    if tag and pretrained_cfg is None and f"{architecture}.{tag}" not in TOP1:
        known = [n for n in TOP1 if n.startswith(f"{architecture}.")]
        raise ValueError(f"{architecture} has no pretrained tag {tag!r}; "
                         f"tags: {', '.join(known) if known else 'none (it has no released weights)'}")
    cfg = resolve_pretrained_cfg(architecture, pretrained_cfg or tag or None, pretrained_cfg_overlay)
    return architecture, cfg


def create_model(
    name: str,
    *,
    pretrained: bool = False,
    num_classes: int = 1000,
    checkpoint: str | Path | Checkpoint | None = None,
    features_only: bool = False,
    out_indices: int | tuple[int, ...] | None = None,
    in_chans: int | None = None,
    global_pool: str | None = None,
    drop_path_rate: float | list[float] | tuple[float, ...] | None = None,
    drop_rate: float | list[float] | tuple[float, ...] | None = None,
    pretrained_cfg: str | dict[str, Any] | PretrainedCfg | None = None,
    pretrained_cfg_overlay: dict[str, Any] | None = None,
    cache_dir: str | Path | None = None,
    **overrides: Any,
) -> CvT | CvtFeatures:
    """Build a variant ('cvt_13', or tagged 'cvt_13.ms_in1k'); any config field can be overridden.

    Weights: pretrained=True loads the tag's released weights from the Hugging Face Hub (or its
    pretrained_cfg 'file'), checkpoint= any local checkpoint. The other keywords are timm's: in_chans,
    global_pool, out_indices (with features_only), a scalar drop_path_rate (the last stage's rate, rising
    linearly over its blocks, as every official config sets it) and a scalar drop_rate (before the head).
    """
    architecture, cfg = resolve_pretrained(name, pretrained_cfg, pretrained_cfg_overlay)
    if pretrained and checkpoint is not None:
        raise ValueError(f"{name}: pass pretrained=True or checkpoint=PATH, not both")
    if pretrained and not cfg.has_weights:
        raise ValueError(f"{name} has no released weights; models with weights: {', '.join(TOP1)}")
    overrides.pop("dynamic_img_size", None)  # timm's flag: every CvT takes any input size already
    if in_chans is not None:
        overrides["num_channels"] = in_chans
    if isinstance(drop_path_rate, (int, float)):
        stages = len(variant_config(architecture, **overrides).embed_dim)
        drop_path_rate = (0.0,) * (stages - 1) + (float(drop_path_rate),)
    if drop_path_rate is not None:
        overrides["drop_path_rate"] = drop_path_rate
    if isinstance(drop_rate, (int, float)):
        overrides["head_drop_rate"] = float(drop_rate)
    elif drop_rate is not None:
        overrides["drop_rate"] = drop_rate
    # A backbone has no head, so a checkpoint's head of any size is simply left out.
    config = variant_config(architecture, num_classes=0 if features_only else num_classes, **overrides)
    model = CvT(config, global_pool=global_pool)
    model.pretrained_cfg = {**cfg.to_dict(), "architecture": architecture, "num_classes": model.num_classes,
                            "input_size": (config.num_channels, *cfg.input_size[1:])}
    if pretrained:
        checkpoint = _fit_pretrained(read_pretrained(cfg.file, cfg.hf_hub_id, cache_dir), model)
        if model.num_classes == 1000:
            model.pretrained_cfg["label_names"] = tuple(_imagenet_class_names())
    if checkpoint is not None:
        from .checkpoints import load_checkpoint

        load_checkpoint(model, checkpoint)
    if not features_only:
        return model
    features = CvtFeatures(model, out_indices)
    features.pretrained_cfg = model.pretrained_cfg
    return features


def pretrained_weights(name: str, cache_dir: str | Path | None = None) -> tuple[str, Path]:
    """The architecture of a tagged (or untagged) name and the local file of its released weights."""
    architecture, cfg = resolve_pretrained(name)
    if not cfg.has_weights:
        raise ValueError(f"{name} has no released weights; models with weights: {', '.join(TOP1)}")
    return architecture, Path(cfg.file) if cfg.file else download_weights(cfg.hf_hub_id, cache_dir)


def _fit_pretrained(checkpoint: Checkpoint, model: CvT) -> Checkpoint:
    """Released ImageNet weights made to fit timm's options: another in_chans, another head size."""
    state_dict = dict(checkpoint.state_dict)
    key = f"{FIRST_CONV}.weight"
    if key in state_dict and state_dict[key].shape[1] != model.config.num_channels:
        state_dict[key] = adapt_input_conv(model.config.num_channels, state_dict[key])
    if checkpoint.num_classes != model.num_classes:
        # A new head for fine-tuning, as timm gives it: the model's own freshly initialised one.
        state_dict = {k: v for k, v in state_dict.items() if not k.startswith("head.")}
        state_dict.update({k: v for k, v in model.state_dict().items() if k.startswith("head.")})
    return dataclasses.replace(checkpoint, state_dict=state_dict)


def _imagenet_class_names() -> list[str]:
    return resources.files("torchcvt").joinpath("imagenet_classes.txt").read_text().splitlines()


def _build(name: str, pretrained: bool, kwargs: dict[str, Any]) -> CvT | CvtFeatures:
    return create_model(name, pretrained=pretrained, **kwargs)


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

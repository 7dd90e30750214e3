"""The one builder: create_model makes every CvT (plain, tagged, pretrained, from any checkpoint), and the
registered builders timm finds. Weights come from the weights layer below; facts about them from its
catalogue."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

from timm.models import (
    PretrainedCfg,
    generate_default_cfgs,
    register_model,
    resolve_pretrained_cfg,
    split_model_name_tag,
)

from .config import ARCHITECTURE_FIELDS, VARIANTS, get_variant, variant_config
from .errors import TorchcvtError
from .model import CvT, CvtFeatures
from .weights import (
    WEIGHTS,
    Checkpoint,
    check_destination,
    checkpoint_variant,
    export_checkpoint,
    head_size,
    list_pretrained,
    load_into,
    read_checkpoint,
    read_pretrained,
)
from .weights.card import training_run
from .weights.catalogue import PretrainedCfgDict, builder_docstring, timm_default_cfgs
from .weights.checkpoint import FORMATS
from .weights.load import fit_config
from .weights.timm_files import accept_checkpoint_files

# timm reads default_cfgs from the module that registers a model: one entry per tag, the first the default.
default_cfgs = generate_default_cfgs(timm_default_cfgs())


def list_models(pretrained: bool = False) -> list[str]:
    """Names of all registered CvT variants; with pretrained=True the tagged names that have weights."""
    return list_pretrained() if pretrained else sorted(VARIANTS)


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
    if tag and pretrained_cfg is None and f"{architecture}.{tag}" not in WEIGHTS:
        known = [n for n in WEIGHTS if n.startswith(f"{architecture}.")]
        raise TorchcvtError(f"{architecture} has no pretrained tag {tag!r}; "
                         f"tags: {', '.join(known) if known else 'none (it has no released weights)'}")
    cfg = resolve_pretrained_cfg(architecture, pretrained_cfg or tag or None, pretrained_cfg_overlay)
    return architecture, cfg


def _released(architecture: str, cfg: PretrainedCfg, name: str, cache_dir: str | Path | None) -> Checkpoint:
    """A tag's weights, with what the catalogue knows of them: their class names and training activation."""
    if not cfg.has_weights:
        raise TorchcvtError(f"{name} has no released weights; models with weights: {', '.join(WEIGHTS)}")
    stored = read_pretrained(cfg.file, cfg.hf_hub_id, cache_dir)
    entry = WEIGHTS.get(f"{architecture}.{cfg.tag}")
    if entry is None:
        return stored
    return dataclasses.replace(stored, class_names=stored.class_names or entry.class_names(),
                               config={"activation": entry.activation, **(stored.config or {})})


def pretrained_checkpoint(name: str, cache_dir: str | Path | None = None) -> tuple[str, Checkpoint]:
    """The architecture of a tagged (or untagged) name and its released weights, read."""
    architecture, cfg = resolve_pretrained(name)
    return architecture, _released(architecture, cfg, name, cache_dir)


def pretrained_weights(name: str, cache_dir: str | Path | None = None) -> tuple[str, Path]:
    """The architecture of a tagged (or untagged) name and the local file of its released weights."""
    architecture, stored = pretrained_checkpoint(name, cache_dir)
    return architecture, stored.path


def _timm_keywords(architecture: str, overrides: dict[str, Any], in_chans: int | None,
                   drop_path_rate: Any, drop_rate: Any) -> dict[str, Any]:
    """timm's keywords as config fields."""
    overrides = dict(overrides)
    overrides.pop("dynamic_img_size", None)  # timm's flag: every CvT takes any input size already
    if in_chans is not None:
        overrides["num_channels"] = in_chans
    if isinstance(drop_path_rate, (int, float)):  # the last stage's rate, as every official config sets it
        stages = len(variant_config(architecture, **overrides).embed_dim)
        drop_path_rate = (0.0,) * (stages - 1) + (float(drop_path_rate),)
    if drop_path_rate is not None:
        overrides["drop_path_rate"] = drop_path_rate
    if isinstance(drop_rate, (int, float)):
        overrides["head_drop_rate"] = float(drop_rate)
    elif drop_rate is not None:
        overrides["drop_rate"] = drop_rate
    return overrides


def create_model(
    name: str | None,
    *,
    pretrained: bool = False,
    num_classes: int | None = None,
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
    use_ema: bool = False,
    **overrides: Any,
) -> CvT | CvtFeatures:
    """Build a variant ('cvt_13', or tagged 'cvt_13.ms_in1k'; None: the one the checkpoint records).

    Weights: pretrained=True loads the tag's released weights from the Hugging Face Hub (or its
    pretrained_cfg 'file'), checkpoint= any checkpoint; the architecture fields it records are used unless
    overridden. The head is the weights' (with their class names) unless num_classes asks for another
    (1000 without weights). The other keywords are timm's: in_chans, global_pool, out_indices (with
    features_only), a scalar drop_path_rate (the last stage's, rising linearly over its blocks, as every
    official config sets it) and a scalar drop_rate (before the head). Any config field can be overridden.
    use_ema (timm's name) loads the checkpoint's EMA weights (`torchcvt train` with train.ema) instead.
    """
    if pretrained and checkpoint is not None:
        raise TorchcvtError(f"{name}: pass pretrained=True or checkpoint=PATH, not both")
    stored = read_checkpoint(checkpoint) if isinstance(checkpoint, (str, Path)) else checkpoint
    if name is None:
        name = checkpoint_variant(stored) if stored is not None else None
        if name is None:
            why = f"{stored.path} does not say which variant it holds" if stored else "no model named"
            raise TorchcvtError(f"{why}: name it (one of {', '.join(sorted(VARIANTS))})")
    architecture, cfg = resolve_pretrained(name, pretrained_cfg, pretrained_cfg_overlay)
    if pretrained:
        stored = _released(architecture, cfg, name, cache_dir)
    if use_ema:
        if stored is None:
            raise TorchcvtError(
                f"{name}: use_ema=True selects a checkpoint's EMA weights: pass checkpoint=PATH too")
        stored = stored.ema_weights()
    overrides = _timm_keywords(architecture, overrides, in_chans, drop_path_rate, drop_rate)
    if stored is not None:
        overrides = fit_config(stored, architecture, overrides)
    head = head_size(stored, num_classes, features_only)
    config = variant_config(architecture, **overrides, num_classes=head)
    model = CvT(config, global_pool=global_pool)
    model.pretrained_cfg = PretrainedCfgDict(**{  # type: ignore[typeddict-item]  # timm's keys, typed here
        **cfg.to_dict(), "architecture": architecture, "num_classes": model.num_classes,
        "input_size": (config.num_channels, *cfg.input_size[1:]),
    })
    if stored is not None:
        load_into(model, stored)
    accept_checkpoint_files(model)  # timm.create_model(..., checkpoint_path=FILE) on any file torchcvt writes
    if not features_only:
        return model
    features = CvtFeatures(model, out_indices)
    features.pretrained_cfg = model.pretrained_cfg
    return features


def model_from_checkpoint(name: str | None, checkpoint: str | Path | Checkpoint, **kwargs: Any
                          ) -> CvT | CvtFeatures:
    """create_model(name, checkpoint=checkpoint, ...): the model a checkpoint holds (name optional)."""
    return create_model(name, checkpoint=checkpoint, **kwargs)


def convert_checkpoint(
    src: str | Path | Checkpoint,
    dst: str | Path,
    to: str,
    model_name: str | None = None,
    activation: str | None = None,
    overwrite: bool = False,
    config_overrides: dict[str, Any] | None = None,
    remote_code: bool = False,
) -> CvT:
    """Read src in any supported format and write it to dst in format `to`; returns the model in between.

    The model is built by create_model, as every loader builds it: the variant is model_name, else the
    one the checkpoint records; activation (default: the checkpoint's, else torchcvt's with a notice) and
    config_overrides set fields a source does not record (e.g. depth for an official .pth). dst must not be
    the source; an existing dst is replaced only with overwrite=True. remote_code (hf only) ships model
    code that transformers runs exactly with trust_remote_code=True (save_hf).
    """
    if to not in FORMATS:
        raise TorchcvtError(f"unknown checkpoint format {to!r}; choose one of {', '.join(FORMATS)}")
    check_destination(src.path if isinstance(src, Checkpoint) else src, dst, to, overwrite)
    stored = src if isinstance(src, Checkpoint) else read_checkpoint(src)
    name = model_name or checkpoint_variant(stored)
    if name is None:
        why = ("official checkpoints carry no config" if stored.format == "official"
               else "its config matches no registered variant")
        raise TorchcvtError(
            f"{stored.path} does not say which variant it holds ({why}): name it with --model "
            f"(one of {', '.join(sorted(VARIANTS))})"
        )
    # Fields that do not fix the architecture (drop rates, init, img_size) travel along too.
    kept = {key: value for key, value in (stored.config or {}).items()
            if key not in ARCHITECTURE_FIELDS and key != "num_classes"}
    overrides = {**kept, **(config_overrides or {})}
    if activation is not None:
        overrides["activation"] = activation
    model = create_model(name, checkpoint=stored, **overrides)
    export_checkpoint(model.eval(), dst, to, run=training_run(stored) if to == "hf" else None,
                      remote_code=remote_code)
    return model


def _register(name: str) -> Callable[..., CvT | CvtFeatures]:
    def build(pretrained: bool = False, **kwargs: Any) -> CvT | CvtFeatures:
        return create_model(name, pretrained=pretrained, **kwargs)

    build.__name__ = build.__qualname__ = name
    build.__doc__ = builder_docstring(name)
    return register_model(build)


# One registered builder per variant (timm.create_model("cvt_13") finds them); docstrings from the catalogue.
cvt_13 = _register("cvt_13")
cvt_13_384 = _register("cvt_13_384")
cvt_21 = _register("cvt_21")
cvt_21_384 = _register("cvt_21_384")
cvt_w24 = _register("cvt_w24")
cvt_digits = _register("cvt_digits")

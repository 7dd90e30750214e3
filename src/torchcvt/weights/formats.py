"""Format adapters as pure functions: official and transformers key layouts, transformers' config.json.

torchcvt's own key layout is the official one (stage0.patch_embed.proj.weight, ..., norm.weight,
head.weight). Each foreign layout has a filter that maps a state dict onto it; the reader picks the filter
by what the keys look like (timm's pretrained_filter_fn, passed in rather than hard-wired).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Sequence
from typing import Any

from PIL import Image

from ..config import CvtConfig
from ..errors import TorchcvtError, shown
from .io import StateDict

logger = logging.getLogger(__name__)

StateDictFilter = Callable[[StateDict], StateDict]

# Fields transformers' CvtConfig shares with ours that fix the architecture (the drop rates do not).
HF_ARCH_FIELDS = (
    "num_channels", "patch_sizes", "patch_stride", "patch_padding", "embed_dim", "num_heads", "depth",
    "mlp_ratio", "qkv_bias", "cls_token", "qkv_projection_method", "kernel_qkv", "padding_kv", "stride_kv",
    "padding_q", "stride_q",
)
HF_CONFIG_FIELDS = HF_ARCH_FIELDS + ("attention_drop_rate", "drop_rate", "drop_path_rate",
                                     "initializer_range")
# transformers builds every LayerNorm with PyTorch's default eps and ignores its config's layer_norm_eps.
HF_LAYER_NORM_EPS = 1e-5
# transformers' ConvNextImageProcessor (the one it maps model_type 'cvt' to) squashes at 384 and up and
# resizes-and-crops below; other cases take the processor that does what torchcvt's eval transform does.
HF_SQUASH_FROM = 384
# The key of config.json under which torchcvt records what transformers' config cannot say (the activation,
# layer_norm_eps, the variant): transformers keeps unknown keys, so the file still loads there.
TORCHCVT_KEY = "torchcvt"

_S = "cvt.encoder.stages.{s}."
_L = _S + "layers.{b}."
_A = _L + "attention.attention."
# (torchcvt / official key, transformers key): {s} is a stage, {b} a block, {p} a parameter or buffer name.
HF_KEY_MAP = (
    ("stage{s}.patch_embed.proj.{p}", _S + "embedding.convolution_embeddings.projection.{p}"),
    ("stage{s}.patch_embed.norm.{p}", _S + "embedding.convolution_embeddings.normalization.{p}"),
    ("stage{s}.cls_token", _S + "cls_token"),
    ("stage{s}.blocks.{b}.norm1.{p}", _L + "layernorm_before.{p}"),
    *(
        (f"stage{{s}}.blocks.{{b}}.attn.conv_proj_{short}.{ours}.{{p}}",
         _A + f"convolution_projection_{long}.convolution_projection.{theirs}.{{p}}")
        for short, long in (("q", "query"), ("k", "key"), ("v", "value"))
        for ours, theirs in (("conv", "convolution"), ("bn", "normalization"))
    ),
    ("stage{s}.blocks.{b}.attn.proj_q.{p}", _A + "projection_query.{p}"),
    ("stage{s}.blocks.{b}.attn.proj_k.{p}", _A + "projection_key.{p}"),
    ("stage{s}.blocks.{b}.attn.proj_v.{p}", _A + "projection_value.{p}"),
    ("stage{s}.blocks.{b}.attn.proj.{p}", _L + "attention.output.dense.{p}"),
    ("stage{s}.blocks.{b}.norm2.{p}", _L + "layernorm_after.{p}"),
    ("stage{s}.blocks.{b}.mlp.fc1.{p}", _L + "intermediate.dense.{p}"),
    ("stage{s}.blocks.{b}.mlp.fc2.{p}", _L + "output.dense.{p}"),
    ("norm.{p}", "layernorm.{p}"),
    ("head.{p}", "classifier.{p}"),
)
_PLACEHOLDER = {"s": r"\d+", "b": r"\d+", "p": r"\w+"}


def _template_regex(template: str) -> re.Pattern[str]:
    parts = re.split(r"\{([sbp])\}", template)
    return re.compile("".join(
        re.escape(part) if i % 2 == 0 else f"(?P<{part}>{_PLACEHOLDER[part]})" for i, part in enumerate(parts)
    ))


_TO_TORCHCVT = [(_template_regex(hf), ours) for ours, hf in HF_KEY_MAP]
_TO_HF = [(_template_regex(ours), hf) for ours, hf in HF_KEY_MAP]


def _rename(state_dict: StateDict, rules: list[tuple[re.Pattern[str], str]]) -> StateDict:
    renamed = {}
    for key, value in state_dict.items():
        for pattern, target in rules:
            match = pattern.fullmatch(key)
            if match:
                key = target.format(**match.groupdict())
                break
        renamed[key] = value
    return renamed


def hf_to_torchcvt(state_dict: StateDict) -> StateDict:
    """transformers' CvtForImageClassification (or headless CvtModel) keys as torchcvt's; others unchanged."""
    if any(key.startswith("encoder.stages.") for key in state_dict):  # CvtModel: no `cvt.` prefix, no head
        state_dict = {f"cvt.{key}": value for key, value in state_dict.items()}
    return _rename(state_dict, _TO_TORCHCVT)


def torchcvt_to_hf(state_dict: StateDict) -> StateDict:
    """torchcvt (official) keys as transformers' CvtForImageClassification keys."""
    return _rename(state_dict, _TO_HF)


def official_to_torchcvt(state_dict: StateDict) -> StateDict:
    """The official layout is torchcvt's: nothing to rename."""
    return state_dict


# Each layout torchcvt reads: how to recognise its keys, and the filter that maps it onto torchcvt's.
READ_FILTERS: dict[str, tuple[Callable[[str], bool], StateDictFilter]] = {
    "hf": (lambda key: key.startswith(("cvt.encoder.", "encoder.stages.")), hf_to_torchcvt),
    "official": (lambda key: key.startswith("stage0."), official_to_torchcvt),
}


def detect_layout(state_dict: StateDict) -> str | None:
    """'hf' or 'official' by what the keys look like; None when they are no CvT's."""
    return next((name for name, (match, _) in READ_FILTERS.items() if any(map(match, state_dict))), None)


def config_from_hf(meta: dict[str, Any], where: str
                   ) -> tuple[dict[str, Any], str | None, tuple[str, ...] | None]:
    """What a transformers config.json says: CvtConfig fields (validated), the variant and the class names.

    Fields come from transformers' own keys, overlaid by the full config torchcvt records under
    TORCHCVT_KEY when it wrote the file; a foreign file records no activation and no variant.
    """
    names = _id2label_names(meta.get("id2label", {}), where)
    fields = {name: meta[name] for name in HF_CONFIG_FIELDS if name in meta}
    if "id2label" in meta or "num_labels" in meta:
        fields["num_classes"] = len(meta["id2label"]) if "id2label" in meta else meta["num_labels"]
    ours = meta.get(TORCHCVT_KEY)
    architecture = None
    if isinstance(ours, dict):
        recorded = ours.get("config") or {}
        if not isinstance(recorded, dict):
            raise TorchcvtError(f"{where}: {TORCHCVT_KEY}.config must be a mapping of config fields, got "
                                f"{shown(recorded)}")
        fields.update(recorded)
        architecture = recorded_architecture(ours.get("architecture"), where, f"{TORCHCVT_KEY}.architecture")
    try:
        full = CvtConfig().replace(**fields).to_dict()
    except (TypeError, ValueError) as error:
        raise TorchcvtError(f"{where}: {error}") from None
    generic = names == [f"LABEL_{i}" for i in range(len(names))]
    return {name: full[name] for name in fields}, architecture, None if generic else tuple(names)


def _id2label_names(labels: Any, where: str) -> list[str]:
    """The class names of a transformers id2label, in index order: keys "0".."N-1", names strings."""
    expected = f"{where}: id2label must map each class index 0..N-1 to its name"
    if not isinstance(labels, dict):
        raise TorchcvtError(f"{expected}, got {shown(labels)}")
    try:
        indices = sorted(int(key) for key in labels)
    except ValueError:
        raise TorchcvtError(f"{expected}, got the keys {shown(list(labels))}") from None
    if indices != list(range(len(labels))):
        raise TorchcvtError(f"{expected}, got the keys {shown(list(labels))}")
    names = [labels[key] for key in sorted(labels, key=int)]
    return list(recorded_names(names, where, "id2label") or ())


def recorded_names(value: Any, where: str, key: str) -> tuple[str, ...] | None:
    """Class names a checkpoint records: a list of strings (None or empty: none), else a one-line error."""
    if value is None:
        return None
    if not isinstance(value, (list, tuple)) or not all(isinstance(name, str) for name in value):
        raise TorchcvtError(f"{where}: {key} must be a list of class names (strings), got {shown(value)}")
    return tuple(value) or None


def recorded_architecture(value: Any, where: str, key: str) -> str | None:
    """The variant name a checkpoint records: a string or none, else a one-line error."""
    if value is not None and not isinstance(value, str):
        raise TorchcvtError(f"{where}: {key} must be a variant name (a string), got {shown(value)}")
    return value or None


def hf_config_json(config: CvtConfig, class_names: Sequence[str] | None, architecture: str | None,
                   remote_code: bool) -> dict[str, Any]:
    """transformers' config.json for a model of this config; ValueError if transformers has no equivalent.

    Beside transformers' keys it records torchcvt's full config (activation, layer_norm_eps, ...) and the
    variant, so that torchcvt rebuilds exactly the model it wrote.
    """
    last = config.num_stages - 1
    problems = [f"stage {i}'s qkv_projection_method {method!r} (transformers only has 'dw_bn')"
                for i, method in enumerate(config.qkv_projection_method) if method != "dw_bn"]
    problems += [f"stage {i}'s position embedding" for i, on in enumerate(config.position_embedding) if on]
    problems += [f"stage {i}'s {kind!r} token embedding (transformers only has 'conv')"
                 for i, kind in enumerate(config.token_embedding) if kind != "conv"]
    problems += [f"stage {i}'s class token of width {width} (transformers sizes every class token by the "
                 f"last stage, {config.embed_dim[last]})"
                 for i, (on, width) in enumerate(zip(config.cls_token, config.embed_dim, strict=True))
                 if on and width != config.embed_dim[last]]
    if problems:
        raise TorchcvtError(f"transformers' CvT cannot represent {', '.join(problems)}")
    _warn_about_transformers(config, remote_code)
    names = list(class_names) if class_names else [f"LABEL_{i}" for i in range(config.num_classes)]
    values = config.to_dict()
    return {
        "architectures": ["CvtForImageClassification"],
        "model_type": "cvt",
        **{name: values[name] for name in HF_CONFIG_FIELDS},
        "num_labels": config.num_classes,
        "id2label": {str(i): name for i, name in enumerate(names)},
        "label2id": {name: i for i, name in enumerate(names)},
        TORCHCVT_KEY: {"architecture": architecture, "config": values},
    }


def _warn_about_transformers(config: CvtConfig, remote_code: bool) -> None:
    """What transformers will do differently with these files (torchcvt itself reloads them exactly; with
    remote_code, so does transformers under trust_remote_code=True)."""
    if config.activation != "gelu" and not remote_code:
        logger.warning(
            f"the model uses activation={config.activation!r}, which transformers' CvT config cannot express "
            "(it always uses exact GELU): transformers' copy is an approximation, its outputs differ; "
            "--remote-code (remote_code=True) adds model code it runs exactly with trust_remote_code=True"
        )
    if config.layer_norm_eps != HF_LAYER_NORM_EPS and not remote_code:
        logger.warning(
            f"the model uses layer_norm_eps={config.layer_norm_eps} but transformers' CvT always uses "
            f"{HF_LAYER_NORM_EPS}: transformers' outputs will differ (torchcvt reloads it exactly)"
        )
    short = [i for i, depth in enumerate(config.depth) if depth <= i]
    if short:
        logger.warning(
            f"transformers' CvtStage fails to build when depth[i] <= i (stage {short[0]} has depth "
            f"{config.depth[short[0]]}): the files are correct but transformers cannot load them"
        )
    if not config.cls_token[config.num_stages - 1]:
        logger.warning(
            "transformers' CvtForImageClassification.forward fails without a class token in the last stage: "
            "the files are correct but transformers cannot run them"
        )


def hf_preprocessor_json(data_config: dict[str, Any]) -> dict[str, Any]:
    """transformers' preprocessor_config.json doing what torchcvt's eval transform does with data_config.

    crop_pct < 1: resize the shorter side to size / crop_pct and centre-crop (ConvNext below 384, Bit
    above, DeiT for a non-square size); crop_pct 1: squash to the size (ConvNext at 384 and up, else ViT).
    """
    _, height, width = data_config["input_size"]
    crop_pct = data_config.get("crop_pct", 0.875)
    interpolation = data_config.get("interpolation", "bicubic")
    try:
        resample = int(Image.Resampling[interpolation.upper()])
    except KeyError:
        raise TorchcvtError(f"interpolation {interpolation!r} has no PIL resampling filter") from None
    common = {"do_resize": True, "resample": resample, "do_rescale": True, "rescale_factor": 1 / 255,
              "do_normalize": True, "image_mean": list(data_config["mean"]),
              "image_std": list(data_config["std"])}
    square, squash = height == width, crop_pct >= 1.0
    if square and squash == (height >= HF_SQUASH_FROM):
        kind = {"image_processor_type": "ConvNextImageProcessor", "size": {"shortest_edge": height},
                "crop_pct": min(crop_pct, 1.0)}
    elif squash:
        kind = {"image_processor_type": "ViTImageProcessor", "size": {"height": height, "width": width}}
    elif square:
        kind = {"image_processor_type": "BitImageProcessor",
                "size": {"shortest_edge": int(height / crop_pct)},
                "do_center_crop": True, "crop_size": {"height": height, "width": width}}
    else:
        kind = {"image_processor_type": "DeiTImageProcessor",
                "size": {"height": int(height / crop_pct), "width": int(width / crop_pct)},
                "do_center_crop": True, "crop_size": {"height": height, "width": width}}
    return {**kind, **common}

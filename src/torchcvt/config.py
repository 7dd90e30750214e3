"""The CvT configuration and the table of registered variants."""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from .errors import TorchcvtError, shown
from .typed import from_mapping

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

ACTIVATIONS = ("quick_gelu", "gelu")
PROJECTION_METHODS = ("dw_bn", "avg", "linear")
TOKEN_EMBEDDINGS = ("conv", "patch")
INITS = ("trunc_normal", "xavier")

# Per-stage fields and the element type each must hold; names follow transformers' CvtConfig.
STAGE_FIELDS: dict[str, type] = {
    "patch_sizes": int,
    "patch_stride": int,
    "patch_padding": int,
    "embed_dim": int,
    "num_heads": int,
    "depth": int,
    "mlp_ratio": float,
    "attention_drop_rate": float,
    "drop_rate": float,
    "drop_path_rate": float,
    "qkv_bias": bool,
    "cls_token": bool,
    "qkv_projection_method": str,
    "kernel_qkv": int,
    "padding_kv": int,
    "stride_kv": int,
    "padding_q": int,
    "stride_q": int,
    "position_embedding": bool,
    "token_embedding": str,
}


# Upper bounds of the sizes a config gives, checked before any weight is allocated: far beyond any CvT
# (CvT-W24: widths up to 1024, 20 blocks in a stage). A model of more than MAX_PARAMETERS estimated
# weights is refused too, however its sizes combine.
MAX_STAGES = 8
STAGE_LIMITS = {"patch_sizes": 64, "patch_stride": 64, "patch_padding": 64, "embed_dim": 16384,
                "num_heads": 1024, "depth": 256, "kernel_qkv": 64, "padding_kv": 64, "stride_kv": 64,
                "padding_q": 64, "stride_q": 64}
LIMITS = {"num_channels": 1024, "num_classes": 1_000_000, "img_size": 16384}
MAX_PARAMETERS = 10**10


# The fields that fix a model's weights and function (the drop rates, init and head size do not): a
# checkpoint reloads, and a run resumes, only into a model with the same values of every one of them.
ARCHITECTURE_FIELDS = (
    "num_channels", "patch_sizes", "patch_stride", "patch_padding", "embed_dim", "num_heads", "depth",
    "mlp_ratio", "qkv_bias", "cls_token", "qkv_projection_method", "kernel_qkv", "padding_kv", "stride_kv",
    "padding_q", "stride_q", "position_embedding", "token_embedding", "activation", "layer_norm_eps",
)


def architecture_differences(
    saved: dict[str, Any], ours: dict[str, Any], fields: tuple[str, ...] = ARCHITECTURE_FIELDS
) -> list[tuple[str, Any, Any]]:
    """(field, saved value, our value) for each of fields that saved sets to another value.

    Tuples compare and show as lists, so a config read from JSON matches the dataclass it came from.
    """

    def plain(value: Any) -> Any:
        return list(value) if isinstance(value, tuple) else value

    return [(field, plain(saved[field]), plain(ours[field]))
            for field in fields if field in saved and plain(saved[field]) != plain(ours[field])]


@dataclass
class CvtConfig:
    """Every hyper-parameter of a CvT; per-stage fields are tuples with one entry per stage."""

    num_channels: int = 3
    num_classes: int = 1000
    patch_sizes: tuple[int, ...] = (7, 3, 3)
    patch_stride: tuple[int, ...] = (4, 2, 2)
    patch_padding: tuple[int, ...] = (2, 1, 1)
    embed_dim: tuple[int, ...] = (64, 192, 384)
    num_heads: tuple[int, ...] = (1, 3, 6)
    depth: tuple[int, ...] = (1, 2, 10)
    mlp_ratio: tuple[float, ...] = (4.0, 4.0, 4.0)
    attention_drop_rate: tuple[float, ...] = (0.0, 0.0, 0.0)
    drop_rate: tuple[float, ...] = (0.0, 0.0, 0.0)
    drop_path_rate: tuple[float, ...] = (0.0, 0.0, 0.1)
    qkv_bias: tuple[bool, ...] = (True, True, True)
    cls_token: tuple[bool, ...] = (False, False, True)
    qkv_projection_method: tuple[str, ...] = ("dw_bn", "dw_bn", "dw_bn")
    kernel_qkv: tuple[int, ...] = (3, 3, 3)
    padding_kv: tuple[int, ...] = (1, 1, 1)
    stride_kv: tuple[int, ...] = (2, 2, 2)
    padding_q: tuple[int, ...] = (1, 1, 1)
    stride_q: tuple[int, ...] = (1, 1, 1)
    # torchcvt's own knobs (the paper's ablations and implementation choices).
    position_embedding: tuple[bool, ...] = (False, False, False)
    token_embedding: tuple[str, ...] = ("conv", "conv", "conv")
    activation: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    init: str = "trunc_normal"
    initializer_range: float = 0.02
    img_size: int = 224
    head_drop_rate: float = 0.0

    def __post_init__(self) -> None:
        self.validate()

    @property
    def num_stages(self) -> int:
        return len(self.embed_dim)

    def validate(self) -> None:
        """Normalise lists to tuples and raise ValueError naming the first field that is wrong."""
        if not isinstance(self.embed_dim, (list, tuple)) or not self.embed_dim:
            raise TorchcvtError(
                f"embed_dim must be a non-empty list with one width per stage, got {shown(self.embed_dim)}"
            )
        stages = len(self.embed_dim)
        if stages > MAX_STAGES:
            raise TorchcvtError(f"embed_dim has {stages} stages; at most {MAX_STAGES} are supported")
        for name, kind in STAGE_FIELDS.items():
            value = getattr(self, name)
            if not isinstance(value, (list, tuple)):
                raise TorchcvtError(
                    f"{name} must be a list with one value per stage ({stages}), got {shown(value)}")
            if len(value) != stages:
                raise TorchcvtError(
                    f"{name} has {len(value)} values but the model has {stages} stages "
                    f"(len(embed_dim)): {shown(list(value))}"
                )
            converted = []
            for item in value:
                if kind is float and isinstance(item, (int, float)) and not isinstance(item, bool):
                    item = float(item)
                if not isinstance(item, kind) or (kind is int and isinstance(item, bool)):
                    raise TorchcvtError(f"{name} must hold {kind.__name__} values, got {shown(list(value))}")
                converted.append(item)
            setattr(self, name, tuple(converted))
        for name in (
            "patch_sizes",
            "patch_stride",
            "embed_dim",
            "num_heads",
            "kernel_qkv",
            "stride_kv",
            "stride_q",
        ):
            if any(v < 1 for v in getattr(self, name)):
                raise TorchcvtError(f"{name} must be positive, got {shown(list(getattr(self, name)))}")
        for name, limit in STAGE_LIMITS.items():
            if any(v > limit for v in getattr(self, name)):
                raise TorchcvtError(f"{name} must be at most {limit} in each stage, got "
                                    f"{shown(list(getattr(self, name)))}")
        if any(v < 0 for v in self.depth):
            raise TorchcvtError(f"depth must not be negative, got {shown(list(self.depth))}")
        for name in ("patch_padding", "padding_kv", "padding_q"):
            if any(v < 0 for v in getattr(self, name)):
                raise TorchcvtError(f"{name} must not be negative, got {shown(list(getattr(self, name)))}")
        for name in ("attention_drop_rate", "drop_rate", "drop_path_rate"):
            if any(not 0.0 <= v < 1.0 for v in getattr(self, name)):
                raise TorchcvtError(f"{name} must lie in [0, 1), got {shown(list(getattr(self, name)))}")
        for i, (dim, ratio) in enumerate(zip(self.embed_dim, self.mlp_ratio, strict=True)):
            # The MLP's hidden width is int(embed_dim * mlp_ratio): it must be a finite width of at least 1.
            if not math.isfinite(ratio) or int(dim * ratio) < 1:
                raise TorchcvtError(
                    f"mlp_ratio[{i}] must be finite with embed_dim[{i}] * mlp_ratio[{i}] >= 1 "
                                 f"(the MLP's hidden width), got {shown(ratio)}")
        for i, (dim, heads) in enumerate(zip(self.embed_dim, self.num_heads, strict=True)):
            if dim % heads:
                raise TorchcvtError(f"embed_dim[{i}]={dim} is not divisible by num_heads[{i}]={heads}")
        _check_choice("qkv_projection_method", self.qkv_projection_method, PROJECTION_METHODS)
        for i, method in enumerate(self.qkv_projection_method):
            kernel, padding, stride = self.kernel_qkv[i], self.padding_q[i], self.stride_q[i]
            # Attention's output is added to its input, so the query map must keep the token grid.
            if method == "dw_bn" and (stride != 1 or kernel != 2 * padding + 1):
                raise TorchcvtError(
                    f"the query projection of stage {i + 1} must keep the token grid: stride_q[{i}]=1 and "
                    f"kernel_qkv[{i}] = 2 * padding_q[{i}] + 1, got kernel_qkv[{i}]={kernel}, "
                    f"padding_q[{i}]={padding}, stride_q[{i}]={stride}"
                )
        _check_choice("token_embedding", self.token_embedding, TOKEN_EMBEDDINGS)
        _check_choice("activation", (self.activation,), ACTIVATIONS)
        _check_choice("init", (self.init,), INITS)
        _check_float("layer_norm_eps", self.layer_norm_eps, "a finite float > 0", lambda v: v > 0)
        _check_float("initializer_range", self.initializer_range, "a finite float >= 0", lambda v: v >= 0)
        _check_float("head_drop_rate", self.head_drop_rate, "a float in [0, 1)", lambda v: 0 <= v < 1)
        self.layer_norm_eps = float(self.layer_norm_eps)
        self.initializer_range = float(self.initializer_range)
        self.head_drop_rate = float(self.head_drop_rate)
        for name in ("num_channels", "img_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise TorchcvtError(f"{name} must be a positive int, got {shown(value)}")
        for name, limit in LIMITS.items():
            value = getattr(self, name)
            if isinstance(value, int) and value > limit:
                raise TorchcvtError(f"{name} must be at most {limit}, got {shown(value)}")
        # Each block holds about (4 + 2 * mlp_ratio) * width**2 weights (attention and MLP).
        weights = sum(depth * (4 + 2 * ratio) * dim * dim
                      for dim, depth, ratio in zip(self.embed_dim, self.depth, self.mlp_ratio, strict=True))
        if weights > MAX_PARAMETERS:
            raise TorchcvtError(
                f"embed_dim {list(self.embed_dim)}, depth {list(self.depth)} and mlp_ratio "
                f"{list(self.mlp_ratio)} make about {weights / 1e9:.0f} billion weights; at most "
                f"{MAX_PARAMETERS / 1e9:.0f} billion are supported")
        if (
            not isinstance(self.num_classes, int)
            or isinstance(self.num_classes, bool)
            or self.num_classes < 0
        ):
            raise TorchcvtError(
                f"num_classes must be an int >= 0 (0 removes the head), got {shown(self.num_classes)}"
            )

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CvtConfig:
        """Build from a dict; an unknown key is an error naming the closest field."""
        return from_mapping(cls, data, noun="config field")

    def replace(self, **overrides: Any) -> CvtConfig:
        """A copy with some fields changed; unknown names are an error."""
        return CvtConfig.from_dict({**self.to_dict(), **overrides})


def _check_float(name: str, value: Any, wanted: str, valid: Callable[[float], bool]) -> None:
    # bool is an int to Python, and NaN compares false to everything, so both need their own test.
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not number or not math.isfinite(value) or not valid(value):
        raise TorchcvtError(f"{name} must be {wanted}, got {shown(value)}")


def _check_choice(name: str, values: tuple[str, ...], choices: tuple[str, ...]) -> None:
    for value in values:
        if value not in choices:
            raise TorchcvtError(f"{name} must be one of {list(choices)}, got {shown(value)}")


@dataclass(frozen=True)
class Variant:
    """A registered model: its config overrides and its data config (how its weights are evaluated)."""

    name: str
    config: dict[str, Any]
    input_size: tuple[int, int, int] = (3, 224, 224)
    crop_pct: float = 0.875
    crop_mode: str = "center"
    interpolation: str = "bicubic"
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    description: str = ""

    def data_config(self) -> dict[str, Any]:
        return {
            "input_size": self.input_size,
            "crop_pct": self.crop_pct,
            "crop_mode": self.crop_mode,
            "interpolation": self.interpolation,
            "mean": self.mean,
            "std": self.std,
        }


_CVT_21 = {"depth": (1, 4, 16)}
_CVT_W24 = {
    "embed_dim": (192, 768, 1024),
    "num_heads": (3, 12, 16),
    "depth": (2, 2, 20),
    "drop_path_rate": (0.0, 0.0, 0.3),
}
# The official 384 models are evaluated squashed to 384x384 (TEST.CENTER_CROP: False): timm's "squash".
_AT_384 = {"input_size": (3, 384, 384), "crop_pct": 1.0, "crop_mode": "squash"}
# CvT-13's stage geometry on 32-pixel inputs (8x8, 4x4 and 2x2 tokens), narrower and shallower;
# mean and std are those of the grey digit images.
DIGITS_SIZE = 32
DIGITS_MEAN = (0.3092, 0.3092, 0.3092)
DIGITS_STD = (0.3488, 0.3488, 0.3488)
_CVT_DIGITS = {
    "embed_dim": (32, 64, 128),
    "num_heads": (1, 2, 4),
    "depth": (1, 1, 2),
    "drop_path_rate": (0.0, 0.0, 0.0),
    "img_size": DIGITS_SIZE,
}

VARIANTS: dict[str, Variant] = {
    v.name: v
    for v in [
        Variant("cvt_13", {}, description="CvT-13 at 224"),
        Variant(
            "cvt_13_384",
            {"img_size": 384},
            **_AT_384,
            description="CvT-13 at 384",
        ),
        Variant(
            "cvt_21",
            _CVT_21,
            description="CvT-21 at 224",
        ),
        Variant(
            "cvt_21_384",
            {**_CVT_21, "img_size": 384},
            **_AT_384,
            description="CvT-21 at 384",
        ),
        Variant(
            "cvt_w24",
            {**_CVT_W24, "img_size": 384},
            **_AT_384,
            description="CvT-W24 at 384 (ImageNet-22k pre-training)",
        ),
        Variant(
            "cvt_digits",
            _CVT_DIGITS,
            input_size=(3, DIGITS_SIZE, DIGITS_SIZE),
            crop_pct=1.0,
            mean=DIGITS_MEAN,
            std=DIGITS_STD,
            description="small CvT for the embedded 8x8 digits, upsampled to 32x32 (train's default)",
        ),
    ]
}


def model_data_config(img_size: int, pretrained_cfg: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The eval preprocessing of a model: its pretrained_cfg's, else ImageNet defaults at its img_size."""
    config = {"input_size": (3, img_size, img_size), "crop_pct": 0.875 if img_size <= 224 else 1.0,
              "interpolation": "bicubic", "mean": IMAGENET_MEAN, "std": IMAGENET_STD}
    pretrained = pretrained_cfg or {}
    return {**config, **{key: pretrained[key] for key in config if key in pretrained}}


def get_variant(name: str) -> Variant:
    """The registered variant called name, or a ValueError listing those that exist."""
    if name not in VARIANTS:
        raise TorchcvtError(f"unknown model {shown(name)}; available: {', '.join(sorted(VARIANTS))}")
    return VARIANTS[name]


def variant_config(name: str, **overrides: Any) -> CvtConfig:
    """The config of a registered variant with overrides applied."""
    return CvtConfig().replace(**{**get_variant(name).config, **overrides})

"""The released weights, each described once: where they live, how to feed them, what they score.

Everything else that quotes these facts is generated from here: timm's pretrained_cfg (default_cfgs), the
registered builders' docstrings, `torchcvt info`, and the tables in README.md and docs/pretrained.md
(tools/update_docs.py, outside the package, rewrites them; a test fails when they disagree).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any, TypedDict

from ..config import VARIANTS, get_variant
from .checkpoint import HF_BIN_NAME, WEIGHTS_NAME

PAPER = "CvT: Introducing Convolutions to Vision Transformers"
PAPER_ID = "arXiv:2103.15808"
ORIGIN_URL = "https://github.com/microsoft/CvT"
# The Hub repositories microsoft/cvt-* (the files torchcvt downloads) declare Apache-2.0; the official
# repository, whose code and original .pth release they mirror, is MIT.
HUB_LICENSE = "apache-2.0"
OFFICIAL_LICENSE = "mit"
IMAGENET_1K = "imagenet-1k"


class PretrainedCfgDict(TypedDict, total=False):
    """model.pretrained_cfg: timm's PretrainedCfg as a dict, plus what torchcvt adds (architecture, names)."""

    architecture: str
    tag: str | None
    hf_hub_id: str | None
    file: str | None
    input_size: tuple[int, int, int]
    crop_pct: float
    crop_mode: str
    interpolation: str
    mean: tuple[float, ...]
    std: tuple[float, ...]
    num_classes: int
    label_names: tuple[str, ...]
    first_conv: str
    classifier: str
    license: str
    description: str
    notes: tuple[str, ...]
    origin_url: str
    paper_name: str
    paper_ids: str


@dataclass(frozen=True)
class Weights:
    """One released checkpoint of the paper (torchvision's WeightsEnum entry, timm's tag)."""

    architecture: str
    tag: str
    hf_hub_id: str
    pretraining: str
    top1: float  # ImageNet-1k val top-1 as the paper's Table 3 reports it
    params_m: float  # counted (count_params, 1000 classes), millions, one decimal
    gflops: float  # the paper's, at the weights' input size (torchcvt's count agrees within 2%)
    paper_params_m: float  # the paper's rounded figure
    # The official repository's README figure where it differs from the paper's (microsoft/CvT README.md).
    readme_top1: float | None = None
    files: tuple[str, ...] = (WEIGHTS_NAME, HF_BIN_NAME)
    classes: str = IMAGENET_1K
    activation: str = "quick_gelu"  # what the official code trained them with
    license: str = HUB_LICENSE

    @property
    def name(self) -> str:
        return f"{self.architecture}.{self.tag}"

    @property
    def resolution(self) -> int:
        return self.data_config()["input_size"][1]

    def data_config(self) -> dict[str, Any]:
        """How the official code evaluates them: written once, in the variant they were released for."""
        return get_variant(self.architecture).data_config()

    def class_names(self) -> tuple[str, ...]:
        return class_names(self.classes)

    def top1_text(self) -> str:
        """The paper's top-1, and the official README's beside it where the two differ."""
        readme = f" (official README: {self.readme_top1})" if self.readme_top1 is not None else ""
        return f"{self.top1}{readme}"

    def description(self) -> str:
        head = "ImageNet-1k" if self.pretraining == _IN1K else f"{self.pretraining} pre-training, ImageNet-1k"
        return f"official weights ({head} fine-tuning and head), trained with {_ACTIVATION[self.activation]}"


_ACTIVATION = {"quick_gelu": "QuickGELU", "gelu": "exact GELU"}
_IN1K, _IN22K = "ImageNet-1k", "ImageNet-22k"

# The first entry of an architecture is its default: the weights an untagged name with pretrained=True loads.
CATALOGUE: tuple[Weights, ...] = (
    Weights("cvt_13", "ms_in1k", "microsoft/cvt-13", _IN1K, 81.6, 20.0, 4.5, 20),
    Weights("cvt_13_384", "ms_in22k_ft_in1k", "microsoft/cvt-13-384-22k", _IN22K, 83.3, 20.0, 16.3, 20),
    Weights("cvt_13_384", "ms_in1k", "microsoft/cvt-13-384", _IN1K, 83.0, 20.0, 16.3, 20),
    Weights("cvt_21", "ms_in1k", "microsoft/cvt-21", _IN1K, 82.5, 31.6, 7.1, 32),
    Weights("cvt_21_384", "ms_in22k_ft_in1k", "microsoft/cvt-21-384-22k", _IN22K, 84.9, 31.6, 24.9, 32),
    Weights("cvt_21_384", "ms_in1k", "microsoft/cvt-21-384", _IN1K, 83.3, 31.6, 24.9, 32),
    Weights("cvt_w24", "ms_in22k_ft_in1k", "microsoft/cvt-w24-384-22k", _IN22K, 87.7, 277.2, 193.2, 277,
            readme_top1=87.6),
)
WEIGHTS: dict[str, Weights] = {weights.name: weights for weights in CATALOGUE}


def list_pretrained() -> list[str]:
    """Every tagged name with released weights, e.g. 'cvt_13.ms_in1k', sorted."""
    return sorted(WEIGHTS)


def weights_of(architecture: str) -> list[Weights]:
    """The released weights of a variant, its default first."""
    return [weights for weights in CATALOGUE if weights.architecture == architecture]


@cache
def class_names(classes: str) -> tuple[str, ...]:
    """The class names of a label set ('imagenet-1k': the first WordNet lemma of each synset, index order)."""
    if classes != IMAGENET_1K:
        raise ValueError(f"unknown label set {classes!r}")  # the catalogue names only known sets
    return tuple(resources.files("torchcvt").joinpath("imagenet_classes.txt").read_text().splitlines())


def timm_cfg(architecture: str, weights: Weights | None = None) -> dict[str, Any]:
    """timm's pretrained_cfg entry of a variant, with its weights when it has some."""
    cfg: dict[str, Any] = {
        **get_variant(architecture).data_config(), "num_classes": 1000,
        "first_conv": "stage0.patch_embed.proj", "classifier": "head", "paper_name": PAPER,
        "paper_ids": PAPER_ID, "origin_url": ORIGIN_URL,
    }
    if weights is not None:
        cfg.update(hf_hub_id=weights.hf_hub_id, license=weights.license, description=weights.description(),
                   notes=_notes(weights))
    return cfg


def _notes(weights: Weights) -> tuple[str, ...]:
    notes = (f"ImageNet-1k top-1 {weights.top1}% (CvT paper, Table 3)",)
    if weights.readme_top1 is not None:
        notes += (f"ImageNet-1k top-1 {weights.readme_top1}% (official repository's README)",)
    return notes


def timm_default_cfgs() -> dict[str, dict[str, Any]]:
    """Every tagged name and every weightless variant with its timm cfg (the defaults first)."""
    tagged = {weights.name: timm_cfg(weights.architecture, weights) for weights in CATALOGUE}
    plain = {name: timm_cfg(name) for name in VARIANTS if not weights_of(name)}
    return {**tagged, **plain}


def _weights_text(weights: Weights, default: bool) -> str:
    extra = f"{weights.pretraining} pre-training, " if weights.pretraining != _IN1K else ""
    readme = f", {weights.readme_top1}% in the official README" if weights.readme_top1 is not None else ""
    first = "default; " if default else ""
    return f"{weights.name} ({first}{extra}{weights.top1}% ImageNet-1k top-1{readme})"


def builder_docstring(architecture: str) -> str:
    """The docstring of a registered builder: its size and cost, and each of its weights with its top-1."""
    variant = get_variant(architecture)
    released = weights_of(architecture)
    if not released:
        return f"{variant.description[0].upper()}{variant.description[1:]}; no released weights."
    first = released[0]
    several = len(released) > 1
    listed = ", ".join(_weights_text(weights, i == 0 and several) for i, weights in enumerate(released))
    return (f"{variant.description}: {first.params_m}M parameters, {first.gflops} GFLOPs.\n\n"
            f"Weights: {listed}.")


def info_weights(architecture: str) -> list[dict[str, Any]]:
    """What `torchcvt info` says about a variant's weights."""
    return [{"name": weights.name, "pretraining": weights.pretraining, "top1": weights.top1,
             "hf_hub_id": weights.hf_hub_id, "license": weights.license, "default": i == 0}
            for i, weights in enumerate(weights_of(architecture))]


def paper_figures(architecture: str) -> dict[str, Any]:
    """The paper's parameter and GFLOP figures of a variant with weights (empty for the others)."""
    released = weights_of(architecture)
    if not released:
        return {}
    return {"params_m": released[0].paper_params_m, "gflops": released[0].gflops}

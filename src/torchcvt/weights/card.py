"""The model card written beside a transformers export: README.md with the Hugging Face Hub's metadata
header, saying what the weights are, how they were trained and measured, and how to load them."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from ..config import CvtConfig
from ..data import data_name
from ..hf_notes import APPROXIMATION
from ..runrecord import LAST_NAME, SUMMARY_NAME, RunSummary
from .checkpoint import Checkpoint
from .remote_code import MODELING_NAME

logger = logging.getLogger(__name__)

_ACTIVATION = {"gelu": "exact GELU", "quick_gelu": "QuickGELU (x * sigmoid(1.702 x))"}


@dataclass(frozen=True)
class TrainingRun:
    """What a card says of the run that made the weights: its data, its validation metrics (fractions),
    and the summary they were read from."""

    dataset: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    epochs: int | None = None
    summary: Path | None = None


def training_run(checkpoint: Checkpoint) -> TrainingRun | None:
    """The run a `torchcvt train` checkpoint comes from: summary.json beside it (when it names this file:
    best.pth gets the best metrics, last.pth the final ones, its EMA weights the EMA's final ones) and the
    training data its config names."""
    dataset = _dataset_name(checkpoint.train_config)
    folder = checkpoint.path if checkpoint.path.is_dir() else checkpoint.path.parent
    summary_path = folder / SUMMARY_NAME
    metrics, epochs, source = {}, None, None
    if summary_path.is_file():
        try:
            summary = RunSummary.read(summary_path)
        except (OSError, ValueError) as error:
            logger.warning("%s is unreadable, the model card has no metrics: %s", summary_path, error)
            summary = None
        metrics = {} if summary is None else _scores(summary, checkpoint)
        if metrics:
            epochs, source = summary.epochs, summary_path
    if dataset is None and not metrics:
        return None
    return TrainingRun(dataset, metrics, epochs, source)


def _scores(summary: RunSummary, checkpoint: Checkpoint) -> dict[str, float]:
    """The validation scores summary gives for the weights of checkpoint ({} when it gives none)."""
    name = checkpoint.path.name
    if checkpoint.is_ema:
        scores = (summary.ema_final_val_top1, summary.ema_final_val_top5) if name == LAST_NAME else (None,)
    elif name == Path(summary.checkpoint).name:
        scores = (summary.best_val_top1, summary.best_val_top5)
    elif name == Path(summary.last_checkpoint).name:
        scores = (summary.final_val_top1, summary.final_val_top5)
    else:
        return {}
    return {key: float(value) for key, value in zip(("top1", "top5"), scores, strict=False)
            if value is not None}


def _dataset_name(train_config: dict[str, Any] | None) -> str | None:
    """The training data's name (data_name) as the run's config records it."""
    if not train_config:
        return None
    return data_name((train_config.get("data") or {}).get("train"))


def model_card(
    config: CvtConfig,
    architecture: str | None,
    class_names: Sequence[str],
    preprocessor: dict[str, Any],
    run: TrainingRun | None = None,
    remote_code: bool = False,
) -> str:
    """README.md for a transformers folder: Hub metadata (library, tags, datasets, metrics), then prose;
    remote_code: the folder ships model code for trust_remote_code=True (remote_code.py)."""
    name = architecture or "cvt"
    lines = ["---", "library_name: transformers", "pipeline_tag: image-classification", "tags:"]
    lines += [f"- {tag}" for tag in ("image-classification", "vision", "cvt", "torchcvt")]
    if run and run.dataset:
        lines += ["datasets:", f"- {_yaml(run.dataset)}"]
    if run and run.metrics:
        lines += ["metrics:", "- accuracy", "model-index:", f"- name: {_yaml(name)}", "  results:",
                  "  - task:", "      type: image-classification", "      name: Image Classification",
                  "    dataset:", f"      type: {_yaml(run.dataset or 'imagefolder')}",
                  f"      name: {_yaml(run.dataset or 'image folder')}", "      split: validation",
                  "    metrics:"]
        for metric, value in run.metrics.items():
            label = {"top1": "Top-1 accuracy", "top5": "Top-5 accuracy"}[metric]
            lines += ["    - type: accuracy", f"      value: {value:.4f}", f"      name: {label}"]
    lines += ["---", "", f"# {name}", ""]
    lines += _prose(config, name, class_names, preprocessor, run, remote_code)
    return "\n".join(lines) + "\n"


def _prose(config: CvtConfig, name: str, class_names: Sequence[str], preprocessor: dict[str, Any],
           run: TrainingRun | None, remote_code: bool) -> list[str]:
    shown = ", ".join(f"`{label}`" for label in class_names[:10])
    more = f" and {len(class_names) - 10} more" if len(class_names) > 10 else ""
    activation = _ACTIVATION.get(config.activation, config.activation)
    lines = [
        f"A CvT (Convolutional vision Transformer, Wu et al. 2021, arXiv 2103.15808) image classifier, "
        f"architecture `{name}`, exported by torchcvt for transformers' "
        f"`CvtForImageClassification`. {len(class_names)} classes: {shown}{more}.",
        "",
        f"- Activation: {activation}.",
        f"- Input: {_describe(preprocessor)}",
    ]
    exact = config.activation == "gelu"
    if not exact and remote_code:
        lines.append(f"- **Exact in transformers only with `trust_remote_code=True`**: this folder ships "
                     f"`{MODELING_NAME}`, transformers' CvT with the {activation} these weights were trained "
                     "with. Without it transformers' CvT runs exact GELU: " + APPROXIMATION)
    elif not exact:
        lines.append(f"- **transformers' copy is an approximation**: transformers' CvT always runs "
                     f"exact GELU, where these weights were trained with {activation}; " + APPROXIMATION)
    if run and run.metrics:
        scores = ", ".join(f"{'top-1' if key == 'top1' else 'top-5'} {100 * value:.2f}%"
                           for key, value in run.metrics.items())
        epochs = f" after {run.epochs} epochs" if run.epochs else ""
        lines.append(f"- Validation{f' on {run.dataset}' if run.dataset else ''}{epochs}: {scores} "
                     f"(from `{run.summary.name if run.summary else SUMMARY_NAME}` of the training run).")
    lines += [
        "",
        "## Use with transformers",
        "",
        "```python",
        "from transformers import pipeline",
        "",
        'classify = pipeline("image-classification", model="THIS_FOLDER_OR_HUB_ID"'
        + (", trust_remote_code=True)" if remote_code and not exact else ")"),
        'print(classify("image.jpg"))',
        "```",
        "",
        "`AutoImageProcessor` reads `preprocessor_config.json`. With `backend=\"pil\"` it reproduces "
        "torchcvt's preprocessing exactly; its default torchvision backend resamples slightly differently. "
        "For some aspect ratios transformers centre-crops one pixel away from torchvision "
        "(it floors the crop offset where torchvision rounds it).",
        "",
        "## Use with torchcvt",
        "",
        "```python",
        "import torchcvt",
        "",
        "# None: the variant, classes and activation this folder records",
        'model = torchcvt.create_model(None, checkpoint="THIS_FOLDER")',
        'predictor = torchcvt.predictor(None, checkpoint="THIS_FOLDER")',
        'print(predictor("image.jpg"))',
        "```",
        "",
        "or `torchcvt predict --checkpoint THIS_FOLDER image.jpg`.",
    ]
    return lines


def _describe(preprocessor: dict[str, Any]) -> str:
    size = preprocessor["size"]
    crop = preprocessor.get("crop_size")
    if "shortest_edge" in size and preprocessor.get("crop_pct", 1.0) < 1.0:
        edge = size["shortest_edge"]
        resized = int(edge / preprocessor["crop_pct"])
        resize = f"shorter side resized to {resized}, centre-cropped to {edge}x{edge}"
    elif crop:
        side = size.get("shortest_edge")
        to = f"shorter side resized to {side}" if side else f"resized to {size['height']}x{size['width']}"
        resize = f"{to}, centre-cropped to {crop['height']}x{crop['width']}"
    else:
        edge = size.get("shortest_edge")
        resize = f"squashed to {edge}x{edge}" if edge else f"squashed to {size['height']}x{size['width']}"
    resample = Image.Resampling(preprocessor["resample"]).name.lower()
    return (f"{resize} ({resample}), scaled to [0, 1], normalised with mean "
            f"{_numbers(preprocessor['image_mean'])} and std {_numbers(preprocessor['image_std'])}.")


def _numbers(values: Sequence[float]) -> str:
    return "(" + ", ".join(f"{value:g}" for value in values) + ")"


def _yaml(text: str) -> str:
    """A YAML scalar: JSON's quoting is valid YAML."""
    return json.dumps(str(text))

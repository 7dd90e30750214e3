"""The recipe `torchcvt train --data DIR` picks when no --config is given, chosen from the job by a rule
simple enough to state in one line: fine-tune when starting weights are given, else train from scratch
with a model, length, batch and augmentation sized by the number of training images and their size.

The recipes are data (config sections, as a YAML file holds them); choose_recipe only picks and sizes.
"""

from __future__ import annotations

import copy
import statistics
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..data import class_images, is_folder_tree, list_classes, open_image
from ..errors import TorchcvtError
from .train_config import TrainConfig

# Augmentation by strength: light for a few thousand images (and for fine-tuning), the paper's for many.
AUGMENTATION: dict[str, dict[str, Any]] = {
    "light": {
        "scale": [0.5, 1.0], "color_jitter": None, "auto_augment": None, "re_prob": 0.0,
        "mixup": 0.0, "cutmix": 0.0, "label_smoothing": 0.1,
    },
    "medium": {
        "scale": [0.25, 1.0], "color_jitter": 0.4, "auto_augment": "rand-m7-mstd0.5-inc1", "re_prob": 0.1,
        "mixup": 0.2, "cutmix": 0.0, "label_smoothing": 0.1,
    },
    "strong": {
        "scale": [0.08, 1.0], "color_jitter": 0.4, "auto_augment": "rand-m9-mstd0.5-inc1", "re_prob": 0.25,
        "mixup": 0.8, "cutmix": 1.0, "label_smoothing": 0.1,
    },
}


@dataclass(frozen=True)
class SizeBand:
    """Data up to most_images training images (None: any number): how long, how wide and how augmented."""

    most_images: int | None
    name: str
    scratch_epochs: int
    finetune_epochs: int
    batch_size: int
    augmentation: str


SIZE_BANDS = (
    SizeBand(2_000, "small", 100, 30, 32, "light"),
    SizeBand(20_000, "medium", 60, 15, 64, "medium"),
    SizeBand(None, "large", 40, 8, 128, "strong"),
)

# From scratch, the model follows the images' shorter side: the 32-pixel cvt_digits up to 64 pixels,
# CvT-13 at 224 above. Learning rates per 256 images (AdamW), scaled to the batch.
SCRATCH_MODELS = ((64, "cvt_digits", 1e-2), (None, "cvt_13", 5e-4))

# Fine-tuning released (or your own) weights on a user's folder: a default for small folders, not the
# paper's transfer protocol (that is configs/transfer-*.yaml and `torchcvt transfer`). It borrows the
# optimiser (plain SGD with momentum 0.9, no weight decay, gradient clipping at 1, cosine decay with
# warm-up) at one machine's batch, counted in epochs of the user's data, with light augmentation and label
# smoothing. LR 0.003: the middle of ViT's sweep.
FINETUNE_RECIPE: dict[str, Any] = {
    "model": {"head": "auto"},
    "aug": {"hflip": 0.5},
    "optim": {"opt": "sgd", "momentum": 0.9, "lr": 0.003, "weight_decay": 0.0, "clip_grad": 1.0},
    "sched": {"interval": "step", "warmup_epochs": 1, "warmup_lr": 0.0, "min_lr": 0.0, "cooldown_epochs": 0},
}

SCRATCH_RECIPE: dict[str, Any] = {
    "aug": {"hflip": 0.5},
    "optim": {"opt": "adamw", "weight_decay": 0.05, "base_batch_size": 256, "clip_grad": None},
    "sched": {"interval": "step", "warmup_lr": 1e-6, "min_lr": 1e-5, "cooldown_epochs": 0},
}

# Images opened (headers only) to measure the data's image size.
SIZE_SAMPLE = 32


@dataclass(frozen=True)
class Recipe:
    """A chosen recipe: its name, its config sections, the starting weights that chose it (None: from
    scratch), its augmentation strength and the data it was sized for, in words."""

    name: str
    values: dict[str, Any]
    weights: str | None = None
    augmentation: str = "light"
    data: str = ""

    def describe(self, cfg: TrainConfig) -> str:
        """Why this recipe, in one line, with the values cfg (the recipe after overrides) trains with."""
        t, o = cfg.train, cfg.optim
        batch = t.global_batch or t.batch_size
        length = f"{t.steps} steps" if t.steps is not None else _epochs(t.epochs)
        sized = f"{length} at batch {batch}, {self.augmentation} augmentation, for {self.data}"
        if self.weights is not None:
            lr = f"lr {o.lr:g}" if o.lr is not None else f"base lr {o.base_lr:g} per {o.base_batch_size}"
            return f"fine-tune (weights given: {self.weights}): {_OPTIMIZERS.get(o.opt, o.opt)} {lr}, {sized}"
        line = f"from scratch (no --pretrained): {cfg.model.name}, {sized}"
        if cfg.model.name != "cvt_digits":
            line += "; released weights (--pretrained TAG) usually do far better on a small folder"
        return line

    @property
    def why(self) -> str:
        """describe() of the recipe as chosen, before any override."""
        return self.describe(TrainConfig.from_mapping(self.values, f"the {self.name} recipe"))


# How the recipe line names timm's optimisers.
_OPTIMIZERS = {"sgd": "SGD", "momentum": "SGD", "adamw": "AdamW", "adam": "Adam", "lamb": "LAMB"}


@dataclass(frozen=True)
class DataShape:
    """What the rule reads from a training folder: how many images and their median shorter side."""

    images: int
    classes: int
    side: int

    @classmethod
    def measure(cls, train_dir: str | Path) -> DataShape:
        if not is_folder_tree(train_dir):
            return cls.measure_dataset(train_dir)
        classes, paths = list_classes(train_dir), [path for path, _ in class_images(train_dir)]
        if not paths:
            raise TorchcvtError(f"data folder {train_dir} holds no images in its class folders")
        sample = paths[:: max(1, len(paths) // SIZE_SAMPLE)][:SIZE_SAMPLE]
        sides = []
        for path in sample:
            try:  # reads the header only; PIL's own pixel limit refuses decompression bombs here
                with open_image(path) as image:
                    sides.append(min(image.size))
            except Exception:  # decoding one file; an unreadable image is reported (and skipped) by the run
                continue
        return cls(len(paths), len(classes), int(statistics.median(sides)) if sides else 224)


    @classmethod
    def measure_dataset(cls, source: str | Path) -> DataShape:
        """The same of a Hugging Face dataset split: SIZE_SAMPLE of its images decoded."""
        from ..hfdata import HFImages

        images = HFImages(source)
        sides = [min(images.image(i).size) for i in range(0, len(images), max(1, len(images) // SIZE_SAMPLE))]
        return cls(len(images), len(images.class_names), int(statistics.median(sides[:SIZE_SAMPLE])))


def size_band(images: int) -> SizeBand:
    return next(band for band in SIZE_BANDS if band.most_images is None or images <= band.most_images)


def _batch(band: SizeBand, images: int) -> int:
    # At least 4 steps an epoch on a small folder.
    return max(1, min(band.batch_size, images // 4))


def _epochs(count: int) -> str:
    return f"{count} epoch{'' if count == 1 else 's'}"


def _warmup(epochs: float, length: int) -> float:
    # A run as short as its warm-up (train.epochs=1) warms up over its first fifth instead.
    return epochs if epochs < length else length / 5


def choose_recipe(
    train_dir: str | Path, weights: str | None, architecture: str | None = None, epochs: int | None = None
) -> Recipe:
    """The recipe for training on train_dir: fine-tuning `weights` (a tag or file of `architecture`) when
    given, else from scratch sized by the data. `epochs`, when the user sets train.epochs, replaces the
    recipe's length (and the from-scratch warm-up follows it)."""
    shape = DataShape.measure(train_dir)
    band = size_band(shape.images)
    batch = _batch(band, shape.images)
    given = isinstance(epochs, int) and not isinstance(epochs, bool) and epochs >= 1
    counted = f"{shape.images:,} images of {shape.classes} classes ({band.name}), median side {shape.side} px"
    if weights is not None:
        values = copy.deepcopy(FINETUNE_RECIPE)
        if architecture is not None:
            values["model"]["name"] = architecture
        values["aug"].update(AUGMENTATION["light"])
        length = epochs if given else band.finetune_epochs
        values["train"] = {"epochs": length, "batch_size": batch}
        values["sched"]["warmup_epochs"] = _warmup(values["sched"]["warmup_epochs"], length)
        return Recipe("finetune", values, str(weights), "light", counted)
    model, base_lr = next(
        (name, lr) for most, name, lr in SCRATCH_MODELS if most is None or shape.side <= most
    )
    values = copy.deepcopy(SCRATCH_RECIPE)
    values["model"] = {"name": model}
    values["aug"].update(AUGMENTATION[band.augmentation])
    values["optim"]["base_lr"] = base_lr
    length = epochs if given else band.scratch_epochs
    values["sched"]["warmup_epochs"] = _warmup(max(1, length // 20), length)
    values["train"] = {"epochs": length, "batch_size": batch}
    return Recipe(f"scratch-{band.name}", values, None, band.augmentation, counted)


def given_weights(settings: Mapping[str, Any]) -> tuple[str | None, str | None]:
    """The starting weights among dotted settings (model.pretrained or model.checkpoint) and the
    architecture they fit (model.name when given, else what the tag or checkpoint says)."""
    from .starting import checkpoint_architecture, tag_architecture

    tag, path = settings.get("model.pretrained"), settings.get("model.checkpoint")
    weights = tag or path
    if weights is None:
        return None, settings.get("model.name")
    architecture = settings.get("model.name")
    if architecture is None:
        architecture = tag_architecture(tag) if tag else checkpoint_architecture(path)
    return str(weights), architecture

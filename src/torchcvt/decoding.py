"""One decoded image: any PIL image as upright 8-bit RGB, what a source returns for an unreadable one, and a
transform run on a per-sample seed. Shared by every image source (data.ImageFolder, hfdata.HFImages)."""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, NamedTuple

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import get_worker_info


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL image (RGBA, palette, grayscale, CMYK, 16-bit, EXIF-rotated) as 8-bit RGB, upright."""
    image = ImageOps.exif_transpose(image)
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16-bit and 32-bit integer images: PIL's convert('RGB') clips rather than scales them.
        array = np.asarray(image).astype(np.float64)
        peak = 65535.0 if image.mode.startswith("I;16") or array.max() > 255 else 255.0
        image = Image.fromarray(np.clip(array / peak * 255.0 + 0.5, 0, 255).astype(np.uint8), mode="L")
    elif image.mode == "F":
        array = np.asarray(image)
        scale = 255.0 if array.max() <= 1.0 else 1.0
        image = Image.fromarray(np.clip(array * scale, 0, 255).astype(np.uint8))
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        # Transparent pixels go onto white, as a viewer would show them, not onto their hidden colour.
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return image.convert("RGB")


class LabelledSamples:
    """What an image folder and a Hugging Face split share: (item, class index) samples over a class list."""

    samples: list[tuple[Any, int]]
    class_names: list[str]

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def targets(self) -> list[int]:
        return [target for _, target in self.samples]

    def empty_classes(self) -> list[str]:
        """The classes of the class list without a sample here (they cannot be scored)."""
        present = set(self.targets)
        return [name for i, name in enumerate(self.class_names) if i not in present]


class BadImage(NamedTuple):
    """What the dataset returns for a file it cannot decode, so one bad JPEG never ends a run."""

    path: str
    error: str


@contextmanager
def seeded_rng(seed: int) -> Iterator[None]:
    """Seed python, numpy and torch for one sample; in the main process their states are restored after."""
    in_worker = get_worker_info() is not None
    cpu = torch.default_generator  # not torch.manual_seed: that also queues seeding of every accelerator
    saved = None if in_worker else (random.getstate(), np.random.get_state(), cpu.get_state())
    random.seed(seed)
    np.random.seed(seed % 2**32)
    cpu.manual_seed(seed)
    try:
        yield
    finally:
        if saved is not None:
            random.setstate(saved[0])
            np.random.set_state(saved[1])
            cpu.set_state(saved[2])


def decoded(image: Image.Image) -> Image.Image:
    """An image a source handed over still lazily opened, read fully (truncation is caught here) as RGB."""
    image.load()
    return to_rgb(image)


def transformed(
    image: Image.Image, target: int, transform: Callable | None, seed: int | None
) -> tuple[Any, int]:
    """(transform(image), target), the transform drawn from `seed` when given (see seeded_rng)."""
    if transform is None:
        return image, target
    if seed is None:
        return transform(image), target
    with seeded_rng(seed):
        return transform(image), target

"""Images, transforms and datasets."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm", ".pgm")


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
        image = Image.fromarray(np.clip(array * (255.0 if array.max() <= 1.0 else 1.0), 0, 255).astype(np.uint8))
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        # Transparent pixels go onto white, as a viewer would show them, not onto their hidden colour.
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return image.convert("RGB")


def load_image(path: str | Path) -> Image.Image:
    """Open an image file fully (so truncation is caught here) and return it as RGB."""
    with Image.open(path) as image:
        image.load()
        return to_rgb(image)


def eval_transform(data_config: dict[str, Any]) -> T.Compose:
    """Evaluation preprocessing: resize by crop_pct and centre-crop (crop_pct 1.0: resize to the size)."""
    _, height, width = data_config["input_size"]
    interpolation = InterpolationMode(data_config.get("interpolation", "bicubic"))
    crop_pct = data_config.get("crop_pct", 0.875)
    if crop_pct >= 1.0:
        resize = [T.Resize((height, width), interpolation=interpolation, antialias=True)]
    else:
        scale = (int(height / crop_pct), int(width / crop_pct))
        shorter = scale[0] if height == width else scale
        resize = [T.Resize(shorter, interpolation=interpolation, antialias=True), T.CenterCrop((height, width))]
    return T.Compose([*resize, T.ToTensor(), T.Normalize(data_config["mean"], data_config["std"])])

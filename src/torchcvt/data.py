"""Images, transforms and datasets."""

from __future__ import annotations

import io
import json
import logging
import os
import stat
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch.utils.data import Dataset, Sampler, default_collate
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode

from .config import DIGITS_SIZE
from .decoding import BadImage, LabelledSamples, decoded, transformed
from .errors import TorchcvtError
from .extras import require
from .files import publish_tree, staging_folder, write_new
from .workers import sized_workers

logger = logging.getLogger(__name__)

# Images more elongated than this are resized crop-only by ResizeCenterCrop (bounded memory); the
# others exactly as torchvision's Resize + CenterCrop do it.
MAX_RESIZE_ASPECT = 16
_PIL_RESAMPLE = {InterpolationMode.NEAREST: Image.NEAREST, InterpolationMode.BILINEAR: Image.BILINEAR,
                 InterpolationMode.BICUBIC: Image.BICUBIC, InterpolationMode.LANCZOS: Image.LANCZOS,
                 InterpolationMode.BOX: Image.BOX, InterpolationMode.HAMMING: Image.HAMMING}
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm", ".pgm")


def open_image(path: str | Path) -> Image.Image:
    """PIL's Image.open of a regular file; anything else (a FIFO, a device) is an OSError, never opened,
    since reading it would block or never end."""
    if not stat.S_ISREG(os.stat(path).st_mode):
        raise OSError(f"{path} is not a regular file")
    return Image.open(path)


def load_image(path: str | Path) -> Image.Image:
    """Open an image file fully (so truncation is caught here) and return it as RGB."""
    with open_image(path) as image:
        return decoded(image)


def unreadable_reason(path: str | Path, error: BaseException) -> str:
    """Why an image file could not be read: the words training, eval and predict all use for it."""
    path = Path(path)
    if path.is_symlink() and not path.exists():
        return f"broken symbolic link (its target {os.readlink(path)} does not exist)"
    if not path.exists():
        return "file not found"
    if path.is_dir():
        if not os.access(path, os.R_OK | os.X_OK):
            return "folder cannot be listed (permission denied)"
        return "is a directory, not an image file"
    if not path.is_file():
        return "not a regular file (a FIFO, socket or device), so not an image file"
    if path.stat().st_size == 0:
        return "empty file (0 bytes)"
    if isinstance(error, UnidentifiedImageError):
        return "not an image file (PIL cannot identify its format)"
    if isinstance(error, Image.DecompressionBombError):
        return f"image too large: {error}"
    if isinstance(error, PermissionError):
        return "permission denied"
    if isinstance(error, MemoryError):
        return "too large to decode in the memory this machine has"
    message = str(error) or type(error).__name__
    if "truncated" in message.lower():
        return f"truncated image file ({message})"
    return f"corrupt or truncated image ({message})"


def walk_images(root: str | Path, seen: set[tuple[int, int]] | None = None) -> list[Path]:
    """Image files under root, recursively and sorted, following symlinked folders (each folder once): the
    one listing of images that training, evaluation, recipes, fingerprints and predict all use.

    Hidden files and folders are skipped. Also listed, so that reading them reports why: image-named
    entries that are not regular files (broken symlinks, FIFOs) and folders that cannot be listed. seen
    holds the (device, inode) of folders already walked; share one set across roots to list each folder once.
    """
    root = Path(root)
    seen = set() if seen is None else seen
    found: list[Path] = []

    def unreadable(error: OSError) -> None:
        found.append(Path(error.filename))

    for folder, subfolders, files in os.walk(root, onerror=unreadable, followlinks=True):
        info = os.stat(folder)
        if (info.st_dev, info.st_ino) in seen:  # a symlink loop, or a folder reached twice
            subfolders.clear()
            continue
        seen.add((info.st_dev, info.st_ino))
        subfolders[:] = [name for name in subfolders if not name.startswith(".")]
        found += [Path(folder, name) for name in files
                  if not name.startswith(".") and Path(name).suffix.lower() in IMAGE_EXTENSIONS]
    return sorted(found)


class ResizeCenterCrop:
    """Resize the shorter side to `size` and centre-crop `crop` pixels a side, as T.Resize + T.CenterCrop do.

    Beyond an aspect ratio of MAX_RESIZE_ASPECT only the crop is resampled (PIL's resize with a box):
    a 4 x 100000 image would otherwise become 256 x 6.4M pixels (gigabytes) to keep 224 x 224 of them.
    """

    def __init__(self, size: int, crop: int, interpolation: InterpolationMode = InterpolationMode.BICUBIC):
        self.size, self.crop = size, crop
        self.resize = T.Resize(size, interpolation=interpolation, antialias=True)
        self.center_crop = T.CenterCrop(crop)
        self.resample = _PIL_RESAMPLE[interpolation]

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.resize}, {self.center_crop}, max_aspect={MAX_RESIZE_ASPECT})"

    def __call__(self, image: Image.Image) -> Image.Image:
        width, height = image.size
        if max(width, height) <= MAX_RESIZE_ASPECT * min(width, height):
            return self.center_crop(self.resize(image))
        # torchvision's arithmetic for the resized size and the crop's corner, then the crop's box in
        # source pixels: PIL resamples just that box at the same scale.
        if width <= height:
            new_width, new_height = self.size, int(self.size * height / width)
        else:
            new_width, new_height = int(self.size * width / height), self.size
        top, left = int(round((new_height - self.crop) / 2.0)), int(round((new_width - self.crop) / 2.0))
        sx, sy = width / new_width, height / new_height
        box = (left * sx, top * sy, (left + self.crop) * sx, (top + self.crop) * sy)
        return image.resize((self.crop, self.crop), self.resample, box=box)


def eval_transform(data_config: dict[str, Any]) -> T.Compose:
    """Evaluation preprocessing: resize by crop_pct and centre-crop (crop_pct 1.0: resize to the size)."""
    _, height, width = data_config["input_size"]
    interpolation = InterpolationMode(data_config.get("interpolation", "bicubic"))
    crop_pct = data_config.get("crop_pct", 0.875)
    if crop_pct >= 1.0:
        resize = [T.Resize((height, width), interpolation=interpolation, antialias=True)]
    elif height == width:
        resize = [ResizeCenterCrop(int(height / crop_pct), height, interpolation)]
    else:
        resize = [
            T.Resize((int(height / crop_pct), int(width / crop_pct)), interpolation=interpolation,
                     antialias=True),
            T.CenterCrop((height, width)),
        ]
    return T.Compose([*resize, T.ToTensor(), T.Normalize(data_config["mean"], data_config["std"])])


def check_real_labels(path: str | Path, filenames: Sequence[str | Path], num_classes: int) -> None:
    """One-line error unless path is an ImageNet-ReaL real.json for these files: one list of class indices
    per file, the files named ILSVRC2012_val_<n>.JPEG as timm's RealLabelsImagenet looks them up."""
    path = Path(path)
    if not path.is_file():
        raise TorchcvtError(f"ImageNet-ReaL labels file {path} does not exist")
    try:
        labels = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise TorchcvtError(f"ImageNet-ReaL labels file {path} is not valid JSON ({error})") from None
    expected = (f"ImageNet-ReaL labels file {path} must hold a list with one list of class indices "
                f"(0 to {num_classes - 1}) per image")
    if not isinstance(labels, list) or not all(isinstance(row, list) for row in labels):
        raise TorchcvtError(f"{expected}, got a JSON {type(labels).__name__} of another shape")
    bad = next((row for row in labels for i in row
                if not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < num_classes), None)
    if bad is not None:
        raise TorchcvtError(f"{expected}, got {json.dumps(bad)[:60]}")
    if len(labels) != len(filenames):
        raise TorchcvtError(
            f"ImageNet-ReaL labels file {path} labels {len(labels)} images but the data folder "
                         f"holds {len(filenames)}: ReaL needs the whole ImageNet validation set")
    names = {f"ILSVRC2012_val_{i + 1:08d}.JPEG" for i in range(len(labels))}
    stray = [name for name in map(str, filenames) if Path(name).name not in names]
    if stray:
        raise TorchcvtError(f"ImageNet-ReaL labels file {path} is looked up by file name, but {len(stray)} "
                         f"image(s) are not named ILSVRC2012_val_<n>.JPEG (n up to {len(labels)}), "
                         f"e.g. {stray[0]}")


def list_classes(root: str | Path) -> list[str]:
    """Sorted class folder names of an ImageFolder tree; one-line errors for a missing or empty folder."""
    root = Path(root)
    if root.exists() and not root.is_dir():
        raise TorchcvtError(f"data folder {root} is a file, not a folder: give the folder of class folders")
    if not root.is_dir():
        raise TorchcvtError(f"data folder {root} does not exist")
    try:
        classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    except OSError as error:
        raise TorchcvtError(f"data folder {root} cannot be listed: {error.strerror or error}") from None
    if not classes:
        raise TorchcvtError(f"data folder {root} is empty: expected one sub-folder of images per class")
    return classes


def is_folder_tree(source: str | Path) -> bool:
    """Whether a data path is an ImageFolder tree (the default) rather than a Hugging Face dataset."""
    from .hfdata import is_hf_source

    return not is_hf_source(source)


def open_images(source: str | Path, transform: Callable | None = None,
                class_names: Sequence[str] | None = None) -> Dataset:
    """The labelled images of a data path: an ImageFolder tree, or a Hugging Face dataset split (hfdata)."""
    if is_folder_tree(source):
        return ImageFolder(source, transform, class_names)
    from .hfdata import HFImages

    return HFImages(source, transform, class_names)


def source_classes(source: str | Path) -> list[str]:
    """The class names of a data path: its class folders, or the dataset's labels (ClassLabel names)."""
    return list_classes(source) if is_folder_tree(source) else open_images(source).class_names


def data_roots(data: str | Path) -> tuple[str, str]:
    """data.train and data.val for --data: ROOT/train and ROOT/val of a tree, or a Hugging Face dataset's
    train and validation splits (hfdata.default_splits, which says which it took)."""
    if is_folder_tree(data):
        return str(Path(data) / "train"), str(Path(data) / "val")
    from .hfdata import default_splits

    train, val = default_splits(str(data))
    return str(train), str(val)


def class_images(root: str | Path) -> list[tuple[Path, str]]:
    """(image file, class folder name) for every image of an ImageFolder tree, class by class."""
    root = Path(root)
    return [(path, name) for name in list_classes(root) for path in walk_images(root / name)]


class ImageFolder(LabelledSamples, Dataset):
    """An ImageNet-layout tree root/<class>/<image>, labelled by a given class list (default: sorted folders).

    Items are (tensor, label), or BadImage for an unreadable file. An index may come as
    (index, seed): the transform then runs on that seed, so augmentation does not depend on
    the number of workers or on where a resumed run starts.
    """

    def __init__(
        self, root: str | Path, transform: Callable | None = None, class_names: Sequence[str] | None = None
    ):
        self.root = Path(root)
        folders = list_classes(root)
        self.class_names = list(class_names) if class_names is not None else folders
        unknown = sorted(set(folders) - set(self.class_names))
        if unknown:
            raise TorchcvtError(
                f"{root} has class folders the class list lacks: {', '.join(unknown[:5])}"
                + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else "")
            )
        index = {name: i for i, name in enumerate(self.class_names)}
        self.samples = [(str(path), index[folder]) for path, folder in class_images(root)]
        if not self.samples:
            raise TorchcvtError(f"data folder {root} holds no images ({' '.join(IMAGE_EXTENSIONS)})")
        self.transform = transform

    def warn_empty_classes(self) -> None:
        """A warning naming each class folder without images (its class cannot be scored here)."""
        for name in self.empty_classes():
            logger.warning(f"class folder {self.root / name} holds no images: class {name!r} is not scored")

    def __getitem__(self, item: int | tuple[int, int]) -> tuple[Any, int] | BadImage:
        index, seed = item if isinstance(item, tuple) else (item, None)
        path, target = self.samples[index]
        try:
            image = load_image(path)
        except Exception as error:  # decoding one file: corrupt data raises many types (struct.error...)
            return BadImage(path, unreadable_reason(path, error))
        return transformed(image, target, self.transform, seed)


class SeededSampler(Sampler):
    """Wraps a sampler with set_epoch; yields (index, seed) and can start part-way through an epoch."""

    def __init__(self, sampler: Sampler, seed: int, rank: int = 0, world_size: int = 1):
        self.sampler, self.seed, self.rank, self.world_size = sampler, seed, rank, world_size
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Epoch to draw, and how many of its samples (on this rank) to skip when resuming."""
        self.epoch, self.start = epoch, start
        self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.sampler) - self.start

    def __iter__(self) -> Iterator[tuple[int, int]]:
        for position, index in enumerate(self.sampler):
            if position >= self.start:
                # The position across all ranks, so one process and N processes augment alike.
                flat = position * self.world_size + self.rank
                # Kept within int64 (the loader collates it as a tensor) for seeds up to 2**32 - 1.
                yield index, ((self.seed * 1_000_003 + self.epoch) * 100_000_007 + flat) % 2**63


class ShardSampler(Sampler):
    """Every world_size-th index from rank, in order, without padding: exact distributed evaluation."""

    def __init__(self, length: int, rank: int = 0, world_size: int = 1):
        self.indices = list(range(rank, length, world_size))

    def __len__(self) -> int:
        return len(self.indices)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)


def collate_skipping_bad(batch: list) -> tuple[torch.Tensor | None, torch.Tensor | None, list[BadImage]]:
    """Collate the readable samples of a batch; the unreadable ones come back as a list, never scored.

    A batch with nothing readable gives (None, None, bad): the caller skips it and counts it.
    """
    good = [sample for sample in batch if not isinstance(sample, BadImage)]
    bad = [sample for sample in batch if isinstance(sample, BadImage)]
    if not good:
        return None, None, bad
    images, targets = default_collate(good)
    return images, targets, bad


def data_name(train: str | Path | None) -> str:
    """The training data's name: DIR for DIR/train, the folder's own name otherwise, 'digits' for none
    (the embedded digits)."""
    if train is None:
        return "digits"
    path = Path(train)
    if not path.parent.name:
        path = path.resolve()  # `train` alone names the current folder's data
    return path.parent.name if path.name in ("train", "training") and path.parent.name else path.name


def loader_options(workers: int | None, pin_memory: bool, persistent_workers: bool, device: torch.device,
                   key: str = "data.workers") -> dict:
    """DataLoader keyword arguments shared by training, validation and evaluation; workers sized to the
    machine (sized_workers)."""
    workers = sized_workers(workers, key)
    return {
        "num_workers": workers,
        "pin_memory": pin_memory and device.type == "cuda",
        "persistent_workers": persistent_workers and workers > 0,
        "collate_fn": collate_skipping_bad,
    }


def train_transform(aug: Any, data_config: dict[str, Any]) -> Callable:
    """Training augmentation: timm's ImageNet pipeline (crop, flip, RandAugment, colour jitter, erasing)
    or, with aug.pipeline 'torchvision', the official code's plain one without timm's loader (CvT-21-224).

    aug is the aug section of a training config (torchcvt.engine.TrainConfig().aug).
    """
    if aug.enabled and aug.pipeline == "torchvision":
        _, height, width = data_config["input_size"]
        crop = T.RandomResizedCrop(
            (height, width),
            scale=tuple(aug.scale),
            ratio=tuple(aug.ratio),
            interpolation=InterpolationMode(aug.interpolation),
        )
        flip = T.RandomHorizontalFlip(aug.hflip)
        return T.Compose([crop, flip, T.ToTensor(), T.Normalize(data_config["mean"], data_config["std"])])
    from timm.data import create_transform

    transform = create_transform(
        input_size=data_config["input_size"],
        is_training=True,
        no_aug=not aug.enabled,
        scale=tuple(aug.scale),
        ratio=tuple(aug.ratio),
        hflip=aug.hflip,
        vflip=0.0,
        color_jitter=aug.color_jitter,
        auto_augment=aug.auto_augment,
        interpolation=aug.interpolation,
        mean=data_config["mean"],
        std=data_config["std"],
        re_prob=aug.re_prob,
        re_mode=aug.re_mode,
        re_count=aug.re_count,
    )
    _posterize_zero_bits_to_black(transform)
    return transform


def _posterize(image: Image.Image, bits_to_keep: int, **_: Any) -> Image.Image:
    if bits_to_keep >= 8:
        return image
    return image.point(lambda _: 0) if bits_to_keep <= 0 else ImageOps.posterize(image, bits_to_keep)


def _posterize_zero_bits_to_black(transform: Callable) -> None:
    """RandAugment's 'inc1' policy (every official recipe) posterizes to 0 bits at high magnitudes: a black
    image with Pillow before 13, a ValueError with Pillow 13 that stops training. Keep the black image."""
    for step in getattr(transform, "transforms", ()):
        for op in getattr(step, "ops", ()):
            if getattr(op, "name", "").startswith("Posterize"):
                op.aug_fn = _posterize


def write_digits(
    root: str | Path, size: int = DIGITS_SIZE, labels: Iterable[int] = range(10)
) -> tuple[Path, Path]:
    """Write scikit-learn's handwritten digits once as root/{train,val}/<digit>/<n>.png (a folder of your
    own images in the form `torchcvt train --data root` reads).

    The 8x8 images (values 0-16) are upsampled bicubically to size x size; every fifth image of each
    digit goes to val, the rest to train (all ten digits: 1,433 train and 364 val images). `labels`
    picks the digits written, e.g. range(5) for a pre-training task and range(5, 10) for a held-out one.
    Returns the train and val folders; a tree already written with the same size and labels is kept.
    """
    root = Path(root)
    labels = sorted(set(labels))
    if not labels or not all(0 <= label <= 9 for label in labels):
        raise TorchcvtError(f"labels must be digits 0-9, got {labels}")
    marker = json.dumps({"size": size, "labels": labels})
    if not (root / ".complete").exists() or (root / ".complete").read_text() != marker:
        digits = load_digits()
        staging = staging_folder(root)
        for label in labels:
            for n, i in enumerate(np.flatnonzero(digits.target == label)):
                folder = staging / ("val" if n % 5 == 0 else "train") / str(label)
                write_new(folder / f"{i:04d}.png", png_bytes(digit_image(digits.images[i], size)))
        write_new(staging / ".complete", marker.encode())
        publish_tree(staging, root)
    return root / "train", root / "val"


def load_digits() -> Any:
    """scikit-learn's 1,797 handwritten digits (8x8 images, values 0-16)."""
    return require("sklearn.datasets", "the digits data set").load_digits()


def digit_image(pixels: np.ndarray, side: int) -> Image.Image:
    """One 8x8 digit (values 0-16) as a grey side x side image, upsampled bicubically."""
    grey = np.clip(pixels * (255.0 / 16.0) + 0.5, 0, 255).astype(np.uint8)
    return Image.fromarray(grey, mode="L").resize((side, side), Image.BICUBIC)


def png_bytes(image: Image.Image) -> bytes:
    """An image encoded as PNG."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def cache_folder(name: str) -> Path:
    """Where torchcvt keeps data it writes once (the digits trees): $XDG_CACHE_HOME/torchcvt/name."""
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "torchcvt" / name

"""Image inputs: reading files as RGB with one-line reasons for the unreadable ones, finding them in folders,
and decoding them in loader workers with a progress report."""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import Dataset
from tqdm import tqdm

from .data import load_image, unreadable_reason, walk_images
from .errors import TorchcvtError

# PIL warns above ~89 MP and refuses above ~179 MP; photos of tens of megapixels are ordinary, so
# allow up to 2**28 pixels (16k x 16k) and refuse only beyond that.
MAX_IMAGE_PIXELS = 2**28

logger = logging.getLogger(__name__)


class UnreadableImageError(TorchcvtError):
    """An input file that is missing, empty, truncated or not an image; the message is the reason."""


@contextmanager
def _large_images_allowed() -> Iterator[None]:
    previous = Image.MAX_IMAGE_PIXELS
    # PIL warns above MAX_IMAGE_PIXELS and raises above twice that.
    Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS // 2
    try:
        with warnings.catch_warnings():
            # Large images and odd metadata (corrupt EXIF, unknown TIFF tags) are fine to classify.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            warnings.simplefilter("ignore", UserWarning)
            yield
    finally:
        Image.MAX_IMAGE_PIXELS = previous


def read_image(path: str | Path) -> Image.Image:
    """Load an image file as upright 8-bit RGB, or raise UnreadableImageError with a one-line reason."""
    try:
        with _large_images_allowed():
            return load_image(path)
    except Exception as error:  # PIL's decoders raise many exception types on corrupt data
        raise UnreadableImageError(unreadable_reason(path, error)) from None


def find_images(paths: Sequence[str | Path]) -> list[Path]:
    """Files named directly (whatever their extension) plus image files found under folders, recursively.

    Symlinked folders are followed, each folder once. Missing paths, broken symlinks and folders that
    cannot be listed are kept, so that they are reported rather than silently dropped; hidden files and
    folders inside a walked folder are skipped.
    """
    found: list[Path] = []
    seen: set[tuple[int, int]] = set()
    for path in map(Path, paths):
        found += walk_images(path, seen) if path.is_dir() else [path]
    return found


def transformed(image: Image.Image, transform: Callable[[Image.Image], torch.Tensor]) -> torch.Tensor:
    if not image.width or not image.height:
        raise UnreadableImageError(f"image has no pixels ({image.width}x{image.height})")
    return transform(image)


class ImageFiles(Dataset):
    """Files as (path, model input or None, reason it is unreadable or None); module-level so it pickles."""

    def __init__(self, paths: Sequence[str | Path], transform: Callable[[Image.Image], torch.Tensor]):
        self.paths, self.transform = [str(path) for path in paths], transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[str, torch.Tensor | None, str | None]:
        path = self.paths[index]
        try:
            return path, transformed(read_image(path), self.transform), None
        except UnreadableImageError as error:
            return path, None, str(error)


class Progress:
    """A tqdm bar on a terminal; where stderr is a log, an INFO line every `interval` seconds instead."""

    def __init__(self, total: int, progress: bool | None, interval: float = 30.0):
        self.total, self.done, self.interval = total, 0, interval
        self.bar = tqdm(total=total, unit="img", disable=None if progress is None else not progress)
        self.log = progress is None and self.bar.disable
        self.start = self.last = time.monotonic()

    def update(self, count: int) -> None:
        self.bar.update(count)
        self.done += count
        now = time.monotonic()
        if self.log and (now - self.last >= self.interval or self.done == self.total):
            self.last = now
            rate = self.done / max(now - self.start, 1e-9)
            logger.info("%d/%d images (%.1f img/s)", self.done, self.total, rate)

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.bar.close()


def input_files(paths: Sequence[str | Path]) -> list[Path]:
    if isinstance(paths, (str, Path)):
        paths = [paths]
    files = find_images(paths)
    if not files:
        raise TorchcvtError(f"no image files found in {', '.join(map(str, paths)) or 'the given paths'}")
    return files

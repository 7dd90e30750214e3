"""One image listing for every command (symlinked subfolders followed, FIFOs never opened) and decoding
failures of any kind, bombs included, counted as unreadable files rather than stopping a run."""

from __future__ import annotations

import io
import os
import signal
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image
from trainkit import digits_tree

from torchcvt.ablate import data_fingerprint
from torchcvt.data import BadImage, ImageFolder
from torchcvt.engine.recipes import DataShape
from torchcvt.inputs import UnreadableImageError, find_images, read_image


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png_with_bad_exif(path: Path) -> Path:
    """A valid 32x32 PNG plus an eXIf chunk whose TIFF header is cut short (PIL raises struct.error)."""
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), (10, 200, 30)).save(buffer, "PNG")
    png = buffer.getvalue()
    at = png.index(b"IDAT") - 4
    path.write_bytes(png[:at] + _chunk(b"eXIf", bytes.fromhex("4578696600004d4d002a")) + png[at:])
    return path


def _bomb(path: Path) -> Path:
    """A 20000x20000 PNG header (400 MP, beyond PIL's limit) with one row of data: 100 bytes on disk."""
    header = struct.pack(">IIBBBBB", 20000, 20000, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header)
                     + _chunk(b"IDAT", zlib.compress(b"\0" * 20001)) + _chunk(b"IEND", b""))
    return path


@pytest.fixture
def alarm() -> Iterator[None]:
    """Fail instead of hanging: a FIFO opened for reading blocks until a writer comes."""

    def hung(*_: object) -> None:
        raise TimeoutError("blocked on a FIFO")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(20)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def test_training_evaluation_recipe_fingerprint_and_predict_list_the_same_images(tmp_path: Path) -> None:
    data = digits_tree(tmp_path / "data")
    train = data / "train"
    extra = tmp_path / "extra"
    extra.mkdir()
    for n in range(5):
        Image.new("L", (32, 32), 40 * n).save(extra / f"x{n}.png")
    (train / "1" / "more").symlink_to(extra, target_is_directory=True)  # a symlinked subfolder
    Image.new("L", (32, 32)).save(train / "stray.png")  # beside the class folders: in no class
    expected = 3 * 8 + 5
    assert len(ImageFolder(train)) == expected
    assert DataShape.measure(train).images == expected
    assert data_fingerprint(train, data / "val")["train"]["images"] == expected
    assert len(find_images([train / "1"])) == 8 + 5
    labels = [label for path, label in ImageFolder(train).samples if "/more/" in path]
    assert labels == [1] * 5


def test_a_fifo_named_like_an_image_is_never_opened(tmp_path: Path, alarm: None) -> None:
    data = digits_tree(tmp_path / "data")
    fifo = data / "train" / "0" / "0000-fifo.png"
    os.mkfifo(fifo)
    assert DataShape.measure(data / "train").images == 3 * 8 + 1
    dataset = ImageFolder(data / "train")
    item = dataset[[path for path, _ in dataset.samples].index(str(fifo))]
    assert isinstance(item, BadImage) and "not a regular file" in item.error
    with pytest.raises(UnreadableImageError, match="not a regular file"):
        read_image(fifo)
    assert fifo in find_images([data / "train"])
    data_fingerprint(data / "train", data / "val")


def test_any_exception_decoding_one_file_marks_it_unreadable(tmp_path: Path) -> None:
    data = digits_tree(tmp_path / "data", classes=2, train_per_class=2, val_per_class=0)
    exif = _png_with_bad_exif(data / "train" / "0" / "exif.png")
    with pytest.raises(Exception) as raised:  # noqa: PT011 - what PIL raises is the point
        with Image.open(exif) as image:
            image.getexif()
    assert not isinstance(raised.value, OSError)  # outside the loader's old exception list
    dataset = ImageFolder(data / "train")
    item = dataset[[path for path, _ in dataset.samples].index(str(exif))]
    assert isinstance(item, BadImage) and item.path == str(exif) and "corrupt" in item.error
    with pytest.raises(UnreadableImageError):
        read_image(exif)


def test_a_decompression_bomb_is_an_unreadable_image_everywhere(tmp_path: Path) -> None:
    data = digits_tree(tmp_path / "data", classes=2, train_per_class=3, val_per_class=0)
    bomb = _bomb(data / "train" / "0" / "0-bomb.png")
    limit = Image.MAX_IMAGE_PIXELS
    shape = DataShape.measure(data / "train")
    assert shape.images == 7 and shape.side == 32
    dataset = ImageFolder(data / "train")
    item = dataset[[path for path, _ in dataset.samples].index(str(bomb))]
    assert isinstance(item, BadImage) and "image too large" in item.error
    with pytest.raises(UnreadableImageError, match="image too large"):
        read_image(bomb)
    assert Image.MAX_IMAGE_PIXELS == limit

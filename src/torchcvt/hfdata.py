"""Hugging Face datasets as a source of labelled images, beside ImageFolder trees (data.py dispatches here).

A source is written as one string, so that it travels in data.train / data.val like a folder does:

    SOURCE[#SPLIT][?image=COLUMN&label=COLUMN]

SOURCE is `hf:OWNER/NAME[:CONFIG]` (a Hub dataset, through huggingface_hub's cache: HF_HOME, HF_HUB_OFFLINE
and HF_DATASETS_OFFLINE apply as for weights), a folder written by `save_to_disk`, or a folder of parquet
files (split by file names, as `datasets` reads them). SPLIT names a split, several joined by `+`, and may
end in `[dev:FRACTION:SEED]` (a seeded, class-stratified held-out part) or `[rest:FRACTION:SEED]` (the
split without it). The image and label columns are found from the features (the first Image and the first
ClassLabel, whose names are the class names) unless named. Rows are read from the memory-mapped Arrow
files and decoded one at a time, in the data-loader workers.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import Dataset

from .decoding import BadImage, LabelledSamples, decoded, transformed
from .errors import TorchcvtError
from .extras import require

logger = logging.getLogger(__name__)

HUB_PREFIX = "hf:"
# The split a run validates on when --data names a whole dataset: the first of these it has.
VALIDATION_SPLITS = ("validation", "valid", "val", "test")
_HOLDOUT = re.compile(r"^(?P<splits>[^\[\]]+)\[(?P<part>dev|rest):(?P<fraction>[0-9.]+):(?P<seed>\d+)\]$")
_OFFLINE_VALUES = ("1", "ON", "YES", "TRUE")


@dataclass(frozen=True)
class Holdout:
    """A seeded, class-stratified part of a split: `dev` is the held-out part, `rest` the others."""

    part: str
    fraction: float
    seed: int

    def __str__(self) -> str:
        return f"[{self.part}:{self.fraction:g}:{self.seed}]"


@dataclass(frozen=True)
class Source:
    """A parsed source string: where the dataset is, which split(s), which part and which columns."""

    dataset: str  # hf:OWNER/NAME[:CONFIG] or a folder
    splits: tuple[str, ...] = ()
    holdout: Holdout | None = None
    image_column: str | None = None
    label_column: str | None = None

    def with_splits(self, splits: Sequence[str], holdout: Holdout | None = None) -> Source:
        return Source(self.dataset, tuple(splits), holdout, self.image_column, self.label_column)

    def __str__(self) -> str:
        text = self.dataset
        if self.splits:
            text += "#" + "+".join(self.splits) + (str(self.holdout) if self.holdout else "")
        options = [f"{key}={value}" for key, value in (("image", self.image_column),
                                                        ("label", self.label_column)) if value]
        return text + ("?" + "&".join(options) if options else "")


# Where a folder of parquet files keeps them, as the Hub's repositories do (data/<split>-*.parquet) or by
# split; only these are listed, so that telling an ImageFolder tree apart never walks its images.
_PARQUET_FOLDERS = ("", "data", "train", "test", "validation")


def _is_dataset_folder(path: Path) -> bool:
    if not path.is_dir():
        return False
    if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
        return True
    folders = [path / sub for sub in _PARQUET_FOLDERS if (path / sub).is_dir()]
    return any(next(folder.glob("*.parquet"), None) is not None for folder in folders)


def is_hf_source(text: str | Path) -> bool:
    """Whether a data path is a Hugging Face dataset (hf:ID, a save_to_disk folder or parquet files)."""
    text = str(text)
    if text.startswith(HUB_PREFIX):
        return True
    base = text.partition("?")[0].rpartition("#")[0] or text.partition("?")[0]
    return _is_dataset_folder(Path(base))


def parse_source(text: str | Path) -> Source:
    """The Source a string names; one-line errors for a malformed split, part or option."""
    text = str(text)
    base, _, query = text.partition("?")
    options: dict[str, str] = {}
    for item in filter(None, query.split("&")):
        key, sep, value = item.partition("=")
        if not sep or key not in ("image", "label") or not value:
            raise TorchcvtError(f"data source {text}: option {item!r} is not image=COLUMN or label=COLUMN")
        options[key] = value
    dataset, sep, split = base.rpartition("#")
    if not sep:
        dataset, split = base, ""
    if dataset.startswith(HUB_PREFIX) and not re.fullmatch(r"[\w.-]+/[\w.-]+(:[\w.-]+)?", dataset[3:]):
        raise TorchcvtError(f"data source {text}: expected hf:OWNER/NAME or hf:OWNER/NAME:CONFIG")
    holdout = None
    match = _HOLDOUT.match(split)
    if match:
        fraction = float(match["fraction"])
        if not 0 < fraction < 1:
            raise TorchcvtError(f"data source {text}: the held-out fraction must be between 0 and 1")
        holdout, split = Holdout(match["part"], fraction, int(match["seed"])), match["splits"]
    elif "[" in split or "]" in split:
        raise TorchcvtError(f"data source {text}: a split's part is [dev:FRACTION:SEED] or "
                            "[rest:FRACTION:SEED]")
    splits = tuple(name for name in split.split("+") if name)
    return Source(dataset, splits, holdout, options.get("image"), options.get("label"))


def _offline() -> bool:
    return any(os.environ.get(name, "").upper() in _OFFLINE_VALUES
               for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


@contextlib.contextmanager
def _quiet_progress() -> Iterator[None]:
    """datasets' progress bars off while it reads (they would mix with our log lines), then as before."""
    from datasets.utils import logging as ds_logging

    was_enabled = ds_logging.is_progress_bar_enabled()
    ds_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            ds_logging.enable_progress_bar()


def _hub_folder(dataset: str) -> Path:
    """The local snapshot of a Hub dataset repository: from the cache, downloading it once when online."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    repo = dataset[len(HUB_PREFIX):].partition(":")[0]
    offline = _offline()
    try:
        return Path(snapshot_download(repo, repo_type="dataset", local_files_only=offline))
    except (LocalEntryNotFoundError, RepositoryNotFoundError, HfHubHTTPError, OSError) as error:
        cache = constants.HF_HUB_CACHE
        if offline:
            why = (f"it is not in the Hugging Face cache {cache} and HF_HUB_OFFLINE or HF_DATASETS_OFFLINE "
                   "is set: unset it to download it once, or set HF_HOME to a cache that has it")
        else:
            first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            why = f"the download failed ({first}); check the network and the name"
        raise TorchcvtError(f"cannot get the Hugging Face dataset {dataset}: {why}") from None


@functools.lru_cache(maxsize=8)
def _open(dataset: str) -> Any:
    """The DatasetDict (or single Dataset) a source names, memory-mapped from its Arrow files."""
    ds = require("datasets", "a Hugging Face data source")
    with _quiet_progress():
        if dataset.startswith(HUB_PREFIX):
            folder, config = _hub_folder(dataset), dataset[len(HUB_PREFIX):].partition(":")[2] or None
        else:
            folder, config = Path(dataset), None
            if not folder.is_dir():
                raise TorchcvtError(f"data source {dataset} does not exist")
        if (folder / "dataset_dict.json").is_file() or (folder / "state.json").is_file():
            return ds.load_from_disk(str(folder))
        if not _is_dataset_folder(folder):
            raise TorchcvtError(f"data source {dataset} holds no parquet files and was not written by "
                                "save_to_disk")
        try:
            return ds.load_dataset(str(folder), config)
        except ValueError as error:  # an unknown configuration name, as datasets words it
            raise TorchcvtError(f"data source {dataset}: {str(error).splitlines()[0]}") from None


def split_names(dataset: str) -> list[str]:
    """The splits a dataset has (a single saved Dataset has none)."""
    opened = _open(dataset)
    return list(opened.keys()) if hasattr(opened, "keys") else []


def _split(source: Source, name: str) -> Any:
    opened = _open(source.dataset)
    if not hasattr(opened, "keys"):
        raise TorchcvtError(f"data source {source.dataset} is a single saved Dataset with no splits: name it "
                            "without #SPLIT")
    if name not in opened:
        raise TorchcvtError(f"data source {source.dataset} has no split {name!r}; it has "
                            f"{', '.join(opened.keys())}")
    return opened[name]


def _columns(source: Source, features: Any) -> tuple[str, str]:
    """The image and label columns: as named, else the first Image and the first ClassLabel feature."""
    ds = require("datasets", "a Hugging Face data source")
    columns = list(features)
    for named in (source.image_column, source.label_column):
        if named is not None and named not in features:
            raise TorchcvtError(f"data source {source}: no column {named!r}; it has {', '.join(columns)}")
    image = source.image_column or next(
        (name for name, kind in features.items() if isinstance(kind, ds.Image)), None)
    label = source.label_column or next(
        (name for name, kind in features.items() if isinstance(kind, ds.ClassLabel)), None)
    if image is None or label is None:
        missing = "image (an Image feature)" if image is None else "label (a ClassLabel feature)"
        raise TorchcvtError(f"data source {source}: no {missing} column found among {', '.join(columns)}; "
                            f"name it with ?image=COLUMN&label=COLUMN")
    return image, label


def stratified_holdout(targets: Sequence[int], fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(rest, dev): a seeded choice of round(fraction x n) images of each class held out (at least one of
    a class with two or more), the others kept; both in their original order."""
    rng = np.random.default_rng(seed)
    targets = np.asarray(targets)
    dev: list[int] = []
    for label in np.unique(targets):
        members = np.flatnonzero(targets == label)
        count = min(len(members) - 1, max(1, round(fraction * len(members)))) if len(members) > 1 else 0
        dev += rng.permutation(members)[:count].tolist()
    chosen = set(dev)
    return [i for i in range(len(targets)) if i not in chosen], sorted(dev)


class HFImages(LabelledSamples, Dataset):
    """The images and labels of one split (or part) of a Hugging Face dataset, as ImageFolder gives them:
    items are (tensor, label) or BadImage, and an index may come as (index, seed)."""

    def __init__(self, source: str | Path, transform: Callable | None = None,
                 class_names: Sequence[str] | None = None):
        self.source = parse_source(source)
        self.root = str(self.source)
        if not self.source.splits and hasattr(_open(self.source.dataset), "keys"):
            raise TorchcvtError(f"data source {source} names no split: add #SPLIT (it has "
                                f"{', '.join(split_names(self.source.dataset))})")
        ds = require("datasets", "a Hugging Face data source")
        parts = ([_split(self.source, name) for name in self.source.splits] if self.source.splits
                 else [_open(self.source.dataset)])
        self.data = parts[0] if len(parts) == 1 else ds.concatenate_datasets(parts)
        self.image_column, self.label_column = _columns(self.source, self.data.features)
        feature = self.data.features[self.label_column]
        labels = self.data.data.column(self.label_column).to_pylist()
        if isinstance(feature, ds.ClassLabel):
            own = list(feature.names)
        else:
            own = sorted({str(label) for label in labels})
            labels = [own.index(str(label)) for label in labels]
        self.class_names = list(class_names) if class_names is not None else own
        unknown = sorted(set(own) - set(self.class_names))
        if unknown:
            raise TorchcvtError(f"data source {source} has classes the class list lacks: "
                                f"{', '.join(unknown[:5])}")
        remap = [self.class_names.index(name) for name in own]
        self.rows = list(range(len(labels)))
        if self.source.holdout is not None:
            rest, dev = stratified_holdout(labels, self.source.holdout.fraction, self.source.holdout.seed)
            self.rows = dev if self.source.holdout.part == "dev" else rest
        self.samples = [(f"{self.root}[{row}]", remap[labels[row]]) for row in self.rows]
        if not self.samples:
            raise TorchcvtError(f"data source {source} holds no images")
        self.transform = transform
        # Rows are decoded by the data-loader workers, never all at once.
        self.data = self.data.select_columns([self.image_column])

    def warn_empty_classes(self) -> None:
        for name in self.empty_classes():
            logger.warning(f"data source {self.root} has no image of class {name!r}: it is not scored")

    def image(self, index: int) -> Any:
        """The PIL image of item index, decoded from its row (exceptions as PIL raises them)."""
        return self.data[self.rows[index]][self.image_column]

    def __getitem__(self, item: int | tuple[int, int]) -> Any:
        index, seed = item if isinstance(item, tuple) else (item, None)
        name, target = self.samples[index]
        try:
            image = decoded(self.image(index))
        except Exception as error:  # decoding one row: corrupt data raises many types (struct.error...)
            return BadImage(name, f"cannot decode the image ({str(error) or type(error).__name__})")
        return transformed(image, target, self.transform, seed)


def default_splits(dataset: str) -> tuple[Source, Source]:
    """The train and validation splits of a whole dataset given as --data: `train`, and the first of
    VALIDATION_SPLITS it has; logged, so the mapping is always shown."""
    source = parse_source(dataset)
    if source.splits:
        raise TorchcvtError(f"--data {dataset} names a split; give the dataset (the run takes its train and "
                            "validation splits), or set data.train and data.val to one split each")
    names = split_names(source.dataset)
    if "train" not in names:
        raise TorchcvtError(f"data source {source.dataset} has no 'train' split (it has {', '.join(names)}): "
                            "set data.train=SOURCE#SPLIT and data.val=SOURCE#SPLIT")
    val = next((name for name in VALIDATION_SPLITS if name in names), None)
    if val is None:
        raise TorchcvtError(f"data source {source.dataset} has no validation or test split (it has "
                            f"{', '.join(names)}): set data.val=SOURCE#SPLIT")
    logger.info(f"data {source.dataset}: train <- split 'train', val <- split {val!r} "
                f"(of {', '.join(names)})")
    return source.with_splits(["train"]), source.with_splits([val])


def evaluation_split(dataset: str) -> Source:
    """The split `eval --data SOURCE` scores: the one named, else the one default_splits validates on."""
    source = parse_source(dataset)
    return source if source.splits or not split_names(source.dataset) else default_splits(dataset)[1]


def fingerprint(source: str) -> dict[str, Any]:
    """Class and image counts of a split and the fingerprint `datasets` keeps of its Arrow data."""
    images = HFImages(source)
    return {"classes": len(images.class_names), "images": len(images),
            "datasets_fingerprint": images.data._fingerprint, "rows_sha": _rows_hash(images.rows)}


def _rows_hash(rows: Sequence[int]) -> str:
    import hashlib

    return hashlib.sha256(np.asarray(rows, dtype=np.int64).tobytes()).hexdigest()[:16]

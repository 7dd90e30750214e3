"""The data sets of the paper's Table 4 as data: where each is published, its splits and sizes, how much of
its training set ViT held out to choose the learning rate, its recipe file and the paper's top-1."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..errors import TorchcvtError

# The released ImageNet-22k weights Table 4 starts from, with the paper's model names.
TABLE4_WEIGHTS = {
    "cvt_13_384.ms_in22k_ft_in1k": "CvT-13",
    "cvt_21_384.ms_in22k_ft_in1k": "CvT-21",
    "cvt_w24.ms_in22k_ft_in1k": "CvT-W24",
}
# Where configs/transfer-*.yaml are: a source checkout's configs folder.
CONFIGS = Path(__file__).resolve().parents[3] / "configs"


@dataclass(frozen=True)
class TransferData:
    """A data set of the suite: its source (hf:ID or a folder), the splits trained on and tested on, the
    held-out development fraction, its counts (for --dry-run, with no download), recipe and paper figures."""

    name: str
    title: str
    source: str
    train_splits: tuple[str, ...]
    test_split: str
    dev_fraction: float
    classes: int | None = None
    train_images: int | None = None
    test_images: int | None = None
    config: str | None = None  # a file of configs/ (the recipe), or None: the command's own
    paper: dict[str, float] = field(default_factory=dict)  # top-1 by paper model name (CvT-13 ...)

    @property
    def dev_images(self) -> int | None:
        """The held-out images: round(fraction x n) of each class, about fraction x the training set."""
        return None if self.train_images is None else round(self.dev_fraction * self.train_images)

    def split(self, part: str | None = None, seed: int = 0, test: bool = False) -> str:
        """The source string of the test split, or of the training split(s) (part: 'dev' or 'rest')."""
        from ..hfdata import Holdout, parse_source

        source = parse_source(self.source)
        if test:
            return str(source.with_splits([self.test_split]))
        holdout = Holdout(part, self.dev_fraction, seed) if part else None
        return str(source.with_splits(self.train_splits, holdout))

    def recipe_file(self) -> str | None:
        if self.config is None:
            return None
        path = CONFIGS / self.config
        if not path.is_file():
            raise TorchcvtError(f"the recipe of {self.name} is {path}, which is not there (configs/ of a "
                                "source checkout): run from the checkout, or give --config FILE")
        return str(path)


# Hub ids and sizes as published on the Hugging Face Hub (train/test as the data sets' authors split them).
# ViT held out 2% of CIFAR's training set and 10% of Pets' and Flowers' (Appendix B.1.1). Flowers trains on
# the authors' train and validation splits together (10 images per class each), as is usual for it.
TABLE: dict[str, TransferData] = {
    data.name: data
    for data in (
        TransferData("cifar10", "CIFAR-10", "hf:uoft-cs/cifar10", ("train",), "test", 0.02, 10, 50_000,
                     10_000, "transfer-cifar10.yaml",
                     {"CvT-13": 98.83, "CvT-21": 99.16, "CvT-W24": 99.39}),
        TransferData("cifar100", "CIFAR-100", "hf:uoft-cs/cifar100?label=fine_label", ("train",), "test",
                     0.02, 100, 50_000, 10_000, "transfer-cifar100.yaml",
                     {"CvT-13": 91.11, "CvT-21": 92.88, "CvT-W24": 94.09}),
        TransferData("pets", "Oxford-IIIT Pets", "hf:timm/oxford-iiit-pet", ("train",), "test", 0.1, 37,
                     3_680, 3_669, "transfer-pets.yaml",
                     {"CvT-13": 93.25, "CvT-21": 94.03, "CvT-W24": 94.73}),
        TransferData("flowers102", "Oxford Flowers-102", "hf:timm/oxford-flowers102",
                     ("train", "validation"), "test", 0.1, 102, 2_040, 6_149, "transfer-flowers.yaml",
                     {"CvT-13": 99.50, "CvT-21": 99.62, "CvT-W24": 99.72}),
    )
}


def find_dataset(name: str, dev_fraction: float = 0.1, config: str | None = None) -> TransferData:
    """A data set of the table by name, or any hf: id or dataset folder (train and test splits, a tenth
    held out; its recipe from --config)."""
    if name in TABLE:
        return TABLE[name]
    from ..hfdata import is_hf_source

    if not is_hf_source(name):
        raise TorchcvtError(f"--dataset {name!r} is neither one of {', '.join(TABLE)} nor a Hugging Face "
                            "dataset (hf:OWNER/NAME or a save_to_disk or parquet folder)")
    if config is None:
        raise TorchcvtError(f"--dataset {name} is not in the table: give its recipe with --config FILE "
                            "(e.g. configs/transfer-pets.yaml)")
    return TransferData(name, name, name, ("train",), "test", dev_fraction)

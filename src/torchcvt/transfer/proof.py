"""The offline proof: the whole suite on real data this machine has, in minutes on two cores. cvt_digits is
pre-trained on scikit-learn's digits 0-4 and transferred to digits 5-9, written as a local Hugging Face
dataset (save_to_disk), by ViT's protocol on a reduced grid and step budget."""

from __future__ import annotations

from pathlib import Path

from ..ablate.recipe import section_overrides
from ..data import ImageFolder, write_digits
from ..extras import require
from ..files import publish_tree, staging_folder, write_text
from ..suite import Job, override
from .datasets import TransferData

PROOF_GRID = (0.01, 0.03, 0.1)
# Each transfer run: PROOF_STEPS steps of PROOF_BATCH images (about 8 epochs of the 5-9 training split),
# warming up over the first tenth; the pre-training: the digits recipe (configs/digits.yaml) on 0-4.
PROOF_STEPS = 150
PROOF_BATCH = 32
PROOF_LABEL = "cvt_digits pre-trained on digits 0-4"
# What the transfer recipe (configs/transfer-pets.yaml, ViT's protocol) needs changed for 32-pixel digits
# on a CPU: no mirroring (a mirrored digit is another digit), a gentler crop, fp32, no loader processes.
PROOF_VALUES = {
    "aug.scale": [0.75, 1.0], "aug.hflip": 0.0, "data.workers": 0, "data.persistent_workers": False,
    "data.pin_memory": False, "train.amp": "none", "train.checkpoint_every_steps": 0,
    "train.log_every_steps": 25,
}


def budget(steps: int, batch: int) -> list[str]:
    """KEY=VALUE strings for a transfer run of `steps` steps at a total batch of `batch`."""
    return [override("train.steps", steps), override("sched.warmup_steps", max(1, steps // 10)),
            override("train.global_batch", batch)]


def write_digits_dataset(root: Path) -> Path:
    """Digits 5-9 as a Hugging Face dataset folder (train and test splits, ClassLabel names '5'...'9'),
    written once from the digits tree (every fifth image of a digit is test)."""
    folder = root / "digits-5-9-hf"
    if (folder / ".complete").exists():
        return folder
    datasets = require("datasets", "the offline transfer proof")
    train, test = write_digits(root / "digits-5-9", labels=range(5, 10))
    splits = {}
    for split, tree in (("train", train), ("test", test)):
        images = ImageFolder(tree)
        features = datasets.Features({"image": datasets.Image(),
                                      "label": datasets.ClassLabel(names=images.class_names)})
        rows = {"image": [{"bytes": Path(path).read_bytes(), "path": None} for path, _ in images.samples],
                "label": images.targets}
        splits[split] = datasets.Dataset.from_dict(rows, features=features)
    staging = staging_folder(folder)
    datasets.DatasetDict(splits).save_to_disk(str(staging))
    write_text(staging / ".complete", "")
    publish_tree(staging, folder)
    return folder


def proof_data(root: Path) -> TransferData:
    """The 5-9 dataset as a suite data set: a tenth of its training split held out, as for Pets."""
    folder = write_digits_dataset(root)
    counts = {split: len(ImageFolder(root / "digits-5-9" / tree)) for split, tree in
              (("train", "train"), ("test", "val"))}
    return TransferData("digits5-9", "digits 5-9", str(folder), ("train",), "test", 0.1, 5, counts["train"],
                        counts["test"], "transfer-pets.yaml")


def pretrain_job(root: Path, base: list[str], epochs: int | None) -> Job:
    """The pre-training run: the digits recipe on digits 0-4 (its length `epochs` when given)."""
    from ..engine import DIGITS_RECIPE

    train, val = write_digits(root / "data" / "digits-0-4", labels=range(5))
    folder = root / "runs" / "pretrain-digits-0-4"
    values = [*section_overrides(DIGITS_RECIPE), override("data.train", str(train)),
              override("data.val", str(val)), *base,
              *([override("train.epochs", epochs), override("sched.warmup_epochs", min(2, epochs / 5))]
                if epochs else []),
              override("train.output", str(folder))]
    return Job("pretrain-digits-0-4", folder, None, tuple(values), note="pre-training on digits 0-4")

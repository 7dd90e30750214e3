"""The embedded ablation task: scikit-learn's digits, shrunk and placed at random on a larger canvas.

The plain digits tree (data.write_digits) is centred, upsampled 8x8 strokes that cvt_digits learns to
99-100%, which leaves the studies nothing to tell apart. Here every digit is drawn at DIGIT_SIDE pixels at
a random place on a black CANVAS_SIDE canvas (one fixed place per image), which is what position
embedding and the convolutional token embedding are about, and the training set keeps TRAIN_PER_CLASS
images of each digit. Validation holds the same 364 digits as the plain tree (every fifth of each class).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from ..config import DIGITS_SIZE

CANVAS_SIDE = DIGITS_SIZE  # cvt_digits' input: the images need no resizing
DIGIT_SIDE = 22
TRAIN_PER_CLASS = 100
TASK_VERSION = 1
PLACEMENT_SEED = 17

# What every run of the embedded suite trains: the digits recipe (configs/digits.yaml) with a budget
# (10 epochs of 1,000 images, one warm-up epoch) that fits four studies x 3 seeds, 30 runs, into about
# 15 minutes on two idle cores.
EMBEDDED_RECIPE = (
    "model.name=cvt_digits",
    "data.workers=0",
    "data.persistent_workers=false",
    "data.pin_memory=false",
    "aug.scale=[0.75, 1.0]",
    "aug.ratio=[0.85, 1.18]",
    "aug.hflip=0.0",
    "aug.color_jitter=null",
    "aug.auto_augment=null",
    "aug.re_prob=0.0",
    "aug.mixup=0.0",
    "aug.cutmix=0.0",
    "aug.label_smoothing=0.1",
    "optim.lr=3.0e-3",
    "optim.weight_decay=0.05",
    "sched.warmup_epochs=1",
    "sched.min_lr=1.0e-5",
    "sched.cooldown_epochs=0",
    "train.epochs=10",
    "train.batch_size=64",
    "train.log_every_steps=10",
)


def default_root() -> Path:
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return cache / "torchcvt" / f"digits-ablate-v{TASK_VERSION}"


def write_task(root: str | Path | None = None) -> Path:
    """Write the task once as root/{train,val}/<digit>/<n>.png (default: under ~/.cache/torchcvt)."""
    root = default_root() if root is None else Path(root)
    if (root / ".complete").exists():
        return root
    from sklearn.datasets import load_digits

    digits = load_digits()
    rng = np.random.default_rng(PLACEMENT_SEED)
    staging = root.with_name(f"{root.name}.tmp-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    for label in range(10):
        indices = np.flatnonzero(digits.target == label)
        train_seen = 0
        for n, i in enumerate(indices):
            split = "val" if n % 5 == 0 else "train"
            corner = rng.integers(0, CANVAS_SIDE - DIGIT_SIDE + 1, size=2)  # drawn for every image: stable
            if split == "train":
                train_seen += 1
                if train_seen > TRAIN_PER_CLASS:
                    continue
            pixels = np.clip(digits.images[i] * (255.0 / 16.0) + 0.5, 0, 255).astype(np.uint8)
            digit = Image.fromarray(pixels, mode="L").resize((DIGIT_SIDE, DIGIT_SIDE), Image.BICUBIC)
            canvas = Image.new("L", (CANVAS_SIDE, CANVAS_SIDE))
            canvas.paste(digit, (int(corner[1]), int(corner[0])))
            folder = staging / split / str(label)
            folder.mkdir(parents=True, exist_ok=True)
            canvas.save(folder / f"{i:04d}.png")
    (staging / ".complete").touch()
    root.parent.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(root, ignore_errors=True)  # a tree left incomplete by a crash
    try:
        os.replace(staging, root)
    except OSError:
        # Another process wrote the same tree first; theirs is identical.
        shutil.rmtree(staging, ignore_errors=True)
        if not (root / ".complete").exists():
            raise
    return root

"""The embedded ablation task: scikit-learn's digits, shrunk and placed at random on a larger canvas.

The plain digits tree (data.write_digits) is centred, upsampled 8x8 strokes that cvt_digits learns to
99-100%, which leaves the studies nothing to tell apart. Here every digit is drawn at DIGIT_SIDE pixels at
a random place on a black CANVAS_SIDE canvas (one fixed place per image), which is what position
embedding and the convolutional token embedding are about, and the training set keeps TRAIN_PER_CLASS
images of each digit. Validation holds the same 364 digits as the plain tree (every fifth of each class).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from ..config import DIGITS_SIZE
from ..data import cache_folder, digit_image, load_digits, png_bytes
from ..files import publish_tree, staging_folder, write_new

CANVAS_SIDE = DIGITS_SIZE  # cvt_digits' input: the images need no resizing
DIGIT_SIDE = 22
TRAIN_PER_CLASS = 100
TASK_VERSION = 1
PLACEMENT_SEED = 17

# The budget every run of the embedded suite adds to the digits recipe (configs/digits.yaml): 10 epochs of
# 1,000 images with one warm-up epoch, so that four studies x 3 seeds, 30 runs, fit in about 15 minutes on
# two idle cores.
EMBEDDED_BUDGET = ("train.epochs=10", "sched.warmup_epochs=1")


def default_root() -> Path:
    return cache_folder(f"digits-ablate-v{TASK_VERSION}")


def write_task(root: str | Path | None = None) -> Path:
    """Write the task once as root/{train,val}/<digit>/<n>.png (default: under ~/.cache/torchcvt)."""
    root = default_root() if root is None else Path(root)
    if (root / ".complete").exists():
        return root
    digits = load_digits()
    rng = np.random.default_rng(PLACEMENT_SEED)
    staging = staging_folder(root)
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
            canvas = Image.new("L", (CANVAS_SIDE, CANVAS_SIDE))
            canvas.paste(digit_image(digits.images[i], DIGIT_SIDE), (int(corner[1]), int(corner[0])))
            write_new(staging / split / str(label) / f"{i:04d}.png", png_bytes(canvas))
    write_new(staging / ".complete", b"")
    publish_tree(staging, root)
    return root

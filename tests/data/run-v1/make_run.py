"""How run-v1/ was made, with torchcvt at commit c38adfb (training-checkpoint format 1, before typed run
records): a tiny cvt_digits trained 1 epoch with EMA on 3 digits (4 train, 2 val images each).
Kept as it was written: tests check that checkpoints of that code still load, resume and export.

    PYTHONPATH=src:tests python tests/data/run-v1/make_run.py  # writes /tmp/records-fix/old-run
"""

import shutil
from pathlib import Path

import torch
from trainkit import digits_tree, tiny_overrides

from torchcvt.engine import load_config, train

MODEL = {"embed_dim": [8, 8, 16], "num_heads": [1, 1, 2], "depth": [1, 1, 1]}

if __name__ == "__main__":
    torch.manual_seed(0)
    root = Path("/tmp/records-fix")
    data = digits_tree(root / "digits", classes=3, train_per_class=4, val_per_class=2)
    output = root / "old-run"
    shutil.rmtree(output, ignore_errors=True)
    overrides = tiny_overrides(data, output, **{
        "model.overrides": MODEL, "train.epochs": 1, "train.ema": True, "train.ema_decay": 0.5,
        "train.batch_size": 4,
    })
    torch.set_num_threads(1)
    train(load_config(None, overrides))

"""Host syncs: training reads device values once per logging interval, evaluation once in all."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from trainkit import digits_tree, tiny_overrides

import torchcvt.engine
from torchcvt.engine import Trainer, init_runtime, load_config

pytestmark = pytest.mark.usefixtures("one_thread")


def _count_reads(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Count the engine's calls that copy a tensor's value to the host (a device sync on a GPU).

    Only calls made by torchcvt.engine's own code count: torch's CPU optimiser and the CPU-side data
    pipeline read CPU tensors, which costs no device sync.
    """
    counts = {"n": 0}
    engine = str(Path(torchcvt.engine.__file__).parent)
    for name in ("item", "tolist", "__bool__", "__float__", "__int__"):
        original = getattr(torch.Tensor, name)

        def counted(self: torch.Tensor, *args: object, _original=original) -> object:
            if sys._getframe(1).f_code.co_filename.startswith(engine):
                counts["n"] += 1
            return _original(self, *args)

        monkeypatch.setattr(torch.Tensor, name, counted)
    return counts


def test_training_and_validation_read_the_device_once_per_interval(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = digits_tree(tmp_path / "data")
    # 24 images, batch 2: 12 steps an epoch, logged every 12; 12 validation batches of 1.
    extra = {"train.epochs": 2, "train.batch_size": 2, "train.log_every_steps": 12, "data.eval_batch_size": 1}
    trainer = Trainer.from_config(load_config(None, tiny_overrides(data, tmp_path / "run", **extra)),
                                  init_runtime("cpu"))
    counts = _count_reads(monkeypatch)
    trainer.run()
    # Per epoch: one read at the logging step, one at the epoch's end, one per evaluation and one for the
    # finite-weights check of the epoch's checkpoints; far below the 24 steps and 24 validation batches
    # that a read per step or per batch would cost.
    assert 0 < counts["n"] <= 2 * 4, counts

"""train() leaves global state as it found it; fp16 on CPU scales the loss."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib
import pytest
import torch
from trainkit import digits_tree, tiny_overrides

from torchcvt.engine import load_config, train

pytestmark = pytest.mark.usefixtures("one_thread")


def test_train_restores_global_state(tmp_path: Path) -> None:
    data = digits_tree(tmp_path / "data", classes=2, train_per_class=4, val_per_class=2)
    backend = matplotlib.get_backend()
    matplotlib.use("svg")  # a backend train() has no reason to touch
    benchmark = torch.backends.cudnn.benchmark
    try:
        train(load_config(None, tiny_overrides(data, tmp_path / "run", **{
            "train.epochs": 1, "train.deterministic": True, "train.batch_size": 2})))
        assert matplotlib.get_backend() == "svg"
        assert not torch.are_deterministic_algorithms_enabled()
        assert torch.backends.cudnn.benchmark == benchmark
        assert (tmp_path / "run" / "curves.png").read_bytes()[:4] == b"\x89PNG"
    finally:
        matplotlib.use(backend)


def test_fp16_on_cpu_trains_with_loss_scaling(tmp_path: Path) -> None:
    data = digits_tree(tmp_path / "data", classes=2, train_per_class=4, val_per_class=2)
    summary = train(load_config(None, tiny_overrides(data, tmp_path / "run", **{
        "train.epochs": 1, "train.amp": "fp16", "train.device": "cpu", "train.batch_size": 2})))
    state = torch.load(tmp_path / "run" / "last.pth", weights_only=True)
    # GradScaler starts at 2**16 and halves on each step whose fp16 gradients overflow, skipping that step:
    # a scale below 2**16 shows the loss was scaled and overflows were caught, finite weights that no
    # overflowed step was applied.
    assert state["global_step"] == 4
    halvings = math.log2(2.0**16 / state["scaler"]["scale"])
    assert halvings in (1, 2, 3, 4), state["scaler"]
    weights = [t for t in state["state_dict"].values() if t.is_floating_point()]
    assert all(torch.isfinite(t).all() for t in weights) and math.isfinite(summary["final_val_loss"])

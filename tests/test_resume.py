"""Exact resume: a run killed by SIGKILL mid-epoch, then resumed, ends with an uninterrupted run's weights."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from trainkit import digits_tree, tiny_overrides

from torchcvt.engine import load_config, train

pytestmark = pytest.mark.usefixtures("one_thread")


def _overrides(data: Path, output: Path) -> list[str]:
    # Random crops, mixup/cutmix, drop path and EMA: every random stream and every state that resume restores.
    return tiny_overrides(
        data,
        output,
        **{
            "aug.auto_augment": "rand-m9-mstd0.5-inc1",
            "aug.mixup": 0.8,
            "aug.cutmix": 1.0,
            "aug.re_prob": 0.25,
            "model.overrides": {
                "embed_dim": [16, 24, 32],
                "num_heads": [1, 1, 2],
                "depth": [1, 1, 1],
                "drop_path_rate": [0.0, 0.1, 0.2],
            },
            "train.ema": True,
            "train.ema_decay": 0.9,
            "train.epochs": 2,
            "train.checkpoint_every_steps": 2,
            "train.deterministic": True,
        },
    )


def test_sigkill_mid_epoch_then_resume_matches_an_uninterrupted_run(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    data = digits_tree(tmp_path / "data")
    reference = train(load_config(None, _overrides(data, tmp_path / "reference")))
    expected = torch.load(tmp_path / "reference" / "last.pth", weights_only=True)

    run = tmp_path / "run"
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src"),
    }
    process = subprocess.Popen(
        [sys.executable, "-m", "torchcvt", "train", *_overrides(data, run)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 240
    while not (run / "last.pth").exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, process.stderr.read().decode()
    killed = torch.load(run / "last.pth", weights_only=True)  # the atomic write left a whole checkpoint
    assert 2 <= killed["global_step"] < expected["global_step"]
    assert killed["step_in_epoch"] > 0  # mid-epoch: the sampler and RNG states carry the rest

    with caplog.at_level(logging.INFO, logger="torchcvt"):
        resumed = train(load_config(None, _overrides(data, run)))
    assert f"resuming from {run / 'last.pth'}" in caplog.text
    final = torch.load(run / "last.pth", weights_only=True)
    assert final["global_step"] == expected["global_step"]
    for key in ("state_dict", "ema"):
        for name, tensor in expected[key].items():
            assert torch.equal(final[key][name], tensor), f"{key}.{name} differs after resume"
    assert resumed["final_val_top1"] == reference["final_val_top1"]
    assert resumed["final_val_loss"] == reference["final_val_loss"]

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


def _positions_drawn(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int]]:
    """Spy on the real dataset: (epoch, position in the epoch) of every training image read from now on."""
    from torchcvt.data import ImageFolder

    drawn: list[tuple[int, int]] = []
    read = ImageFolder.__getitem__

    def spy(self: ImageFolder, item: int | tuple[int, int]):
        if isinstance(item, tuple):  # training items come with their seed, which encodes both
            drawn.append(divmod(item[1] % (1_000_003 * 100_000_007), 100_000_007))
        return read(self, item)

    monkeypatch.setattr(ImageFolder, "__getitem__", spy)
    return drawn


@pytest.mark.parametrize("new_batch", [8, 2])
def test_resume_mid_epoch_with_another_batch_size_starts_at_the_next_image(
    new_batch: int, tmp_path_factory: pytest.TempPathFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import json
    import shutil

    from trainkit import train_process

    root = tmp_path_factory.getbasetemp() / "resume_batch"
    data, killed_run = root / "data", root / "killed"
    if not (killed_run / "last.pth").exists():  # one real kill serves both batch sizes
        digits_tree(data, train_per_class=16)  # 48 images: 12 steps of 4 an epoch
        extra = {"train.checkpoint_every_steps": 1, "train.log_every_steps": 1}
        process = train_process(tiny_overrides(data, killed_run, **extra),
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 240
        while process.poll() is None and time.monotonic() < deadline:
            if (killed_run / "last.pth").exists():
                break
            time.sleep(0.01)
        process.send_signal(signal.SIGKILL)
        process.wait()
        assert process.returncode == -signal.SIGKILL, process.stderr.read().decode()
    killed = torch.load(killed_run / "last.pth", weights_only=True)
    assert killed["epoch"] == 0 and 0 < killed["step_in_epoch"] < 12, killed["step_in_epoch"]
    done = 4 * killed["step_in_epoch"]  # images of epoch 1 the killed run trained on

    run = tmp_path / "run"
    shutil.copytree(killed_run, run)
    drawn = _positions_drawn(monkeypatch)
    overrides = tiny_overrides(data, run, **{"train.batch_size": new_batch, "train.log_every_steps": 1})
    train(load_config(None, overrides))
    # Epoch 1 goes on at the first image the killed run did not train on, and none is drawn twice; the
    # last whole batch ends the epoch (drop_last); epoch 2 draws all 48.
    first_epoch = [position for epoch, position in drawn if epoch == 0]
    assert first_epoch == list(range(done, done + (48 - done) // new_batch * new_batch))
    assert [position for epoch, position in drawn if epoch == 1] == list(range(48))
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    epochs = [r["epoch"] for r in records if r["kind"] == "train"]
    assert epochs == sorted(epochs) and epochs[-1] == 2.0, epochs

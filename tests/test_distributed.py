"""Two Gloo processes under torchrun train the same weights as one process with the same global batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from trainkit import digits_tree, tiny_overrides, train_on_one_thread

SRC = str(Path(__file__).resolve().parents[1] / "src")


def _overrides(data: Path, output: Path, batch: int) -> list[str]:
    # BatchNorm-free projections ('avg'): per-rank batch statistics would otherwise differ by design.
    return tiny_overrides(
        data,
        output,
        **{
            "train.batch_size": batch,
            "train.epochs": 2,
            "aug.scale": [0.5, 1.0],
            "model.overrides": {
                "embed_dim": [16, 24, 32],
                "num_heads": [1, 1, 2],
                "depth": [1, 1, 1],
                "qkv_projection_method": ["avg", "avg", "avg"],
            },
        },
    )


def _torchrun(nproc: int, overrides: list[str], check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": SRC}
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        "-m",
        "torchcvt",
        "train",
        *overrides,
    ]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    if check:
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def test_two_gloo_processes_match_one_process(tmp_path: Path) -> None:
    data = digits_tree(tmp_path / "data")
    train_on_one_thread(_overrides(data, tmp_path / "one", batch=8))  # as each torchrun worker
    _torchrun(2, _overrides(data, tmp_path / "two", batch=4))
    one = torch.load(tmp_path / "one" / "last.pth", weights_only=True)
    two = torch.load(tmp_path / "two" / "last.pth", weights_only=True)
    assert one["global_step"] == two["global_step"] == 6 and two["world_size"] == 2
    # Each rank draws its own random numbers (DropPath, mixup); rank 0 those of one process.
    assert not torch.equal(two["rng"][0]["torch"], two["rng"][1]["torch"])
    for name, tensor in one["state_dict"].items():
        torch.testing.assert_close(two["state_dict"][name], tensor, rtol=1e-4, atol=1e-5, msg=name)
    # Rank 0 alone logs; validation metrics are summed over both ranks' shards.
    val_one = [json.loads(line) for line in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    val_two = [json.loads(line) for line in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    val_one, val_two = ([r for r in records if r["kind"] == "val"] for records in (val_one, val_two))
    assert len(val_two) == 2
    assert [r["top1"] for r in val_two] == [r["top1"] for r in val_one]
    summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert summary["world_size"] == 2


@pytest.mark.slow
def test_a_failure_on_one_rank_stops_every_rank_with_its_message(tmp_path: Path) -> None:
    """A strict-mode unreadable image that only one rank reads: the run ends at once, naming the file."""
    data = digits_tree(tmp_path / "data")
    good = next((data / "train" / "1").glob("*.png"))
    (data / "train" / "1" / "broken.png").write_bytes(good.read_bytes()[:60])
    started = time.monotonic()
    result = _torchrun(2, ["--strict", *_overrides(data, tmp_path / "run", batch=4)], check=False)
    assert result.returncode != 0
    assert time.monotonic() - started < 120
    errors = [line for line in result.stderr.splitlines() if line.startswith("torchcvt train: error:")]
    assert len(errors) == 2, result.stderr[-3000:]  # every rank stops with the same message
    assert all("broken.png" in line and "data.strict stops the run" in line for line in errors), (
        result.stderr[-3000:]
    )


@pytest.mark.slow
def test_a_rank_with_nothing_readable_steps_in_time_with_the_others(tmp_path: Path) -> None:
    """Batches of one image: the rank that draws the unreadable one steps with weight 0, nobody waits."""
    data = digits_tree(tmp_path / "data")
    good = next((data / "train" / "1").glob("*.png"))
    (data / "train" / "1" / "broken.png").write_bytes(good.read_bytes()[:60])
    _torchrun(2, _overrides(data, tmp_path / "run", batch=1))
    state = torch.load(tmp_path / "run" / "last.pth", weights_only=True)
    assert state["global_step"] == 2 * 13  # 25 images padded to 26: 13 steps per epoch on each rank
    assert all(torch.isfinite(v).all() for v in state["state_dict"].values() if v.is_floating_point())

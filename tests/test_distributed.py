"""Two Gloo processes under torchrun train the same weights as one process with the same global batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from trainkit import digits_tree, tiny_overrides

from torchcvt.engine import load_config, train

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


def _torchrun(nproc: int, overrides: list[str]) -> None:
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
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def test_two_gloo_processes_match_one_process(tmp_path: Path) -> None:
    data = digits_tree(tmp_path / "data")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each torchrun worker (OMP_NUM_THREADS=1)
    try:
        train(load_config(None, _overrides(data, tmp_path / "one", batch=8)))
    finally:
        torch.set_num_threads(threads)
    _torchrun(2, _overrides(data, tmp_path / "two", batch=4))
    one = torch.load(tmp_path / "one" / "last.pth", weights_only=True)
    two = torch.load(tmp_path / "two" / "last.pth", weights_only=True)
    assert one["global_step"] == two["global_step"] == 6 and two["world_size"] == 2
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

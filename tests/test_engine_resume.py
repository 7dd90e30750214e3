"""Resuming with a changed config: the schedule and optimiser follow the new config; some changes cannot."""

from __future__ import annotations

import json
import logging
import math
import shutil
from pathlib import Path

import pytest
import torch
from trainkit import digits_tree, tiny_overrides, train_on_one_thread

from torchcvt.engine import load_config, train

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("resume")
    data = digits_tree(root / "data")
    train_on_one_thread(tiny_overrides(data, root / "run", **{"train.epochs": 2}))
    return data, root / "run"


def test_extending_a_run_follows_the_new_schedule_and_hyper_parameters(
    finished: tuple[Path, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    data, done = finished
    run = tmp_path / "run"
    shutil.copytree(done, run)
    new = {"train.epochs": 4, "optim.lr": 4e-3, "optim.weight_decay": 0.01, "optim.betas": [0.8, 0.99]}
    with caplog.at_level(logging.INFO, logger="torchcvt"):
        train(load_config(None, tiny_overrides(data, run, **new)))
    notice = next(r.getMessage() for r in caplog.records if "changed config" in r.getMessage())
    for key in ("train.epochs: 2 -> 4", "optim.lr: 0.002 -> 0.004", "optim.weight_decay: 0.05 -> 0.01",
                "optim.betas: [0.9, 0.999] -> [0.8, 0.99]"):
        assert key in notice, notice
    # 24 images / batch 4 = 6 steps an epoch; the cosine now spans 4 epochs from lr 4e-3 (no warm-up).
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    later = [r for r in records if r["kind"] == "train" and r["step"] > 12]
    assert later, records
    for r in later:
        expected = 1e-5 + 0.5 * (4e-3 - 1e-5) * (1 + math.cos(math.pi * r["step"] / 24))
        assert r["lr"] == pytest.approx(expected, rel=1e-6), r
    state = torch.load(run / "last.pth", weights_only=True)
    assert state["global_step"] == 24
    groups = state["optimizer"]["param_groups"]
    assert {g["weight_decay"] for g in groups} == {0.0, 0.01}
    assert all(tuple(g["betas"]) == (0.8, 0.99) for g in groups)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"model.freeze_stages": 1}, "model.freeze_stages is 0 there but 1 in this config"),
        ({"optim.opt": "sgd"}, "optim.opt is 'adamw' there but 'sgd' in this config"),
        ({"model.overrides": {"embed_dim": [16, 24, 32], "num_heads": [1, 1, 2], "depth": [1, 1, 2]}},
         r"model depth is \[1, 1, 1\] there but \[1, 1, 2\] in this config"),
        ({"model.overrides": {"embed_dim": [16, 24, 32], "num_heads": [1, 1, 2], "depth": [1, 1, 1],
                              "layer_norm_eps": 1e-6}},
         "model layer_norm_eps is 1e-05 there but 1e-06 in this config"),
        ({"classes": True},
         r"trained on 3 classes \['0', '1', '2'\] but the data has 2 classes \['0', '1'\]"),
    ],
)
def test_a_change_that_cannot_continue_the_run_is_one_line(
    change: dict, message: str, finished: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    import re

    from torchcvt.cli import main

    data, done = finished
    if change.pop("classes", False):
        data_copy = tmp_path / "data"
        shutil.copytree(data, data_copy)
        shutil.rmtree(data_copy / "train" / "2")
        shutil.rmtree(data_copy / "val" / "2")
        data = data_copy
    argv = tiny_overrides(data, tmp_path / "run", **change)
    assert main(["train", *argv, f"train.resume={done / 'last.pth'}"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "cannot resume from" in err and re.search(message, err), err
    assert not (tmp_path / "run" / "last.pth").exists()

"""One config path: `train` and `ablate` resolve the same config from the same command line, the recipe line
shows the values a run uses, and docs/finetune.md's step 3 rerun (finished or interrupted) resumes."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from trainkit import digits_tree

from torchcvt.ablate import prepare
from torchcvt.cli import main
from torchcvt.engine import read_training_state
from torchcvt.engine.resolve import resolve_config
from torchcvt.typed import UNSET, describe_changes, differences

# Fast settings every run here adds to its recipe: no worker processes, a small model.
FAST = ["data.workers=0", "data.persistent_workers=false", "train.quiet=true",
        'model.overrides.embed_dim=[16, 24, 32]', "model.overrides.num_heads=[1, 1, 2]"]


def test_ablate_resolves_the_config_train_does(tmp_path, capsys) -> None:
    """`ablate --data DIR train.epochs=2` is the config `train --data DIR train.epochs=2` runs (it used to
    keep the recipe's 100 epochs, then fail on the warm-up)."""
    data = digits_tree(tmp_path / "data")
    trained = resolve_config(None, ["train.epochs=2"], data=data).config
    ablated, recipe = prepare(None, ["train.epochs=2"], data)
    assert ablated == trained
    assert (trained.train.epochs, trained.sched.warmup_epochs) == (2, 1.0)  # the warm-up fits the length
    assert recipe.settings["train.epochs"] == 2
    assert main(["ablate", "--data", str(data), "--study", "kv-stride", "--output", str(tmp_path / "out"),
                 "train.epochs=2", "--dry-run"]) == 0
    assert main(["train", "--data", str(data), "train.epochs=2", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "recipe: from scratch (no --pretrained): cvt_digits, 2 epochs at batch 6" in out


def test_recipe_line_shows_the_values_used(tmp_path, capsys) -> None:
    data = digits_tree(tmp_path / "data")
    argv = ["train", "--data", str(data), "--pretrained", "cvt_13.ms_in1k", "--dry-run"]
    assert main([*argv, "optim.lr=0.03", "train.batch_size=4", "train.epochs=3"]) == 0
    line = capsys.readouterr().out.splitlines()[0]
    assert line.startswith("recipe: fine-tune (weights given: cvt_13.ms_in1k): SGD lr 0.03, 3 epochs at "
                           "batch 4")
    assert main([*argv, "optim.opt=adamw"]) == 0
    assert "AdamW lr 0.003, 30 epochs at batch 6" in capsys.readouterr().out.splitlines()[0]


def test_typed_differences() -> None:
    old = {"model": {"name": "cvt_13", "overrides": {}}, "optim": {"betas": (0.9, 0.999)}}
    new = {"model": {"name": "cvt_13", "overrides": {"depth": [1, 2, 3]}}, "optim": {"betas": [0.9, 0.99]},
           "train.output": "x"}
    changes = differences(old, new, ignore=["train"])
    assert changes == {"model.overrides.depth": (UNSET, [1, 2, 3]),
                       "optim.betas": ([0.9, 0.999], [0.9, 0.99])}
    assert describe_changes(changes, 1) == "model.overrides.depth: unset -> [1, 2, 3] and 1 more"
    # Flat dotted keys and nested sections compare alike (suite.json holds flat ones).
    assert differences({"model.overrides": {"depth": [1]}}, {"model": {"overrides": {"depth": [1]}}}) == {}


@pytest.fixture(scope="module")
def pretrained_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """docs/finetune.md's step 2 in small: a model with its own depth and activation, trained on 0-2."""
    tmp = tmp_path_factory.mktemp("pretrained")
    data = digits_tree(tmp / "digits-0-2", train_per_class=4, val_per_class=2)
    out = tmp / "runs" / "digits-0-2"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(["train", "--data", str(data), "--output", str(out), *FAST, "train.epochs=1",
                     "aug.hflip=0", "model.overrides.activation=gelu",
                     "model.overrides.depth=[1, 2, 3]"]) == 0
    finally:
        torch.set_num_threads(threads)
    return out / "best.pth"


def _step3(tmp_path: Path, weights: Path) -> list[str]:
    data = tmp_path / "digits-5-7"
    if not data.exists():
        digits_tree(data, labels=[5, 6, 7], train_per_class=4, val_per_class=2)
    return ["train", "--data", str(data), "--output", str(tmp_path / "runs" / "digits-5-7"), *FAST,
            f"model.checkpoint={weights}", "train.epochs=2", "aug.hflip=0", "optim.lr=0.03"]


def test_finetune_rerun_of_a_finished_run_says_it_is_finished(tmp_path, pretrained_run, caplog,
                                                               one_thread) -> None:
    argv = _step3(tmp_path, pretrained_run)
    assert main(argv) == 0
    last = tmp_path / "runs" / "digits-5-7" / "last.pth"
    saved = read_training_state(last)
    # The config records the architecture it adopted from the checkpoint.
    assert saved.train_config["model"]["overrides"]["depth"] == [1, 2, 3]
    assert saved.train_config["model"]["overrides"]["activation"] == "gelu"
    assert saved.config["depth"] == [1, 2, 3]
    with caplog.at_level(logging.INFO, logger="torchcvt"):
        assert main(argv) == 0
    assert "is already finished (2 epochs); nothing to do" in caplog.text
    assert "changed config" not in caplog.text
    assert read_training_state(last).global_step == saved.global_step


def test_finetune_rerun_of_an_interrupted_run_resumes(tmp_path, pretrained_run, caplog, monkeypatch,
                                                       one_thread) -> None:
    from torchcvt.engine.snapshot import Checkpointer

    argv = _step3(tmp_path, pretrained_run)
    save = Checkpointer.save

    def save_then_stop(self, name, epoch, epoch_images, left_out):
        save(self, name, epoch, epoch_images, left_out)
        if name == "last.pth":
            raise KeyboardInterrupt  # as Ctrl-C right after the first epoch's checkpoint

    monkeypatch.setattr(Checkpointer, "save", save_then_stop)
    assert main(argv) == 130  # interrupted
    monkeypatch.setattr(Checkpointer, "save", save)
    last = tmp_path / "runs" / "digits-5-7" / "last.pth"
    assert read_training_state(last).epoch == 1
    with caplog.at_level(logging.INFO, logger="torchcvt"):
        assert main(argv) == 0
    assert f"resuming from {last} at epoch 2" in caplog.text
    assert "changed config" not in caplog.text
    state = read_training_state(last)
    assert state.epoch == 2
    summary = json.loads((last.parent / "summary.json").read_text())
    assert summary["epochs"] == 2
    assert any(key.startswith("stage2.blocks.2.") for key in state.state_dict)  # the adopted depth


def test_finetune_run_written_before_adoption_resumes_quietly(tmp_path, pretrained_run, caplog,
                                                              one_thread) -> None:
    """A run made before configs recorded the adopted architecture: its train_config has no model
    overrides, its model config has the checkpoint's; resuming it reports no change."""
    from torchcvt.engine.state import save_training_state

    argv = _step3(tmp_path, pretrained_run)
    argv[argv.index("train.epochs=2")] = "train.epochs=1"
    assert main(argv) == 0
    last = tmp_path / "runs" / "digits-5-7" / "last.pth"
    state = read_training_state(last)
    state.train_config["model"]["overrides"] = {}
    save_training_state(state, last)
    (last.parent / "summary.json").unlink()
    argv[argv.index("train.epochs=1")] = "train.epochs=2"
    with caplog.at_level(logging.INFO, logger="torchcvt"):
        assert main(argv) == 0
    notice = next(r.getMessage() for r in caplog.records if "changed config" in r.getMessage())
    assert notice.endswith("train.epochs: 1 -> 2"), notice

"""Every checkpoint `torchcvt train` writes, with any model.overrides, reloads in eval and predict."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from trainkit import digits_tree, tiny_overrides, train_on_one_thread

from torchcvt import Predictor
from torchcvt.cli import main
from torchcvt.factory import model_from_checkpoint
from torchcvt.weights import save_official

pytestmark = pytest.mark.usefixtures("one_thread")

OVERRIDES = {"embed_dim": [16, 24, 32], "num_heads": [1, 1, 2], "depth": [1, 2, 1], "layer_norm_eps": 1e-6,
             "mlp_ratio": [2.0, 2.0, 2.0]}


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict]:
    root = tmp_path_factory.mktemp("reload")
    data = digits_tree(root / "data")
    summary = train_on_one_thread(tiny_overrides(data, root / "run", **{"model.overrides": OVERRIDES,
                                                                         "train.epochs": 1}))
    return data, root / "run" / "best.pth", summary


def test_model_from_checkpoint_rebuilds_the_trained_architecture(run: tuple[Path, Path, dict]) -> None:
    _, checkpoint, _ = run
    model = model_from_checkpoint("cvt_digits", checkpoint)
    assert model.config.layer_norm_eps == 1e-6 and model.config.depth == (1, 2, 1)
    assert model.config.mlp_ratio == (2.0, 2.0, 2.0) and model.num_classes == 3
    state = torch.load(checkpoint, weights_only=True)["state_dict"]
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, state[name]), name
    # The variant's name is optional: the checkpoint records it.
    assert model_from_checkpoint(None, checkpoint).config.depth == (1, 2, 1)
    backbone = model_from_checkpoint("cvt_digits", checkpoint, features_only=True)
    assert backbone.model.config.layer_norm_eps == 1e-6


def test_eval_and_predict_reload_a_run_trained_with_overrides(
    run: tuple[Path, Path, dict], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    data, checkpoint, summary = run
    code = main(["eval", "--model", "cvt_digits", "--checkpoint", str(checkpoint),
                 "--data", str(data / "val"), "--output", str(tmp_path), "--workers", "0"])
    assert code == 0, capsys.readouterr().err
    report = json.loads((tmp_path / "eval_val.json").read_text())
    assert report["top1"] == pytest.approx(summary["best_val_top1"])
    predictor = Predictor.create("cvt_digits", checkpoint)
    assert predictor.model.config.layer_norm_eps == 1e-6 and predictor.class_names == ["0", "1", "2"]
    image = next((data / "val" / "1").glob("*.png"))
    assert main(["predict", "--model", "cvt_digits", "--checkpoint", str(checkpoint), str(image),
                 "--json", str(tmp_path / "p.json"), "--quiet"]) == 0


def test_eval_never_reinitialises_a_head_of_another_size(
    run: tuple[Path, Path, dict], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """An official .pth names no classes: its head must fit the data folder's classes."""
    data, checkpoint, _ = run
    official = tmp_path / "official.pth"
    model = model_from_checkpoint("cvt_digits", checkpoint, num_classes=5)
    save_official(model, official)
    argv = ["eval", "--model", "cvt_digits", "--checkpoint", str(official), "--data", str(data / "val"),
            "--workers", "0", "--output", str(tmp_path)]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "has a 5-class head but" in err and "3 class folders" in err, err


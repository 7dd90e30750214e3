"""Training: the embedded digits run, configs and overrides, the recipe's pieces, and every bad input."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from trainkit import TINY_MODEL, digits_tree, tiny_overrides

from torchcvt import create_model
from torchcvt.cli import main
from torchcvt.engine import TrainConfig, load_config, param_groups, save_training_state, train

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return digits_tree(tmp_path_factory.mktemp("digits"))


def _cli_error(capsys: pytest.CaptureFixture, argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("torchcvt train: error: ") and "\n" not in err, err
    return err


def test_embedded_digits_train_a_shortened_demo(tmp_path: Path) -> None:
    """No dataset given: the digits are written once as an ImageFolder tree and cvt_digits learns them."""
    summary = train(
        load_config(
            None,
            [
                f"data.digits_root={tmp_path / 'digits'}",
                f"train.output={tmp_path / 'run'}",
                "train.epochs=1",
                "train.quiet=true",
                "sched.warmup_epochs=0",
            ],
        )
    )
    root = tmp_path / "digits"
    assert (root / ".complete").exists()
    assert (
        sum(1 for _ in (root / "train").rglob("*.png")) + sum(1 for _ in (root / "val").rglob("*.png"))
        == 1797
    )
    assert summary["best_val_top1"] > 0.5, summary  # chance is 0.1; the full demo reaches >= 0.98
    run = tmp_path / "run"
    saved = json.loads((run / "summary.json").read_text())
    for key in ("best_val_top1", "final_val_top1", "best_val_top5", "final_val_top5"):
        assert 0.0 <= saved[key] <= 1.0
    assert saved["epochs"] == 1 and saved["wall_seconds"] > 0 and saved["images_per_second"] > 0
    assert (run / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records if r["kind"] == "val"] == [1]
    # The best checkpoint loads through create_model like any other checkpoint, with its class list.
    best = torch.load(run / "best.pth", weights_only=True)
    assert best["class_names"] == [str(d) for d in range(10)] and best["model_name"] == "cvt_digits"
    model = create_model("cvt_digits", num_classes=10, checkpoint=run / "best.pth")
    torch.testing.assert_close(model.state_dict()["head.weight"], best["state_dict"]["head.weight"])


def test_every_config_file_loads_and_digits_is_the_embedded_recipe() -> None:
    # The official recipes are checked field by field in test_recipes.py.
    # Fine-tuning recipes need starting weights (any path: the file is read when training starts).
    configs = {f.stem: load_config(f, values={"model.checkpoint": "w.pth"} if "require_weights: true" in
                                   f.read_text() else None) for f in sorted(CONFIGS.glob("*.yaml"))}
    assert {"cvt-13-224", "cvt-13-384", "cvt-21-224", "cvt-21-384", "cvt-w24-384"} <= set(configs)
    assert configs["digits"] == load_config(None)


def test_overrides_are_typed_and_unknown_keys_suggest_the_closest(tmp_path: Path) -> None:
    cfg = load_config(
        CONFIGS / "cvt-13-224.yaml", ["optim.lr=1e-3", "train.epochs=70", "model.overrides.depth=[1,1,1]"]
    )
    assert cfg.optim.lr == 1e-3 and cfg.train.epochs == 70
    assert cfg.model.overrides == {"drop_path_rate": [0.0, 0.0, 0.1], "depth": [1, 1, 1]}
    with pytest.raises(
        ValueError, match=r"unknown config key 'optim.lrr' in the command line; did you mean 'optim.lr'"
    ):
        load_config(None, ["optim.lrr=1"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  epoch: 3\n")
    with pytest.raises(
        ValueError, match=r"unknown config key 'train.epoch' in .*bad.yaml; did you mean 'train.epochs'"
    ):
        load_config(bad)


def test_unknown_key_on_the_command_line_is_one_line(capsys: pytest.CaptureFixture) -> None:
    err = _cli_error(capsys, ["train", "sched.warmup_epoch=3"])
    assert "did you mean 'sched.warmup_epochs'?" in err


def test_param_groups_exempt_norms_biases_and_tokens_and_decay_by_layer() -> None:
    model = create_model("cvt_13", num_classes=5, **TINY_MODEL)
    names = {id(p): n for n, p in model.named_parameters()}
    groups = param_groups(model, 0.05)
    no_decay = {names[id(p)] for g in groups if g["weight_decay"] == 0 for p in g["params"]}
    decay = {names[id(p)] for g in groups if g["weight_decay"] > 0 for p in g["params"]}
    assert "stage2.cls_token" in no_decay and "norm.weight" in no_decay and "head.bias" in no_decay
    assert "stage0.blocks.0.attn.conv_proj_q.bn.weight" in no_decay
    assert "head.weight" in decay and "stage1.blocks.0.attn.proj_q.weight" in decay
    assert len(no_decay) + len(decay) == sum(1 for _ in model.parameters())
    layered = param_groups(model, 0.05, layer_decay=0.5)
    scale = {names[id(p)]: g["lr_scale"] for g in layered for p in g["params"]}
    # timm's numbering from model.group_matcher: the stem, one layer per block (a stage's token embedding
    # and class token join its first block, the final norm the last block), then the head.
    assert scale["head.weight"] == 1.0
    assert scale["norm.weight"] == scale["stage2.blocks.0.mlp.fc1.weight"] == scale["stage2.cls_token"] == 0.5
    assert scale["stage1.patch_embed.proj.weight"] == scale["stage1.blocks.0.attn.proj_q.weight"] == 0.5**2
    assert scale["stage0.blocks.0.mlp.fc1.weight"] == 0.5**3
    assert scale["stage0.patch_embed.proj.weight"] == 0.5**4
    # The same scales as timm's own layer decay over the same model.
    from timm.optim import create_optimizer_v2

    timm_scale = {names[id(p)]: g["lr_scale"] for g in create_optimizer_v2(
        model, "adamw", lr=1e-3, weight_decay=0.05, layer_decay=0.5).param_groups for p in g["params"]}
    assert timm_scale == pytest.approx(scale)


def test_lr_scales_with_global_batch_and_frozen_stages_stay(tmp_path: Path, data: Path) -> None:
    from torchcvt.engine import Trainer, init_runtime

    cfg = load_config(
        None,
        tiny_overrides(
            data,
            tmp_path,
            **{"optim.lr": None, "optim.base_lr": 2.5e-4, "train.batch_size": 8, "model.freeze_stages": 1},
        ),
    )
    trainer = Trainer.from_config(cfg, init_runtime("cpu"))
    assert math.isclose(trainer.lr, 2.5e-4 * 8 / 256)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.run()
    after = trainer.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith("stage0."))
    assert not torch.equal(before["stage1.blocks.0.mlp.fc1.weight"], after["stage1.blocks.0.mlp.fc1.weight"])


def test_unreadable_images_are_skipped_and_counted_or_stop_with_strict(
    tmp_path: Path, data: Path, capsys: pytest.CaptureFixture, caplog: pytest.LogCaptureFixture
) -> None:
    import shutil

    tree = tmp_path / "data"
    shutil.copytree(data, tree)
    good = next((tree / "train" / "1").glob("*.png"))
    (tree / "train" / "1" / "broken.png").write_bytes(good.read_bytes()[:60])  # truncated PNG
    summary = train(load_config(None, tiny_overrides(tree, tmp_path / "run", **{"train.epochs": 1})))
    assert summary["skipped_images"] == 1
    assert "skipped unreadable image" in caplog.text
    argv = [
        "train",
        "--strict",
        "--output",
        str(tmp_path / "strict"),
        *tiny_overrides(tree, tmp_path / "strict"),
    ]
    err = _cli_error(capsys, argv)
    assert "broken.png" in err and "data.strict stops the run" in err


def test_non_finite_loss_stops_naming_the_step(
    tmp_path: Path, data: Path, capsys: pytest.CaptureFixture
) -> None:
    # An absurd LR blows the weights up after the first update, so the second step's loss is not finite.
    argv = [
        "train",
        *tiny_overrides(
            data,
            tmp_path / "run",
            **{"optim.lr": 1e30, "sched.warmup_epochs": 0, "train.checkpoint_every_steps": 1},
        ),
    ]
    err = _cli_error(capsys, argv)
    assert "loss is nan at step 2" in err or "loss is inf at step 2" in err, err
    kept = torch.load(tmp_path / "run" / "last.pth", weights_only=True)
    assert kept["global_step"] == 1 and all(
        torch.isfinite(v).all() for v in kept["state_dict"].values() if v.is_floating_point()
    )


def test_failed_checkpoint_write_leaves_the_previous_one(tmp_path: Path) -> None:
    path = tmp_path / "last.pth"
    save_training_state({"step": 1, "w": torch.ones(3)}, path)
    with pytest.raises(Exception):  # noqa: B017 - whatever pickling raises, the old file must survive
        save_training_state({"step": 2, "w": torch.zeros(3), "bad": lambda: None}, path)
    assert torch.load(path, weights_only=True)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.pth"]


def _make_bad_inputs(tmp_path: Path, data: Path) -> dict[str, tuple[list[str], str]]:
    import shutil

    empty = tmp_path / "empty"
    (empty / "train").mkdir(parents=True)
    (empty / "val").mkdir()
    other = tmp_path / "other"
    shutil.copytree(data, other)
    shutil.rmtree(other / "val" / "2")
    wrong = tmp_path / "wrong.pth"
    other_model = create_model(
        "cvt_13", num_classes=3, embed_dim=[16, 32, 48], num_heads=[1, 2, 3], depth=[1, 1, 2]
    )
    save_training_state(
        {
            "state_dict": other_model.state_dict(),
            "model_name": "cvt_13",
            "config": other_model.config.to_dict(),
            # The rest of a training checkpoint, so resuming reaches the architecture check.
            **{"optimizer": {}, "scheduler": {}, "epoch": 1, "step_in_epoch": 0, "global_step": 3, "rng": []},
        },
        wrong,
    )
    out = str(tmp_path / "run")
    return {
        "missing": (
            tiny_overrides(tmp_path / "nowhere", tmp_path / "run"),
            "data folder .*nowhere/train does not exist",
        ),
        "empty": (tiny_overrides(empty, tmp_path / "run"), "data folder .*empty/train is empty"),
        "classes": (
            tiny_overrides(other, tmp_path / "run"),
            r"val classes differ from train's .* missing from val \['2'\]",
        ),
        "batch": (
            tiny_overrides(data, tmp_path / "run", **{"train.batch_size": 64}),
            "train.batch_size=64 is larger than the 24 training images",
        ),
        "variant": (
            tiny_overrides(data, tmp_path / "run", **{"model.checkpoint": str(wrong)}),
            "wrong.pth was saved from another architecture",
        ),
        "resume": (
            [*tiny_overrides(data, tmp_path / "run"), f"train.resume={wrong}"],
            "cannot resume from .*wrong.pth: model embed_dim is",
        ),
        "config": (
            ["--config", str(tmp_path / "none.yaml"), f"train.output={out}"],
            "config file .*none.yaml does not exist",
        ),
    }


@pytest.mark.parametrize("case", ["missing", "empty", "classes", "batch", "variant", "resume", "config"])
def test_bad_input_is_one_line_before_training(
    case: str, tmp_path: Path, data: Path, capsys: pytest.CaptureFixture
) -> None:
    argv, pattern = _make_bad_inputs(tmp_path, data)[case]
    err = _cli_error(capsys, ["train", *argv])
    import re

    assert re.search(pattern, err), err
    assert not (tmp_path / "run" / "last.pth").exists()


def test_defaults_are_the_cvt13_recipe() -> None:
    defaults = TrainConfig()
    assert defaults.optim.base_lr == 2.5e-4 and defaults.sched.warmup_lr == 1e-6
    assert defaults.model.name == "cvt_13" and defaults.train.batch_size == 256

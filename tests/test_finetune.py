"""The fine-tuning path of `torchcvt train`: starting weights by tag or file, a new head for the data's
classes, runs counted in steps at a fixed total batch (the paper's transfer protocol), recipes chosen for a
bare --data, and the one-line errors that keep a run from silently training the wrong thing."""

import json
import re
from pathlib import Path

import pytest
import torch
from trainkit import TINY_MODEL, digits_tree, tiny_overrides, train_on_one_thread

from torchcvt.cli import main
from torchcvt.engine import build_components, dry_run, init_runtime, load_config, train
from torchcvt.engine.evaluate import evaluate
from torchcvt.engine.recipes import SIZE_BANDS, choose_recipe, size_band
from torchcvt.engine.state import read_training_state

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TRANSFER = [CONFIGS / f"transfer-{name}.yaml" for name in ("cifar10", "cifar100", "pets", "flowers")]


def _error(capsys: pytest.CaptureFixture, argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"torchcvt {argv[0]}: error: ") and "\n" not in err, err
    return err


def _transfer_overrides(data: Path, output: Path, checkpoint: Path, steps: int, warmup: int) -> list[str]:
    """The transfer recipe shrunk to CPU: tiny cvt_digits, a total batch of 16, `steps` steps."""
    values = {
        "model.name": "cvt_digits",
        "model.overrides": TINY_MODEL,
        "model.checkpoint": str(checkpoint),
        "data.train": str(data / "train"),
        "data.val": str(data / "val"),
        "data.workers": 0,
        "data.persistent_workers": False,
        "aug.scale": [0.75, 1.0],  # digits: a gentler crop and no mirroring (a mirrored digit is another)
        "aug.hflip": 0.0,
        "optim.lr": 0.03,
        "sched.warmup_steps": warmup,
        "train.steps": steps,
        "train.global_batch": 16,
        "train.amp": "none",
        "train.output": str(output),
        "train.quiet": True,
        "train.log_every_steps": 1,
        "train.checkpoint_every_steps": 0,
    }
    return [f"{key}={json.dumps(value)}" for key, value in values.items()]


@pytest.fixture(scope="module")
def digits_checkpoint(tmp_path_factory) -> Path:
    """A tiny cvt_digits trained here on digits 0-4: the weights the transfer test starts from."""
    root = tmp_path_factory.mktemp("pretrain")
    data = digits_tree(root / "data", train_per_class=40, val_per_class=10, labels=[0, 1, 2, 3, 4])
    # The digits recipe's augmentation (a mirrored digit is another digit).
    extra = {
        "train.epochs": 6,
        "train.batch_size": 16,
        "optim.lr": 5e-3,
        "aug.scale": [0.75, 1.0],
        "aug.hflip": 0.0,
        "aug.color_jitter": None,
    }
    summary = train_on_one_thread(tiny_overrides(data, root / "run", **extra))
    assert summary["best_val_top1"] > 0.8
    return root / "run" / "best.pth"


def test_transfer_config_fine_tunes_a_digits_checkpoint_by_steps(tmp_path, digits_checkpoint, one_thread):
    # The held-out task: digits 5-9, five classes like the checkpoint's, so only their names tell that
    # the head must be new.
    data = digits_tree(tmp_path / "data", train_per_class=20, val_per_class=10, labels=[5, 6, 7, 8, 9])
    steps, warmup = 27, 4
    cfg = load_config(
        CONFIGS / "transfer-cifar10.yaml",
        _transfer_overrides(data, tmp_path / "run", digits_checkpoint, steps, warmup),
    )
    assert (cfg.train.steps, cfg.train.global_batch, cfg.optim.opt, cfg.optim.clip_grad) == (
        steps,
        16,
        "sgd",
        1.0,
    )
    parts = build_components(cfg, init_runtime("cpu"))
    before = evaluate(parts.model, parts.val_loader, torch.device("cpu"), 5, init_runtime("cpu"))["top1"]
    assert parts.model.pretrained_cfg["label_names"] == ("5", "6", "7", "8", "9")
    summary = train(cfg)
    assert (
        summary["steps"] == steps and summary["epochs"] == 5
    )  # 6 steps an epoch (100 images / 16): the fifth stops after 3
    state = read_training_state(tmp_path / "run" / "last.pth")
    assert (
        state.class_names == ["5", "6", "7", "8", "9"] and state.state_dict["head.weight"].shape[0] == 5
    )
    # The body starts from the checkpoint; the head does not.
    start = read_training_state(digits_checkpoint).state_dict
    rebuilt = build_components(
        cfg.override({"train.output": str(tmp_path / "fresh")}), init_runtime("cpu")
    ).model
    rebuilt_state = rebuilt.state_dict()
    body = sorted(key for key in start if not key.startswith("head."))
    assert sorted(key for key in rebuilt_state if not key.startswith("head.")) == body
    assert len(body) > 100, "every tensor of the body: weights, biases, BatchNorm statistics, class token"
    changed = [key for key in body if not torch.equal(rebuilt_state[key], start[key])]
    assert not changed, f"body tensors not taken from the checkpoint: {changed}"
    assert not torch.equal(rebuilt_state["head.weight"], start["head.weight"])
    # The schedule: linear warm-up from 0 to the peak, then cosine to 0 over the remaining steps.
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    lrs = {r["step"]: r["lr"] for r in records if r["kind"] == "train"}
    assert sorted(lrs) == list(range(1, steps + 1))
    for step, lr in lrs.items():
        if step < warmup:
            want = 0.03 * step / warmup
        else:
            want = (
                0.03
                * 0.5
                * (1 + torch.cos(torch.tensor(torch.pi * (step - warmup) / (steps - warmup))).item())
            )
        assert lr == pytest.approx(want, abs=1e-7), step
    vals = [r["top1"] for r in records if r["kind"] == "val"]
    assert len(vals) == 5
    assert summary["final_val_top1"] >= before + 0.3 and summary["final_val_top1"] >= 0.7, (before, vals)


def test_transfer_configs_follow_the_paper(capsys) -> None:
    figures = {
        "cifar10": (98.83, 99.16, 99.39),
        "cifar100": (91.11, 92.88, 94.09),
        "pets": (93.25, 94.03, 94.73),
        "flowers": (99.50, 99.62, 99.72),
    }
    for path in TRANSFER:
        name = path.stem.removeprefix("transfer-")
        text = path.read_text()
        assert "Table 4" in text and "Table 6" not in text
        for figure in figures[name]:
            assert f"{figure:.2f}" in text, (path, figure)
        cfg = load_config(path, values={"model.pretrained": "cvt_13_384.ms_in22k_ft_in1k"})
        o, t = cfg.optim, cfg.train
        assert (o.opt, o.momentum, o.weight_decay, o.clip_grad) == ("sgd", 0.9, 0.0, 1.0)
        assert t.global_batch == 512 and t.steps == (10_000 if name.startswith("cifar") else 500)
        assert cfg.model.require_weights and cfg.model.head == "new"
        for world in (1, 8):
            plan = dry_run(cfg, world)
            assert plan["global_batch"] == 512 and plan["per_process_batch"] == 512 // world
            assert plan["steps"] == t.steps and plan["peak_lr"] == 0.01 and "384" in plan["eval_transform"]
        with pytest.raises(ValueError, match="train.global_batch=512 does not divide among 3 processes"):
            dry_run(cfg, 3)
        with pytest.raises(ValueError, match="no starting weights are given: add --pretrained TAG"):
            load_config(path)
    # The dry run on the command line shows steps, total batch and LR.
    argv = [
        "train",
        "--config",
        str(TRANSFER[0]),
        "--pretrained",
        "cvt_21_384.ms_in22k_ft_in1k",
        "--dry-run",
        "--world-size",
        "8",
    ]
    assert main(argv) == 0
    plan = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (plan["model"], plan["steps"], plan["global_batch"], plan["peak_lr"]) == (
        "cvt_21_384",
        10_000,
        512,
        0.01,
    )
    assert plan["lr_at_steps"]["500"] == 0.01


def test_transfer_config_without_weights_is_a_one_line_error_before_any_work(tmp_path, capsys) -> None:
    data = digits_tree(tmp_path / "data")
    out = tmp_path / "run"
    err = _error(capsys, ["train", "--config", str(TRANSFER[2]), "--data", str(data), "--output", str(out)])
    assert "model.require_weights" in err and "--pretrained TAG" in err
    assert not out.exists()


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (
            {"model.checkpoint": "cvt_13.ms_in1k"},
            "model.checkpoint=cvt_13.ms_in1k is a released-weights tag, "
            "not a file: use model.pretrained=cvt_13.ms_in1k",
        ),
        (
            {"model.pretrained": "cvt_13.nope"},
            "model.pretrained='cvt_13.nope' is not a released-weights tag; tags: ",
        ),
        (
            {"model.pretrained": "cvt_21.ms_in1k"},
            "holds cvt_21 weights but model.name is cvt_13: set model.name",
        ),
        ({"model.pretrained": "cvt_13.ms_in1k", "model.checkpoint": "w.pth"}, "both name starting weights"),
        ({"sched.warmup_steps": 5}, "sched.warmup_steps=5 needs a run counted in steps"),
        ({"train.steps": 100}, "give its warm-up as sched.warmup_steps"),
        ({"train.steps": 100, "sched.warmup_steps": 100}, "must be less than train.steps=100"),
        (
            {"train.steps": 100, "sched.warmup_steps": 10},
            "train.steps=100 needs sched.interval=step, got 'epoch'",
        ),
        (
            {
                "train.steps": 100,
                "sched.warmup_steps": 10,
                "sched.interval": "step",
                "sched.cooldown_epochs": 10,
            },
            "sched.cooldown_epochs=10 counts epochs",
        ),
    ],
)
def test_bad_weights_and_step_settings_are_one_line_errors(values, message) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        load_config(CONFIGS / "cvt-13-224.yaml", values=values)


def test_changed_weights_or_classes_under_a_run_folder_refuse_to_resume(tmp_path, capsys, one_thread) -> None:
    data = digits_tree(tmp_path / "data")
    out = tmp_path / "run"
    train_on_one_thread(tiny_overrides(data, out, **{"train.epochs": 1}))
    weights = out / "best.pth"  # the folder's own run: read before --no-resume sets that run aside
    # Adding starting weights to a from-scratch run folder: they would be ignored by a resume.
    argv = ["train", *tiny_overrides(data, out, **{"train.epochs": 2}), f"model.checkpoint={weights}"]
    err = _error(capsys, argv)
    assert "cannot resume from" in err and "model.checkpoint is None there" in err
    assert "--no-resume" in err and "--output" in err
    # Another class list under the same folder.
    other = digits_tree(tmp_path / "other", classes=4)
    err = _error(capsys, ["train", *tiny_overrides(other, out, **{"train.epochs": 2})])
    assert "trained on 3 classes" in err and "--no-resume" in err
    # --no-resume starts afresh from the weights, the old run set aside.
    assert main([*argv, "--no-resume"]) == 0
    assert (out / "previous-1" / "last.pth").is_file()
    assert read_training_state(out / "last.pth").train_config["model"]["checkpoint"] == str(weights)


def test_bare_data_picks_a_recipe_and_says_why(tmp_path, capsys) -> None:
    data = digits_tree(tmp_path / "data")
    assert main(["train", "--data", str(data), "--dry-run"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("recipe: from scratch (no --pretrained): cvt_digits, 100 epochs at batch 6")
    assert "24 images of 3 classes (small), median side 32 px" in lines[0]
    plan = json.loads(lines[-1])
    assert (plan["model"], plan["epochs"], plan["mixup"], plan["global_batch"]) == ("cvt_digits", 100, 0.0, 6)
    # With weights: the fine-tuning recipe (no download for a dry run).
    assert main(["train", "--data", str(data), "--pretrained", "cvt_13.ms_in1k", "--dry-run"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("recipe: fine-tune (weights given: cvt_13.ms_in1k): SGD lr 0.003, 30 epochs")
    plan = json.loads(lines[-1])
    assert (plan["model"], plan["pretrained"], plan["optimizer"], plan["clip_grad"]) == (
        "cvt_13",
        "cvt_13.ms_in1k",
        "sgd",
        1.0,
    )
    # A config file is never second-guessed.
    assert main(["train", "--config", str(CONFIGS / "digits.yaml"), "--data", str(data), "--dry-run"]) == 0
    assert not capsys.readouterr().out.startswith("recipe:")


def test_bare_data_recipe_follows_the_epochs_given(tmp_path, capsys) -> None:
    """train.epochs=N on the command line is the recipe's length: said so, with a warm-up that fits it."""
    data = digits_tree(tmp_path / "data")
    expected = {("6", False): (6, 1), ("1", False): (1, 0.2), ("4", True): (4, 1.0), ("1", True): (1, 0.2)}
    for (epochs, tuned), (length, warmup) in expected.items():
        weights = ["--pretrained", "cvt_13.ms_in1k"] if tuned else []
        assert main(["train", "--data", str(data), *weights, f"train.epochs={epochs}", "--dry-run"]) == 0
        lines = capsys.readouterr().out.splitlines()
        assert f", {length} epoch{'' if length == 1 else 's'} at batch 6" in lines[0], lines[0]
        plan = json.loads(lines[-1])
        assert (plan["epochs"], plan["warmup_epochs"]) == (length, warmup)


def test_recipe_rule_by_image_count_and_size(tmp_path) -> None:
    from PIL import Image

    assert [size_band(n).name for n in (10, 2_000, 2_001, 20_000, 20_001)] == [
        "small",
        "small",
        "medium",
        "medium",
        "large",
    ]
    assert [band.augmentation for band in SIZE_BANDS] == ["light", "medium", "strong"]
    for side, model in ((64, "cvt_digits"), (96, "cvt_13")):
        root = tmp_path / f"side{side}"
        for label in ("a", "b"):
            (root / label).mkdir(parents=True)
            for n in range(10):
                Image.new("RGB", (side + 10, side)).save(root / label / f"{n}.png")
        recipe = choose_recipe(root, None)
        assert recipe.values["model"]["name"] == model and recipe.values["train"]["batch_size"] == 5
        assert f"median side {side} px" in recipe.why


def test_overrides_on_both_sides_of_an_option(capsys) -> None:
    assert (
        main(["train", "train.epochs=12", "--dry-run", "train.batch_size=8", "--quiet", "optim.lr=0.01"]) == 0
    )
    plan = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (plan["epochs"], plan["per_process_batch"], plan["peak_lr"]) == (12, 8, 0.01)
    with pytest.raises(SystemExit):
        main(["train", "train.epochs=12", "--dry-run", "train.batch_size=8", "--bogus"])
    err = capsys.readouterr().err
    assert "unrecognized arguments: --bogus" in err and "train.batch_size" not in err


def test_resumed_with_fewer_epochs_summary_agrees_with_metrics(tmp_path, one_thread) -> None:
    data = digits_tree(tmp_path / "data")
    out = tmp_path / "run"
    train_on_one_thread(tiny_overrides(data, out, **{"train.epochs": 2}))
    (out / "summary.json").unlink()  # as a kill after the last checkpoint, before the summary, leaves it
    summary = train_on_one_thread(tiny_overrides(data, out, **{"train.epochs": 1}))
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    val_epochs = [r["epoch"] for r in records if r["kind"] == "val"]
    assert summary["epochs"] == max(val_epochs) == 2
    assert json.loads((out / "summary.json").read_text())["epochs"] == 2


def test_no_internal_issue_numbers_in_user_facing_text() -> None:
    root = Path(__file__).resolve().parents[1]
    files = [
        *root.glob("src/**/*.py"),
        *root.glob("benchmarks/*.py"),
        *root.glob("docs/*.md"),
        root / "README.md",
        *root.glob("configs/*.yaml"),
    ]
    assert root / "docs/benchmarks.md" in files and root / "benchmarks/bench.py" in files
    found = [
        f"{path.relative_to(root)}: {match.group(0)}"
        for path in files
        for match in re.finditer(r"\bissue[ -]?\d+", path.read_text(), re.IGNORECASE)
    ]
    assert not found, found


def test_train_pretrained_tag_fine_tunes_from_the_hub_cache(
    tmp_path, offline_home, capsys, one_thread
) -> None:
    from test_weights_hub import HF_TINY, build_cache
    from transformers import CvtConfig, CvtForImageClassification

    from torchcvt.weights import WEIGHTS_NAME

    build_cache(offline_home, CvtForImageClassification(CvtConfig(**HF_TINY, num_labels=1000)), WEIGHTS_NAME)
    data = digits_tree(tmp_path / "data")
    out = tmp_path / "run"
    argv = [
        "train",
        "--pretrained",
        "cvt_13.ms_in1k",
        "--data",
        str(data),
        "--output",
        str(out),
        "--quiet",
        f"model.overrides={json.dumps(HF_TINY)}",
        "train.epochs=1",
        "sched.warmup_epochs=0",
        "data.workers=0",
    ]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("recipe: fine-tune (weights given: cvt_13.ms_in1k): SGD lr 0.003")
    assert "fine-tuning cvt_13.ms_in1k with a new head for the data's 3 classes" in printed
    state = read_training_state(out / "last.pth")
    assert state.class_names == ["0", "1", "2"] and state.state_dict["head.weight"].shape[0] == 3
    assert (
        state.model_name == "cvt_13" and state.train_config["model"]["pretrained"] == "cvt_13.ms_in1k"
    )

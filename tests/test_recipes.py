"""The official training recipes: each configs/cvt-*.yaml, dry-run on 8 processes, gives the numbers the
official microsoft/CvT code computes on 8 GPUs (written out here, from its files and timm 0.3.2's cosine)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from trainkit import TINY_MODEL, digits_tree, tiny_overrides

from torchcvt import create_model
from torchcvt.cli import main
from torchcvt.data import train_transform
from torchcvt.engine import TrainConfig, dry_run, load_config, train

CONFIGS = Path(__file__).resolve().parents[1] / "configs"

pytestmark = pytest.mark.usefixtures("one_thread")

# LR at the first step of an epoch, official code on 8 GPUs: TRAIN.LR * 8, timm CosineLRScheduler
# (t_initial 300, warm-up 5 epochs from 1e-6, min_lr 1e-5) stepped once per epoch with step(epoch + 1).
LR_2E3 = {
    0: 1e-06,
    1: 0.0004008,
    4: 0.0016001999999999998,
    5: 0.001998636387080801,
    6: 0.0019980365947861304,
    100: 0.0015025,
    150: 0.001005,
    200: 0.0005074999999999998,
    290: 1.5450714108568078e-05,
    299: 1.0054556481315418e-05,
}
LR_1E3 = {
    0: 1e-06,
    1: 0.00020080000000000003,
    4: 0.0008002000000000002,
    5: 0.000999321619703514,
    6: 0.0009990232305719944,
    100: 0.0007525,
    150: 0.000505,
    200: 0.0002574999999999999,
    290: 1.2711661792704722e-05,
    299: 1.002714116407149e-05,
}
TIMM_TRAIN = (
    "RandomResizedCropAndInterpolation",
    "interpolation=bicubic",
    "RandomHorizontalFlip(p=0.5)",
    "RandAugment(n=2",
    "RandomErasing(p=0.25, mode=pixel, count=(1, 1))",
)
CROP_224 = ("Resize(size=256, interpolation=bicubic", "CenterCrop(size=(224, 224))")
RESIZE_384 = ("Resize(size=(384, 384), interpolation=bicubic",)
COMMON = {
    "world_size": 8,
    "epochs": 300,
    "warmup_epochs": 5,
    "sched_on": "epoch",
    "amp": "fp16",
    "val_amp": "none",
    "mixup": 0.8,
    "cutmix": 1.0,
    "label_smoothing": 0.1,
}
OFFICIAL = {
    "cvt-13-224": dict(
        model="cvt_13",
        per_process_batch=256,
        global_batch=2048,
        peak_lr=2e-3,
        weight_decay=0.05,
        drop_path_rate=[0.0, 0.0, 0.1],
        sampler="DistributedSampler",
        lr=LR_2E3,
        size=224,
        train_ops=TIMM_TRAIN,
        eval_ops=CROP_224,
    ),
    "cvt-13-384": dict(
        model="cvt_13_384",
        per_process_batch=256,
        global_batch=2048,
        peak_lr=2e-3,
        weight_decay=0.05,
        drop_path_rate=[0.0, 0.0, 0.1],
        sampler="DistributedSampler",
        lr=LR_2E3,
        size=384,
        train_ops=TIMM_TRAIN,
        eval_ops=RESIZE_384,
    ),
    "cvt-21-224": dict(
        model="cvt_21",
        per_process_batch=128,
        global_batch=1024,
        peak_lr=1e-3,
        weight_decay=0.1,
        drop_path_rate=[0.0, 0.0, 0.1],
        sampler="RepeatAugSampler(num_repeats=3)",
        lr=LR_1E3,
        size=224,
        train_ops=(
            "RandomResizedCrop(size=(224, 224), scale=(0.08, 1.0), ratio=(0.75, 1.3333), "
            "interpolation=bilinear",
            "RandomHorizontalFlip(p=0.5)",
            "ToTensor()",
            "Normalize(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))",
        ),
        eval_ops=CROP_224,
    ),
    "cvt-21-384": dict(
        model="cvt_21_384",
        per_process_batch=128,
        global_batch=1024,
        peak_lr=1e-3,
        weight_decay=0.1,
        drop_path_rate=[0.0, 0.0, 0.1],
        sampler="DistributedSampler",
        lr=LR_1E3,
        size=384,
        train_ops=TIMM_TRAIN,
        eval_ops=RESIZE_384,
    ),
    "cvt-w24-384": dict(
        model="cvt_w24",
        per_process_batch=128,
        global_batch=1024,
        peak_lr=1e-3,
        weight_decay=0.1,
        drop_path_rate=[0.0, 0.0, 0.3],
        sampler="DistributedSampler",
        lr=LR_1E3,
        size=384,
        train_ops=TIMM_TRAIN,
        eval_ops=RESIZE_384,
    ),
}


@pytest.mark.parametrize("name", sorted(OFFICIAL))
def test_official_config_dry_run_on_8_gpus_matches_the_official_code(name: str) -> None:
    want = OFFICIAL[name]
    got = dry_run(load_config(CONFIGS / f"{name}.yaml"), world_size=8)
    for key in ("model", "per_process_batch", "global_batch", "weight_decay", "drop_path_rate", "sampler"):
        assert got[key] == want[key], key
    for key, value in COMMON.items():
        assert got[key] == value, key
    assert got["peak_lr"] == pytest.approx(want["peak_lr"], rel=1e-12)
    assert len(got["lr_per_epoch"]) == 300
    for epoch, lr in want["lr"].items():
        assert got["lr_per_epoch"][epoch] == pytest.approx(lr, rel=1e-9), epoch
    size = want["size"]
    assert f"size=({size}, {size})" in got["train_transform"]
    for op in want["train_ops"]:
        assert op in got["train_transform"], op
    for op in want["eval_ops"]:
        assert op in got["eval_transform"], op
    if name == "cvt-21-224":  # the official torchvision path: no RandAugment, no erasing, no bicubic crops
        for absent in ("RandAugment", "RandomErasing", "bicubic", "ColorJitter"):
            assert absent not in got["train_transform"], absent
    if size == 384:  # TEST.CENTER_CROP: False
        assert "CenterCrop" not in got["eval_transform"]


def test_dry_run_cli_prints_the_config_then_one_json_line(capsys: pytest.CaptureFixture) -> None:
    # The config names /data/imagenet, which does not exist here: a dry run reads no images.
    assert (
        main(["train", "--config", str(CONFIGS / "cvt-21-224.yaml"), "--dry-run", "--world-size", "8"]) == 0
    )
    out = capsys.readouterr().out.strip().splitlines()
    summary = json.loads(out[-1])
    assert {
        "per_process_batch",
        "global_batch",
        "world_size",
        "peak_lr",
        "weight_decay",
        "epochs",
        "warmup_epochs",
        "lr_per_epoch",
        "sched_on",
        "amp",
        "val_amp",
        "sampler",
        "train_transform",
        "eval_transform",
        "mixup",
        "cutmix",
        "label_smoothing",
        "drop_path_rate",
    } <= set(summary)
    assert summary["global_batch"] == 1024 and summary["lr_per_epoch"][0] == 1e-6
    text = "\n".join(out[:-1])
    assert "pipeline: torchvision" in text and "interval: epoch" in text and "data:" in text


def test_dry_run_overrides_and_default_world_size(capsys: pytest.CaptureFixture) -> None:
    argv = ["train", "--config", str(CONFIGS / "cvt-13-224.yaml"), "--dry-run", "train.batch_size=64"]
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    # One process of 64 images: 2.5e-4 per 256 images gives 6.25e-5 (the official LR per image).
    assert (summary["world_size"], summary["global_batch"]) == (1, 64)
    assert summary["peak_lr"] == pytest.approx(6.25e-5, rel=1e-12)


def test_per_step_schedule_stays_available_with_its_cooldown() -> None:
    got = dry_run(load_config(CONFIGS / "cvt-13-224-torchcvt.yaml"), world_size=8)
    assert (got["sched_on"], got["amp"], got["val_amp"]) == ("step", "bf16", "none")
    # Cosine over 300 - 10 cool-down epochs, then min_lr; the LR at each epoch's first step.
    want = {
        0: 1e-06,
        4: 0.0016001999999999998,
        5: 0.001998540746781868,
        100: 0.0014710663984962913,
        289: 1.005838383080247e-05,
        290: 1e-05,
        299: 1e-05,
    }
    for epoch, lr in want.items():
        assert got["lr_per_epoch"][epoch] == pytest.approx(lr, rel=1e-9), epoch


def test_torchcvt_configs_say_they_are_not_official_and_finetunes_keep_1000_classes() -> None:
    for path in sorted(CONFIGS.glob("*-torchcvt.yaml")):
        head = path.read_text().split("\nmodel:")[0]
        assert "torchcvt's own" in head and "microsoft/CvT" in head, path
        cfg = load_config(path, ["model.checkpoint=w.pth"] if "finetune" in path.name else [])
        assert cfg.train.val_amp == "none", path
    for name in ("cvt-13-384-finetune-torchcvt", "cvt-w24-384-finetune-torchcvt"):
        text = (CONFIGS / f"{name}.yaml").read_text()
        assert "1,000-class head" in text and "21,841" not in text
        assert load_config(CONFIGS / f"{name}.yaml", ["model.checkpoint=w.pth"]).model.head == "keep"
    for name in OFFICIAL:
        head = (CONFIGS / f"{name}.yaml").read_text().split("\nmodel:")[0]
        assert (
            f"experiments/imagenet/cvt/{name.replace('-224', '-224x224').replace('-384', '-384x384')}" in head
        )


def test_torchvision_pipeline_is_the_plain_official_one() -> None:
    aug = TrainConfig().override(
        {"aug.pipeline": "torchvision", "aug.auto_augment": None, "aug.re_prob": 0.0,
         "aug.color_jitter": None, "aug.interpolation": "bilinear"}
    ).aug
    data_config = {"input_size": (3, 32, 32), "mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25)}
    transform = train_transform(aug, data_config)
    assert [type(t).__name__ for t in transform.transforms] == [
        "RandomResizedCrop",
        "RandomHorizontalFlip",
        "ToTensor",
        "Normalize",
    ]
    torch.manual_seed(0)
    out = transform(Image.new("RGB", (48, 40), (128, 0, 255)))
    assert out.shape == (3, 32, 32)
    torch.testing.assert_close(out[:, 0, 0], torch.tensor([128 / 255 - 0.5, -0.5, 0.5]) / 0.25)


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        (
            "aug.pipeline",
            "albumentations",
            r"aug.pipeline must be one of timm, torchvision, got 'albumentations'",
        ),
        ("train.amp", "fp32", r"train.amp must be one of none, bf16, fp16, got 'fp32'"),
        ("sched.interval", "batch", r"sched.interval must be one of epoch, step, got 'batch'"),
        ("train.val_amp", "fp8", r"train.val_amp must be one of none, bf16, fp16 or null"),
        ("aug.auto_augment", "rand-m9", r"aug.auto_augment='rand-m9' needs aug.pipeline=timm"),
        ("aug.re_prob", 0.25, r"aug.re_prob=0.25 needs aug.pipeline=timm"),
    ],
)
def test_bad_recipe_keys_are_one_line_errors(key: str, value: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        dry_run(load_config(CONFIGS / "cvt-21-224.yaml", [f"{key}={json.dumps(value)}"]), world_size=8)


def test_bad_world_size_and_world_size_without_dry_run(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(ValueError, match="world_size must be a positive number of processes, got 0"):
        dry_run(load_config(CONFIGS / "cvt-13-224.yaml"), world_size=0)
    assert main(["train", "--config", str(CONFIGS / "cvt-13-224.yaml"), "--world-size", "8"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "torchcvt train: error: --world-size only applies to --dry-run (torchrun sets the real one)"


def test_per_epoch_schedule_in_a_real_run(tmp_path: Path) -> None:
    """sched.on=epoch: every step of an epoch runs at that epoch's LR, epoch 0 at warmup_lr."""
    data = digits_tree(tmp_path / "data", classes=2, train_per_class=4, val_per_class=2)
    overrides = tiny_overrides(
        data,
        tmp_path / "run",
        **{
            "sched.interval": "epoch",
            "sched.warmup_epochs": 2,
            "sched.warmup_lr": 1e-4,
            "sched.min_lr": 1e-5,
            "train.epochs": 3,
            "train.log_every_steps": 1,
            "train.val_amp": "none",
        },
    )
    train(load_config(None, overrides))
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if r["kind"] == "train"]
    assert len(steps) == 6  # 8 images, batch 4, 3 epochs
    # Warm-up from 1e-4 to optim.lr 2e-3 over 2 epochs, then cosine over 3: 1e-5 + 0.5 * 1.99e-3 * 0.5.
    by_epoch = [sorted({round(r["lr"], 12) for r in steps if e < r["epoch"] <= e + 1}) for e in range(3)]
    assert by_epoch == [[1e-4], [1.05e-3], [5.075e-4]], by_epoch


def test_head_bias_keeps_pytorch_default_init_as_official() -> None:
    torch.manual_seed(0)
    model = create_model("cvt_digits", num_classes=50, **TINY_MODEL)
    bias, bound = model.head.bias.detach(), model.head.in_features**-0.5
    assert bias.abs().max() <= bound and bias.abs().min() > 0 and bias.std() > bound / 4
    assert model.head.weight.std().item() == pytest.approx(0.02, rel=0.2)


@pytest.mark.parametrize(
    ("val_amp", "want"), [("none", None), (None, torch.bfloat16), ("fp16", torch.float16)]
)
def test_validation_precision_is_set_apart_from_training(tmp_path: Path, val_amp: str | None, want) -> None:
    from torchcvt.engine import Runtime, build_components

    data = digits_tree(tmp_path / "data", classes=2, train_per_class=4, val_per_class=2)
    cfg = load_config(
        None, tiny_overrides(data, tmp_path / "run", **{"train.amp": "bf16", "train.val_amp": val_amp})
    )
    parts = build_components(cfg, Runtime(0, 1, torch.device("cpu")))
    assert parts.amp_dtype is torch.bfloat16 and parts.val_amp_dtype is want


def test_randaugment_posterize_to_zero_bits_gives_a_black_image() -> None:
    # 'inc1' posterizes to 4 - magnitude * 4 / 10 bits: 0 at magnitude 10, which Pillow 13 refuses.
    data_config = {"input_size": (3, 32, 32), "mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25)}
    transform = train_transform(TrainConfig().aug, data_config)
    rand_augment = next(t for t in transform.transforms if type(t).__name__ == "RandAugment")
    posterize = next(op for op in rand_augment.ops if op.name == "PosterizeIncreasing")
    posterize.prob, posterize.magnitude, posterize.magnitude_std = 1.0, 10, 0
    image = posterize(Image.new("RGB", (8, 8), (200, 100, 50)))
    assert image.mode == "RGB" and image.getextrema() == ((0, 0), (0, 0), (0, 0))
    posterize.magnitude = 5  # 2 bits: the usual posterize
    assert posterize(Image.new("RGB", (8, 8), (200, 100, 50))).getpixel((0, 0)) == (192, 64, 0)

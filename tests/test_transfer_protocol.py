"""The transfer configs against the values of ViT's fine-tuning code (google-research/vision_transformer
at c6de1e53, the protocol the CvT paper follows) and the official CvT fine-tuning configs: every expected
value below is written from those files, not read from torchcvt."""

from pathlib import Path

import pytest
import torch
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode
from trainkit import TINY_MODEL, digits_tree

from torchcvt import create_model
from torchcvt.config import variant_config
from torchcvt.data import train_transform
from torchcvt.engine import build_components, init_runtime, load_config
from torchcvt.engine.optim import build_optimizer, is_nesterov
from torchcvt.engine.recipes import FINETUNE_RECIPE, choose_recipe
from torchcvt.engine.train_config import OptimSettings
from torchcvt.weights.save import save_checkpoint

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
NAMES = ("cifar10", "cifar100", "pets", "flowers")
# vit_jax/configs/common.py: grad_norm_clip 1.0 (line 41), batch 512 (line 48), warmup_steps 500 (line 68);
# total steps 10,000 for CIFAR (lines 87, 94) and 500 for Pets and Flowers (ViT's Table 4).
VIT_STEPS = {"cifar10": 10_000, "cifar100": 10_000, "pets": 500, "flowers": 500}
# microsoft/CvT experiments/imagenet/cvt/cvt-{13,21,w24}-384x384.yaml line 21, DROP_PATH_RATE.
OFFICIAL_DROP_PATH = {
    "cvt_13_384.ms_in22k_ft_in1k": (0.0, 0.0, 0.1),
    "cvt_21_384.ms_in22k_ft_in1k": (0.0, 0.0, 0.1),
    "cvt_w24.ms_in22k_ft_in1k": (0.0, 0.0, 0.3),
}


def _tiny_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return create_model("cvt_digits", num_classes=3, **TINY_MODEL)


def test_sgd_is_plain_momentum_as_vits_update_rule() -> None:
    # vit_jax/momentum_clip.py lines 74-75: m <- 0.9 m + g; p <- p - lr m (no Nesterov look-ahead).
    model = _tiny_model()
    optimizer = build_optimizer(model, OptimSettings(opt="sgd", momentum=0.9, weight_decay=0.0), lr=0.1)
    assert all(group["nesterov"] is False for group in optimizer.param_groups)
    assert all(group["momentum"] == 0.9 and group["dampening"] == 0 for group in optimizer.param_groups)
    weight = model.head.weight
    start = weight.detach().clone()
    momentum = torch.zeros_like(start)
    expected = start.clone()
    for step in range(3):
        gradient = torch.full_like(start, 0.5 + step)
        for param in model.parameters():
            param.grad = torch.zeros_like(param)
        weight.grad = gradient.clone()
        optimizer.step()
        momentum = 0.9 * momentum + gradient
        expected = expected - 0.1 * momentum
    torch.testing.assert_close(weight.detach(), expected)


def test_nesterov_keeps_its_own_name() -> None:
    optimizer = build_optimizer(_tiny_model(), OptimSettings(opt="sgd_nesterov", weight_decay=0.0), lr=0.1)
    assert all(group["nesterov"] is True for group in optimizer.param_groups)
    assert is_nesterov("sgd_nesterov") and not is_nesterov("sgd")


@pytest.mark.parametrize("name", NAMES)
def test_transfer_config_has_vits_values(name: str) -> None:
    path = CONFIGS / f"transfer-{name}.yaml"
    cfg = load_config(path, values={"model.pretrained": "cvt_13_384.ms_in22k_ft_in1k"})
    o, s, t, a, m = cfg.optim, cfg.sched, cfg.train, cfg.aug, cfg.model
    assert (o.opt, o.momentum, o.weight_decay, o.clip_grad) == ("sgd", 0.9, 0.0, 1.0)
    assert not is_nesterov(o.opt)
    assert (t.steps, t.global_batch) == (VIT_STEPS[name], 512)
    # ViT's 500 warm-up steps where the run is longer; Pets and Flowers (500 steps) give their reason.
    text = path.read_text()
    if t.steps > 500:
        assert s.warmup_steps == 500
    else:
        assert s.warmup_steps == 50 and "500 of 500" in text
    assert (s.min_lr, s.warmup_lr) == (0.0, 0.0)
    # input_pipeline.py lines 197-211: inception crop of area 5% to 100%, bilinear resize, flip, nothing else.
    assert (a.pipeline, tuple(a.scale), a.interpolation, a.hflip) == (
        "torchvision", (0.05, 1.0), "bilinear", 0.5)
    assert (a.mixup, a.cutmix, a.label_smoothing, a.re_prob, a.color_jitter, a.auto_augment) == (
        0.0, 0.0, 0.0, 0.0, None, None)
    assert t.val_amp == "none"  # evaluation in fp32
    assert (m.head, m.head_init) == ("new", "zero")
    # Drop-path: the paper is silent, each variant keeps the official fine-tuning config's own rate.
    assert "drop_path_rate" not in m.overrides and "the paper gives no rate" in text
    for tag, rate in OFFICIAL_DROP_PATH.items():
        architecture = tag.split(".")[0]
        tagged = load_config(path, values={"model.name": architecture, "model.pretrained": tag})
        assert variant_config(tagged.model.name, **tagged.model.overrides).drop_path_rate == rate
    # ViT held out 2% of CIFAR's training set and 10% of Pets' and Flowers' (common.py lines 89, 96).
    held = "2%" if name.startswith("cifar") else "10%"
    assert f"on {held} of the training" in text and (held == "2%" or "2%" not in text)


def test_transfer_train_transform_is_vits_crop() -> None:
    tag = {"model.pretrained": "cvt_13_384.ms_in22k_ft_in1k"}
    cfg = load_config(CONFIGS / "transfer-cifar10.yaml", values=tag)
    data_config = {"input_size": (3, 384, 384), "mean": (0.5,) * 3, "std": (0.5,) * 3}
    transform = train_transform(cfg.aug, data_config)
    crop = transform.transforms[0]
    assert isinstance(crop, T.RandomResizedCrop) and crop.size == (384, 384)
    assert crop.scale == (0.05, 1.0) and crop.interpolation == InterpolationMode.BILINEAR
    rest = [type(step) for step in transform.transforms[1:]]
    assert rest == [T.RandomHorizontalFlip, T.ToTensor, T.Normalize]


def test_transfer_recipe_starts_from_a_zero_head(tmp_path: Path) -> None:
    # vit_jax/models_vit.py lines 306-307: the head's kernel and bias start at zero.
    data = digits_tree(tmp_path / "data", classes=4, train_per_class=2, val_per_class=1)
    model = _tiny_model()
    for param in model.parameters():
        param.data.add_(0.01)
    checkpoint = save_checkpoint(model, tmp_path / "start.pth", class_names=["a", "b", "c"])
    values = {"model.name": "cvt_digits", "model.overrides": TINY_MODEL, "model.checkpoint": str(checkpoint),
              "data.train": str(data / "train"), "data.val": str(data / "val"), "data.workers": 0,
              "train.global_batch": 4, "train.amp": "none", "train.output": str(tmp_path / "run")}
    parts = build_components(load_config(CONFIGS / "transfer-pets.yaml", values=values), init_runtime("cpu"))
    head = parts.model.head
    assert head.weight.shape == (4, head.weight.shape[1])
    assert torch.count_nonzero(head.weight) == 0 and torch.count_nonzero(head.bias) == 0
    body = "stage0.patch_embed.proj.weight"
    torch.testing.assert_close(parts.model.state_dict()[body], model.state_dict()[body])
    # The default (the official code's) stays a truncated-normal head.
    values.update({"model.head_init": "trunc_normal", "train.output": str(tmp_path / "run2")})
    plain = build_components(load_config(CONFIGS / "transfer-pets.yaml", values=values), init_runtime("cpu"))
    assert torch.count_nonzero(plain.model.head.weight) > 0


def test_auto_recipe_does_not_carry_the_papers_name(tmp_path: Path) -> None:
    data = digits_tree(tmp_path / "data", classes=3, train_per_class=4, val_per_class=1)
    chosen = choose_recipe(data / "train", "cvt_13_384.ms_in22k_ft_in1k", "cvt_13_384")
    assert chosen.name == "finetune"
    assert "paper" not in chosen.why.lower() and "protocol" not in chosen.why.lower()
    assert FINETUNE_RECIPE["optim"]["opt"] == "sgd"

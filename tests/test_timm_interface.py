"""The model held to what timm checks of its own models, over every variant, and timm's helpers on it."""

import warnings
from collections import OrderedDict

import pytest
import timm
import torch
from timm.layers import DropPath
from timm.optim import create_optimizer_v2
from torch import nn

import torchcvt
from torchcvt.config import VARIANTS

# Every variant at its own widths, heads and geometry, with one block per stage: their depth only repeats
# the same block, and at full depth tracing and backward of six models would take minutes on a CPU.
SHALLOW = {"depth": [1, 1, 1]}
SIZE = {"cvt_digits": 32}


def build(name: str, **kwargs) -> nn.Module:
    return timm.create_model(name, **{**SHALLOW, **kwargs})


def images(name: str, batch: int = 2) -> torch.Tensor:
    size = SIZE.get(name, 64)
    return torch.randn(batch, 3, size, size + 16)


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_variant_passes_timms_model_checks(name):
    model = build(name, num_classes=7)
    x = images(name)

    # default cfg: the data config, and first_conv / classifier naming real modules of the right shape
    cfg = model.pretrained_cfg
    for key in ("input_size", "interpolation", "mean", "std", "crop_pct", "first_conv", "classifier"):
        assert key in cfg, key
    assert cfg["architecture"] == name and len(cfg["mean"]) == len(cfg["std"]) == 3
    first_conv = model.get_submodule(cfg["first_conv"])
    assert isinstance(first_conv, nn.Conv2d) and first_conv.in_channels == cfg["input_size"][0]
    assert model.get_submodule(cfg["classifier"]) is model.get_classifier()
    assert model.get_classifier().out_features == 7

    # backward: every parameter gets a gradient
    model.train()
    model(x).sum().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, missing

    model.eval()
    with torch.no_grad():
        logits = model(x)
        assert logits.shape == (2, 7) and torch.isfinite(logits).all()
        features = model.forward_features(x)
        assert features.shape[-1] == model.num_features
        assert model.forward_head(features, pre_logits=True).shape == (2, model.num_features)

        # forward_intermediates: one map per feature_info entry, at its channels and reduction
        final, maps = model.forward_intermediates(x)
        torch.testing.assert_close(final, features)
        assert len(maps) == len(model.feature_info)
        for fmap, info in zip(maps, model.feature_info, strict=True):
            assert fmap.shape[:2] == (2, info["num_chs"])
            assert fmap.shape[-2] == -(-x.shape[-2] // info["reduction"])
        only = model.forward_intermediates(x, indices=2, intermediates_only=True, stop_early=True)
        assert [m.shape for m in only] == [m.shape for m in maps[-2:]]
        torch.testing.assert_close(only, maps[-2:])

        # torchscript by tracing, exact on the traced input and running at another batch size
        traced = torch.jit.trace(model, x, check_trace=False)
        torch.testing.assert_close(traced(x), logits)
        assert traced(images(name, batch=1)).shape == (1, 7)

        model.reset_classifier(0)
        assert model(x).shape == (2, model.num_features)
        model.reset_classifier(0, "")
        assert model(x).shape == features.shape

    # features_only: the stage maps, described by feature_info
    backbone = build(name, features_only=True).eval()
    with torch.no_grad():
        stage_maps = backbone(x)
    assert [m.shape[1] for m in stage_maps] == backbone.feature_info.channels()
    assert len(stage_maps) == len(backbone.feature_info.reduction()) == model.num_stages


def tiny(tiny_overrides, **kwargs) -> torchcvt.CvT:
    return torchcvt.create_model("cvt_13", **{**tiny_overrides, **kwargs})


def test_global_pool(tiny_overrides):
    x = torch.randn(2, 3, 64, 64)
    model = tiny(tiny_overrides, num_classes=0).eval()
    with torch.no_grad():
        tokens = model.forward_features(x)
        assert model.global_pool == "token"
        torch.testing.assert_close(model(x), tokens[:, 0])
        model.reset_classifier(0, "avg")
        torch.testing.assert_close(model(x), tokens[:, 1:].mean(dim=1))
        model.reset_classifier(0, "")
        torch.testing.assert_close(model(x), tokens)
    avg = timm.create_model("cvt_13", global_pool="avg", **tiny_overrides)
    assert avg.global_pool == "avg"
    assert tiny(tiny_overrides, cls_token=[False, False, False]).global_pool == "avg"
    with pytest.raises(ValueError, match=r"global_pool must be one of \['token', 'avg', ''\], got 'max'"):
        tiny(tiny_overrides, global_pool="max")
    with pytest.raises(ValueError, match="global_pool='token' needs a class token in the last stage"):
        tiny(tiny_overrides, global_pool="token", cls_token=[False, False, False])


def test_scalar_drop_path_rate_spreads_over_the_last_stage_as_the_official_configs(tiny_overrides):
    def rates(model: torchcvt.CvT) -> list[list[float]]:
        return [[b.drop_path.drop_prob if isinstance(b.drop_path, DropPath) else 0.0 for b in stage.blocks]
                for stage in model.stages]

    overrides = {**tiny_overrides, "depth": [1, 2, 3]}
    model = timm.create_model("cvt_13", drop_path_rate=0.3, **overrides)
    assert model.config.drop_path_rate == (0.0, 0.0, 0.3)
    assert rates(model) == [[0.0], [0.0, 0.0], [0.0, pytest.approx(0.15), pytest.approx(0.3)]]
    per_stage = torchcvt.create_model("cvt_13", drop_path_rate=[0.0, 0.2, 0.2], **overrides)
    approx = pytest.approx
    assert rates(per_stage) == [[0.0], [0.0, approx(0.2)], [0.0, approx(0.1), approx(0.2)]]
    head_dropout = timm.create_model("cvt_13", drop_rate=0.25, **overrides)
    assert head_dropout.head_drop.p == 0.25 and head_dropout.config.drop_rate == (0.0, 0.0, 0.0)


def test_in_chans(tiny_overrides):
    model = timm.create_model("cvt_13", in_chans=1, **tiny_overrides)
    assert model.stage0.patch_embed.proj.in_channels == 1 and model.pretrained_cfg["input_size"][0] == 1
    assert model(torch.randn(2, 1, 64, 64)).shape == (2, 1000)


def test_out_indices_and_pruning(tiny_overrides):
    backbone = timm.create_model("cvt_13", features_only=True, out_indices=(0, 2), **tiny_overrides).eval()
    assert backbone.feature_info.channels() == [16, 32] and backbone.feature_info.reduction() == [4, 8]
    assert backbone.feature_info.module_name() == ["stage0.patch_embed", "stage1"]
    assert not hasattr(backbone.model, "stage2")  # a stage after the last map asked for is dropped
    with torch.no_grad():
        maps = backbone(torch.randn(1, 3, 64, 48))
    assert [tuple(m.shape) for m in maps] == [(1, 16, 16, 12), (1, 32, 8, 6)]

    model = tiny(tiny_overrides).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        before = model.forward_intermediates(x, indices=[1, 2], intermediates_only=True)
        nlc = model.forward_intermediates(x, [-1], norm=True, output_fmt="NLC", intermediates_only=True)
        final = model.forward_features(x)
    torch.testing.assert_close(nlc[0], final[:, 1:])  # the last map with the final norm is the final tokens
    assert model.prune_intermediate_layers([1, 2]) == [1, 2]
    assert model.num_stages == 2 and isinstance(model.norm, nn.Identity) and model.num_classes == 0
    with torch.no_grad():
        torch.testing.assert_close(model.forward_intermediates(x, intermediates_only=True)[1:], before)
    with pytest.raises(ValueError, match=r"feature indices \[4\] are out of range 0\.\.3 \(0: stem"):
        tiny(tiny_overrides, features_only=True, out_indices=(4,))
    with pytest.raises(ValueError, match=r"output_fmt must be one of \['NCHW', 'NLC'\], got 'NHWC'"):
        tiny(tiny_overrides).forward_intermediates(x, output_fmt="NHWC")


def test_group_matcher_gives_timms_layer_decay_one_group_per_block(tiny_overrides):
    model = tiny(tiny_overrides, num_classes=5)
    optimizer = create_optimizer_v2(model, "adamw", lr=1e-3, weight_decay=0.05, layer_decay=0.75)
    scale = {}
    for group in optimizer.param_groups:
        for param in group["params"]:
            scale[param] = group["lr_scale"]
    named = dict(model.named_parameters())
    # stem, then one layer per block (a stage's embedding with its first block), then the head
    layers = [
        ["stage0.patch_embed.proj.weight"],
        ["stage0.blocks.0.mlp.fc1.weight"],
        ["stage1.patch_embed.proj.weight", "stage1.blocks.0.attn.proj_q.weight"],
        ["stage2.cls_token", "stage2.blocks.0.norm1.weight"],
        ["stage2.blocks.1.mlp.fc2.weight", "norm.weight"],
        ["head.weight"],
    ]
    for depth, names in enumerate(layers):
        for name in names:
            assert scale[named[name]] == pytest.approx(0.75 ** (len(layers) - 1 - depth)), name
    coarse = model.group_matcher(coarse=True)
    assert coarse["stem"] == r"^stage0\.patch_embed" and coarse["blocks"] == r"^stage(\d+)"


def test_set_input_size_resamples_position_embeddings(tiny_overrides):
    model = tiny(tiny_overrides, position_embedding=[True, False, False], img_size=64)
    model.set_input_size(96)
    assert model.stage0.pos_embed.shape == (1, 16, 24, 24) and model.config.img_size == 96
    assert model.pretrained_cfg["input_size"] == (3, 96, 96)
    assert model(torch.randn(1, 3, 96, 96)).shape == (1, 1000)
    with pytest.raises(ValueError, match="patch_size cannot change"):
        model.set_input_size(patch_size=8)
    assert timm.create_model("cvt_13", dynamic_img_size=True, **tiny_overrides).num_stages == 3


def test_transformers_timm_backbone():
    from transformers import TimmBackbone, TimmBackboneConfig

    backbone = TimmBackbone(TimmBackboneConfig(backbone="cvt_13", out_indices=(1, 2, 3))).eval()
    assert backbone.channels == [64, 192, 384]
    with torch.no_grad():
        out = backbone(torch.randn(1, 3, 64, 64))
    assert [tuple(m.shape) for m in out.feature_maps] == [(1, 64, 16, 16), (1, 192, 8, 8), (1, 384, 4, 4)]


class CvtFPN(nn.Module):
    """A CvT backbone with torchvision's feature pyramid, as detection models take it (docs/model.md)."""

    def __init__(self, name: str, out_channels: int = 32, **kwargs):
        from torchvision.ops import FeaturePyramidNetwork
        from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

        super().__init__()
        self.body = torchcvt.create_model(name, features_only=True, **kwargs)
        self.fpn = FeaturePyramidNetwork(self.body.feature_info.channels(), out_channels, LastLevelMaxPool())
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        return self.fpn(OrderedDict((str(i), fmap) for i, fmap in enumerate(self.body(x))))


def test_faster_rcnn_training_step(tiny_overrides):
    from torchvision.models.detection import FasterRCNN
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.ops import MultiScaleRoIAlign

    backbone = CvtFPN("cvt_13", **tiny_overrides)
    anchors = AnchorGenerator(sizes=((16,), (32,), (64,), (128,)), aspect_ratios=((0.5, 1.0, 2.0),) * 4)
    detector = FasterRCNN(backbone, num_classes=3, min_size=96, max_size=96, rpn_anchor_generator=anchors,
                          box_roi_pool=MultiScaleRoIAlign(["0", "1", "2"], output_size=7, sampling_ratio=2))
    detector.train()
    images = [torch.rand(3, 96, 96), torch.rand(3, 80, 96)]
    targets = [{"boxes": torch.tensor([[10.0, 12.0, 50.0, 60.0]]), "labels": torch.tensor([1])},
               {"boxes": torch.tensor([[5.0, 5.0, 40.0, 30.0], [50.0, 40.0, 90.0, 75.0]]),
                "labels": torch.tensor([2, 1])}]
    optimizer = torch.optim.SGD(detector.parameters(), lr=0.01)
    losses = detector(images, targets)
    assert set(losses) == {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"}
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    assert backbone.body.model.stage0.patch_embed.proj.weight.grad.abs().sum() > 0
    optimizer.step()
    detector.eval()
    with torch.no_grad():
        detections = detector([torch.rand(3, 96, 96)])
    assert set(detections[0]) == {"boxes", "labels", "scores"}


def _write_every_format(model: nn.Module, folder, names: list[str]) -> dict[str, object]:
    """Each file torchcvt writes, as timm's checkpoint_path= is given it."""
    from torchcvt.weights import save_checkpoint, save_hf, save_official

    save_checkpoint(model, folder / "torchcvt", class_names=names)
    save_checkpoint(model, folder / "single.safetensors", class_names=names)
    with warnings.catch_warnings():  # what official .pth and transformers cannot record or build: said
        warnings.simplefilter("ignore")
        save_official(model, folder / "official.pth")
        save_hf(model, folder / "hf", class_names=names)
    # `torchcvt train`'s best.pth: the weights under state_dict, with the run's model and class names.
    torch.save({"state_dict": model.state_dict(), "class_names": names, "config": model.config.to_dict(),
                "model_name": "cvt_digits", "epoch": 1}, folder / "best.pth")
    return {"torchcvt": folder / "torchcvt" / "model.safetensors", "single": folder / "single.safetensors",
            "official": folder / "official.pth", "hf": folder / "hf" / "model.safetensors",
            "train": folder / "best.pth"}


@pytest.mark.parametrize("activation", ["quick_gelu", "gelu"])
def test_timm_checkpoint_path_loads_every_file_torchcvt_writes(tmp_path, activation):
    from trainkit import perturb_weights

    torch.manual_seed(0)
    names = ["cat", "dog", "emu"]
    model = perturb_weights(torchcvt.create_model("cvt_digits", num_classes=3, activation=activation)).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
    for kind, path in _write_every_format(model, tmp_path, names).items():
        loaded = timm.create_model("cvt_digits", checkpoint_path=str(path), num_classes=3,
                                   activation=activation).eval()
        with torch.no_grad():
            torch.testing.assert_close(loaded(x), expected, rtol=0, atol=1e-6, msg=kind)
        # The class names come with every file that records them (an official .pth records none).
        recorded = None if kind == "official" else tuple(names)
        assert loaded.pretrained_cfg.get("label_names") == recorded, kind


def test_timm_checkpoint_path_names_a_recorded_activation_it_cannot_build(tmp_path, caplog):
    model = torchcvt.create_model("cvt_digits", num_classes=3, activation="gelu").eval()
    torchcvt.weights.save_hf(model, tmp_path / "hf", class_names=["a", "b", "c"])
    with caplog.at_level("WARNING", logger="torchcvt"):
        timm.create_model("cvt_digits", checkpoint_path=str(tmp_path / "hf" / "model.safetensors"),
                          num_classes=3)
    assert "was saved with activation='gelu' but this model has activation 'quick_gelu'" in caplog.text
    assert "pass activation='gelu' to timm.create_model" in caplog.text

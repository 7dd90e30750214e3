"""The CvT model: shapes, exact parameter counts, config knobs, bad inputs and timm conventions."""

import math

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.layers import DropPath
from torch import nn
from trainkit import perturb_weights

import torchcvt
from torchcvt import fused
from torchcvt.errors import TorchcvtError
from torchcvt.flops import count_params
from torchcvt.layers import Attention, LayerNorm, QuickGELU


def tiny(overrides: dict, **more) -> torchcvt.CvT:
    return torchcvt.create_model("cvt_13", **{**overrides, **more}).eval()


def blocks(model: torchcvt.CvT, stage: int) -> list[nn.Module]:
    return list(model.stages[stage].blocks)


def rates_of(model: torchcvt.CvT) -> list[list[float]]:
    """Drop-path probability of every block, stage by stage (0 where the block has none)."""
    return [[b.drop_path.drop_prob if isinstance(b.drop_path, DropPath) else 0.0 for b in s.blocks]
            for s in model.stages]


@pytest.mark.parametrize("size", [(224, 224), (384, 384), (256, 320), (97, 131)])
def test_output_shapes(tiny_overrides, size):
    model = tiny(tiny_overrides, num_classes=10)
    with torch.no_grad():
        logits = model(torch.randn(2, 3, *size))
    assert logits.shape == (2, 10) and logits.dtype == torch.float32 and torch.isfinite(logits).all()


def test_batch_of_one_matches_its_row_in_a_larger_batch(tiny_overrides):
    model = tiny(tiny_overrides)
    x = torch.randn(3, 3, 97, 131)
    with torch.no_grad():
        single, batch = model(x[1:2]), model(x)
    assert single.shape == (1, 1000)
    torch.testing.assert_close(single[0], batch[1], rtol=1e-4, atol=1e-5)


def test_real_cvt_13_forward_batch_one():
    model = torchcvt.create_model("cvt_13").eval()
    with torch.no_grad():
        logits = model(torch.randn(1, 3, 224, 224))
    assert logits.shape == (1, 1000) and torch.isfinite(logits).all()
    assert [len(s.blocks) for s in model.stages] == [1, 2, 10]
    assert model.norm.eps == 1e-5


@pytest.mark.parametrize(
    ("name", "params"), [("cvt_13", 19_997_480), ("cvt_21", 31_622_696), ("cvt_w24", 277_196_392)]
)
def test_exact_parameter_counts(name, params):
    with torch.device("meta"):
        model = torchcvt.create_model(name)
    assert sum(p.numel() for p in model.parameters()) == count_params(model) == params


def test_bad_images_are_clear_errors(tiny_overrides):
    model = tiny(tiny_overrides)
    with pytest.raises(ValueError, match=r"input has 1 channels but the model expects 3 \(shape \(2, 1, 64"):
        model(torch.randn(2, 1, 64, 64))
    with pytest.raises(ValueError, match=r"expected a batch of images \(B, C, H, W\)"):
        model(torch.randn(3, 64, 64))
    smallest = model.min_input_size()
    assert smallest == 3  # 7x7 stride-4 conv with padding 2 needs 3 pixels to leave one token
    with torch.no_grad():
        assert model(torch.randn(1, 3, smallest, smallest)).shape == (1, 1000)
    with pytest.raises(ValueError, match=r"input of 2x64 pixels is too small: stage 1's .* 3 pixels a side"):
        model(torch.randn(1, 3, 2, 64))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"depth": [1, 2]}, r"depth has 2 values but the model has 3 stages"),
        ({"num_heads": [1.0, 3.0, 6.0]}, r"num_heads must hold int values"),
        ({"cls_token": [0, 0, 1]}, r"cls_token must hold bool values"),
        ({"mlp_ratio": 4.0}, r"mlp_ratio must be a list with one value per stage"),
        ({"qkv_projection_method": ["dw_bn", "max", "dw_bn"]}, r"qkv_projection_method must be one of"),
        ({"embed_dim": [64, 192, 380]}, r"embed_dim\[2\]=380 is not divisible by num_heads\[2\]=6"),
        ({"stride_q": [1, 2, 1]}, r"query projection of stage 2 must keep the token grid.*stride_q\[1\]=2"),
        ({"activation": "relu"}, r"activation must be one of \['quick_gelu', 'gelu'\]"),
        ({"depht": [1, 1, 1]}, r"unknown config field 'depht'; did you mean 'depth'\?"),
        ({"layer_norm_eps": -1}, r"^layer_norm_eps must be a finite float > 0, got -1$"),
        ({"layer_norm_eps": float("nan")}, r"^layer_norm_eps must be a finite float > 0, got nan$"),
        ({"layer_norm_eps": "1e-5"}, r"^layer_norm_eps must be a finite float > 0, got '1e-5'$"),
        ({"layer_norm_eps": True}, r"^layer_norm_eps must be a finite float > 0, got True$"),
        ({"mlp_ratio": [4.0, 0.0, 4.0]}, r"^mlp_ratio\[1\] must be finite with .*, got 0.0$"),
        ({"mlp_ratio": [4.0, 4.0, -2]}, r"^mlp_ratio\[2\] must be finite with .*, got -2.0$"),
        ({"mlp_ratio": [float("inf"), 4.0, 4.0]}, r"^mlp_ratio\[0\] must be finite with .*, got inf$"),
        ({"mlp_ratio": ["4", 4.0, 4.0]}, r"^mlp_ratio must hold float values, got \['4', 4.0, 4.0\]$"),
        ({"initializer_range": -0.02}, r"^initializer_range must be a finite float >= 0, got -0.02$"),
        ({"initializer_range": "0.02"}, r"^initializer_range must be a finite float >= 0, got '0.02'$"),
        ({"head_drop_rate": 1.0}, r"^head_drop_rate must be a float in \[0, 1\), got 1.0$"),
        ({"drop_rate": [0.0, float("nan"), 0.0]}, r"^drop_rate must lie in \[0, 1\), got \[0.0, nan, 0.0\]$"),
        ({"init": ["xavier"]}, r"^init must be one of \['trunc_normal', 'xavier'\], got \['xavier'\]$"),
    ],
)
def test_bad_config_names_the_field(overrides, message):
    with pytest.raises(ValueError, match=message):
        torchcvt.create_model("cvt_13", **overrides)


def test_unknown_model_lists_available():
    with pytest.raises(ValueError, match=r"unknown model 'cvt_14'; available: .*cvt_13, cvt_13_384, cvt_21"):
        torchcvt.create_model("cvt_14")
    assert {"cvt_13", "cvt_13_384", "cvt_21", "cvt_21_384", "cvt_w24"} <= set(torchcvt.list_models())


@pytest.mark.parametrize("method", ["avg", "linear"])
def test_projection_methods(tiny_overrides, method):
    model = tiny(tiny_overrides, qkv_projection_method=[method] * 3)
    attn = blocks(model, 0)[0].attn
    assert attn.conv_proj_q is None  # 'avg' pools k and v only; 'linear' has no convolution at all
    if method == "avg":
        assert isinstance(attn.conv_proj_k.avg, nn.AvgPool2d) and attn.conv_proj_k.avg.ceil_mode
    else:
        assert attn.conv_proj_k is None and attn.conv_proj_v is None
    attn.keep_attention = True
    with torch.no_grad():
        assert model(torch.randn(1, 3, 97, 131)).shape == (1, 1000)
    # 97x131 -> 24x33 tokens; ceil-mode pooling with stride 2 gives 13x17, linear keeps all of them.
    assert attn.last_kv_grid == ((13, 17) if method == "avg" else (24, 33))
    assert attn.last_attention.shape == (1, 1, 24 * 33, math.prod(attn.last_kv_grid))


def test_class_token_only_where_set(tiny_overrides):
    model = tiny(tiny_overrides, cls_token=[True, False, True])
    assert [s.cls_token is not None for s in model.stages] == [True, False, True]
    assert model.stages[0].cls_token.shape == (1, 1, 16)
    features = model.forward_features(torch.randn(2, 3, 64, 64))
    assert features.shape == (2, 1 + 4 * 4, 48)
    assert {"stage0.cls_token", "stage2.cls_token"} == model.no_weight_decay()


def test_without_class_token_head_takes_mean_of_normed_tokens(tiny_overrides):
    model = tiny(tiny_overrides, cls_token=[False, False, False])
    assert all(s.cls_token is None for s in model.stages)
    x = torch.randn(2, 3, 97, 131)
    with torch.no_grad():
        last_map = model.forward_intermediates(x, intermediates_only=True)[-1]
        tokens = last_map.flatten(2).transpose(1, 2)
        expected = model.head(model.norm(tokens).mean(dim=1))
        logits = model(x)
        torch.testing.assert_close(logits, expected)
        # The order matters: normalising the mean token gives something else.
        assert not torch.allclose(logits, model.head(model.norm(tokens.mean(dim=1))), atol=1e-3)


def test_stochastic_depth_rises_linearly_per_stage(tiny_overrides):
    model = tiny(tiny_overrides, depth=[1, 2, 10], drop_path_rate=[0.0, 0.05, 0.1])

    rates = rates_of(model)
    assert isinstance(blocks(model, 2)[0].drop_path, nn.Identity)  # rate 0 costs nothing
    assert rates[2] == pytest.approx([0.1 * i / 9 for i in range(10)])
    assert rates[1] == pytest.approx([0.0, 0.05])
    assert rates[0] == [0.0]
    with torch.device("meta"):
        assert rates_of(torchcvt.create_model("cvt_13"))[2][-1] == pytest.approx(0.1)


def test_stage_with_fewer_blocks_than_its_index(tiny_overrides):
    model = tiny(tiny_overrides, depth=[2, 1, 1], drop_path_rate=[0.2, 0.2, 0.3]).train()
    assert rates_of(model) == [[0.0, pytest.approx(0.2)], [0.0], [0.0]]
    x = torch.randn(4, 3, 64, 64)
    first, second = model(x), model(x)
    assert first.shape == (4, 1000) and not torch.equal(first, second)  # drop path is active in training
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x), model(x))


def test_activations(tiny_overrides):
    act = blocks(tiny(tiny_overrides), 0)[0].mlp.act
    assert isinstance(act, QuickGELU)
    x = torch.linspace(-4, 4, 101)
    torch.testing.assert_close(act(x), x * torch.sigmoid(1.702 * x))
    exact = blocks(tiny(tiny_overrides, activation="gelu"), 2)[1].mlp.act
    assert type(exact) is nn.GELU and exact.approximate == "none"


def test_layer_norm_computes_in_float32_under_autocast():
    norm = LayerNorm(64, eps=1e-5)
    nn.init.normal_(norm.weight)
    nn.init.normal_(norm.bias)
    x = (torch.randn(4, 10, 64) * 50 + 300).bfloat16()  # a large mean makes bfloat16 statistics inexact
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = norm(x)
        out_fp32 = norm(x.float())
    expected = F.layer_norm(x.float(), (64,), norm.weight, norm.bias, 1e-5)
    assert out.dtype == torch.bfloat16 and out_fp32.dtype == torch.float32
    torch.testing.assert_close(out_fp32, expected)
    # Each element is the float32 result rounded once to bfloat16 (1 ulp); statistics taken in
    # bfloat16 miss by far more than that on about half of the elements of this input.
    torch.testing.assert_close(out.float(), expected, rtol=2**-7, atol=1e-6)


def test_model_under_bfloat16_autocast(tiny_overrides):
    model = tiny(tiny_overrides)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        reference = model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(x)
    assert low.shape == reference.shape
    torch.testing.assert_close(low.float(), reference, rtol=0.1, atol=0.05)


def test_position_embedding(tiny_overrides):
    model = tiny(tiny_overrides, position_embedding=[True, False, True], img_size=64)
    assert model.stages[0].pos_embed.shape == (1, 16, 16, 16)
    assert model.stages[1].pos_embed is None
    assert model.stages[2].pos_embed.shape == (1, 48, 4, 4)
    assert {"stage0.pos_embed", "stage2.pos_embed", "stage2.cls_token"} == model.no_weight_decay()
    x = torch.randn(1, 3, 97, 131)
    with torch.no_grad():
        before = model(x)
        assert model(torch.randn(1, 3, 64, 64)).shape == (1, 1000)
        model.stages[2].pos_embed.zero_()
        after = model(x)  # interpolated to 6x8 tokens at this size, so it still reaches the output
    assert before.shape == (1, 1000) and not torch.allclose(before, after)


def test_patch_token_embedding(tiny_overrides):
    model = tiny(tiny_overrides, token_embedding=["patch", "conv", "conv"])
    proj = model.stage0.patch_embed.proj
    assert (proj.kernel_size, proj.stride, proj.padding) == ((4, 4), (4, 4), (0, 0))
    assert model.stage1.patch_embed.proj.kernel_size == (3, 3)
    maps = model.forward_intermediates(torch.randn(1, 3, 97, 131), intermediates_only=True)
    assert [tuple(m.shape[-2:]) for m in maps] == [(24, 32), (24, 32), (12, 16), (6, 8)]  # stem, stages


def test_timm_conventions(tiny_overrides):
    model = timm.create_model("cvt_13", num_classes=5, **tiny_overrides).eval()
    assert isinstance(model, torchcvt.CvT)
    x = torch.randn(2, 3, 97, 131)
    with torch.no_grad():
        features = model.forward_features(x)
        assert features.shape == (2, 1 + 6 * 9, 48)
        assert model.forward_head(features, pre_logits=True).shape == (2, 48)
        torch.testing.assert_close(model.forward_head(features), model(x))
        final, maps = model.forward_intermediates(x)
    torch.testing.assert_close(final, features)
    stem_and_stages = [(2, 16, 24, 33), (2, 16, 24, 33), (2, 32, 12, 17), (2, 48, 6, 9)]
    assert [tuple(m.shape) for m in maps] == stem_and_stages
    assert model.get_classifier() is model.head and model.head.out_features == 5
    model.reset_classifier(3)
    assert model.get_classifier().out_features == 3 and model(x).shape == (2, 3)
    model.reset_classifier(0)
    assert isinstance(model.get_classifier(), nn.Identity) and model(x).shape == (2, 48)
    assert model.no_weight_decay() == {"stage2.cls_token"}


@pytest.mark.parametrize("create", [torchcvt.create_model, timm.create_model])
def test_features_only(tiny_overrides, create):
    backbone = create("cvt_13", features_only=True, **tiny_overrides).eval()
    with torch.no_grad():
        maps = backbone(torch.randn(2, 3, 128, 96))
    assert [tuple(m.shape) for m in maps] == [(2, 16, 32, 24), (2, 32, 16, 12), (2, 48, 8, 6)]
    assert backbone.feature_info.channels() == [16, 32, 48]
    assert backbone.feature_info.reduction() == [4, 8, 16]


@pytest.mark.parametrize(
    ("name", "size", "crop_pct"),
    [("cvt_13", 224, 0.875), ("cvt_13_384", 384, 1.0), ("cvt_21", 224, 0.875), ("cvt_21_384", 384, 1.0),
     ("cvt_w24", 384, 1.0)],
)
def test_data_config(tiny_overrides, name, size, crop_pct):
    model = timm.create_model(name, **tiny_overrides)  # the data config does not depend on the widths
    data = timm.data.resolve_data_config(model=model)
    assert data["input_size"] == (3, size, size) and data["crop_pct"] == crop_pct
    assert data["interpolation"] == "bicubic"
    assert data["mean"] == (0.485, 0.456, 0.406) and data["std"] == (0.229, 0.224, 0.225)


@pytest.mark.parametrize("init", ["trunc_normal", "xavier"])
def test_init(tiny_overrides, init):
    model = tiny(tiny_overrides, init=init)
    fc1 = model.stage2.blocks[0].mlp.fc1  # 48 -> 192
    assert torch.count_nonzero(fc1.bias) == 0
    if init == "trunc_normal":
        assert fc1.weight.std().item() == pytest.approx(0.02, rel=0.05)
    else:
        bound = math.sqrt(6 / (48 + 192))
        assert fc1.weight.abs().max().item() <= bound
        assert fc1.weight.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.05)
    assert model.stage2.cls_token.std().item() == pytest.approx(0.02, rel=0.5)
    assert torch.equal(model.norm.weight, torch.ones(48)) and torch.equal(model.stage0.blocks[0].norm1.bias,
                                                                           torch.zeros(16))


def test_attention_scale_is_the_stage_width(tiny_overrides):
    model = tiny(tiny_overrides)
    attn: Attention = blocks(model, 2)[0].attn
    assert attn.scale == 48**-0.5  # not the head width 16 ** -0.5: the official weights depend on it


def test_xavier_init_leaves_the_head_as_the_official_code_does(tiny_overrides):
    # The official code applies `init` inside the stages only: the head keeps trunc_normal(0.02) and
    # PyTorch's default bias, uniform in +-1/sqrt(fan_in).
    model = tiny(tiny_overrides, init="xavier", num_classes=1000)
    fc1 = model.stage2.blocks[0].mlp.fc1
    assert fc1.weight.std().item() == pytest.approx(math.sqrt(2 / (48 + 192)), rel=0.05)  # xavier
    assert model.head.weight.std().item() == pytest.approx(0.02, rel=0.05)  # xavier would give 0.044
    bound = 1 / math.sqrt(48)
    assert model.head.bias.abs().max().item() <= bound
    assert model.head.bias.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.15)


def test_reset_classifier_keeps_pytorchs_default_bias(tiny_overrides):
    model = tiny(tiny_overrides)
    model.reset_classifier(1000)
    bound = 1 / math.sqrt(48)
    assert model.head.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert model.head.bias.abs().max().item() <= bound
    assert model.head.bias.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.15)  # not zeros


@pytest.mark.parametrize("fused_linear", [None, False], ids=["per-cpu-kernel", "plain-products"])
@pytest.mark.parametrize("grad", [False, True], ids=["inference", "autograd"])
def test_class_token_stage_runs_in_float32_under_autocast_as_the_official_code(tiny_overrides, grad,
                                                                               fused_linear, monkeypatch):
    # The official float32 class token promotes its concatenation with the low-precision tokens, so the
    # last stage's residual stream and the final norm run in float32; stages without one stay low.
    monkeypatch.setattr(fused, "_setting", fused._setting)
    torchcvt.set_fused_linear(fused_linear)
    model = tiny(tiny_overrides)
    x = torch.randn(2, 3, 64, 64)
    streams = {}
    for i, stage in enumerate(model.stages):
        stage.blocks[-1].register_forward_hook(lambda m, args, out, i=i: streams.update({i: out.dtype}))
    with torch.set_grad_enabled(grad):
        reference = model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            tokens = model.forward_features(x)
            logits = model.forward_head(tokens)
    assert streams == {0: torch.bfloat16, 1: torch.bfloat16, 2: torch.float32}
    assert tokens.dtype == torch.float32
    torch.testing.assert_close(logits.detach().float(), reference.detach(), rtol=0.05, atol=0.03)


@pytest.mark.parametrize("fused_linear", [None, False], ids=["per-cpu-kernel", "plain-products"])
@pytest.mark.parametrize("autocast", [False, True])
def test_empty_batch_gives_empty_logits(tiny_overrides, autocast, fused_linear, monkeypatch):
    monkeypatch.setattr(fused, "_setting", fused._setting)
    torchcvt.set_fused_linear(fused_linear)  # False: the MLP in row blocks
    model = tiny(tiny_overrides, num_classes=7)
    x = torch.randn(0, 3, 32, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        with torch.no_grad():
            assert model(x).shape == (0, 7)
        assert model.train()(x).shape == (0, 7)
        maps = model.forward_intermediates(x, intermediates_only=True)
    assert [tuple(m.shape[:2]) for m in maps] == [(0, 16), (0, 16), (0, 32), (0, 48)]


def test_average_pool_leaves_the_class_token_out(tiny_overrides):
    model = tiny(tiny_overrides, num_classes=5, global_pool="avg")  # the last stage has a class token
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        features = model.forward_features(x)
        torch.testing.assert_close(model.forward_head(features, pre_logits=True), features[:, 1:].mean(dim=1))
        torch.testing.assert_close(model(x), model.head(features[:, 1:].mean(dim=1)))
        assert model.forward_head(features, pre_logits=True).shape == (2, 48)


@pytest.mark.parametrize(("pool", "cls_token", "message"), [
    ("max", [False, False, True], r"^global_pool must be one of \['token', 'avg', ''\], got 'max'$"),
    ("token", [False, False, False], r"^global_pool='token' needs a class token in the last stage "
                                     r"\(cls_token\[-1\]\); use 'avg'$"),
])
def test_bad_global_pool_names_the_choices(tiny_overrides, pool, cls_token, message):
    with pytest.raises(TorchcvtError, match=message):
        tiny(tiny_overrides, cls_token=cls_token, global_pool=pool)
    assert tiny(tiny_overrides, cls_token=cls_token, global_pool="").global_pool == ""
    assert tiny(tiny_overrides, cls_token=cls_token).global_pool == ("token" if cls_token[-1] else "avg")


def test_layer_norm_eps_reaches_every_norm_and_the_logits(tiny_overrides):
    x = torch.randn(1, 3, 64, 64)
    torch.manual_seed(0)
    default = tiny(tiny_overrides)
    torch.manual_seed(0)
    wide = tiny(tiny_overrides, layer_norm_eps=0.5)
    norms = [m for m in wide.modules() if isinstance(m, nn.LayerNorm)]
    assert norms and {m.eps for m in norms} == {0.5} and wide.norm.eps == 0.5
    with torch.no_grad():
        assert not torch.allclose(default(x), wide(x), atol=1e-3)


def test_position_embedding_and_class_token_start_at_the_official_scale(tiny_overrides):
    model = tiny(tiny_overrides, position_embedding=[True, True, True], num_classes=1000)
    for stage in model.stages:
        assert stage.pos_embed.std().item() == pytest.approx(0.02, rel=0.1)
    assert model.head.weight.std().item() == pytest.approx(0.02, rel=0.05)



def test_no_classes_gives_the_pooled_features(tiny_overrides):
    model = tiny(tiny_overrides, num_classes=0)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        features = model.forward_features(x)
        torch.testing.assert_close(model(x), features[:, 0])
    assert isinstance(model.head, nn.Identity) and model.num_classes == 0


def test_feature_info_names_real_modules_with_their_channels_and_strides(tiny_overrides):
    model = tiny(tiny_overrides)
    assert [(i["num_chs"], i["reduction"], i["module"]) for i in model.feature_info] == [
        (16, 4, "stage0.patch_embed"), (16, 4, "stage0"), (32, 8, "stage1"), (48, 16, "stage2")]
    for info in model.feature_info:
        model.get_submodule(info["module"])
    backbone = torchcvt.create_model("cvt_13", features_only=True, out_indices=(0, 1, 2, 3), **tiny_overrides)
    with torch.no_grad():
        maps = backbone.eval()(torch.randn(1, 3, 64, 64))
    assert [m.shape[1] for m in maps] == backbone.feature_info.channels() == [16, 16, 32, 48]
    assert [64 // m.shape[-1] for m in maps] == backbone.feature_info.reduction() == [4, 4, 8, 16]


def test_reset_classifier_takes_the_pool_and_stays_on_the_models_device(tiny_overrides):
    model = tiny(tiny_overrides, num_classes=5)
    model.reset_classifier(3, "avg")
    assert model.global_pool == "avg" and model.num_classes == 3 == model.config.num_classes
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), model.head(model.forward_features(x)[:, 1:].mean(dim=1)))
    model.reset_classifier(4)
    assert model.global_pool == "avg" and model.num_classes == 4  # the pool stays unless one is given
    on_meta = tiny(tiny_overrides).to("meta")
    on_meta.reset_classifier(6)
    assert on_meta.head.weight.device.type == "meta"


def _fixed_batch_statistics(module: nn.Module) -> None:
    """BatchNorm in eval mode inside a module in training: its batch statistics are not what is tested."""
    for norm in module.modules():
        if isinstance(norm, nn.BatchNorm2d):
            norm.eval()


def test_eval_ignores_the_dropout_rates_and_training_applies_them(tiny_overrides):
    rates = {"attention_drop_rate": [0.5, 0.5, 0.5], "drop_rate": [0.5, 0.5, 0.5]}
    dropping, plain = tiny(tiny_overrides, **rates), tiny(tiny_overrides)
    plain.load_state_dict(dropping.state_dict())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(dropping(x), plain(x), rtol=0, atol=1e-6)
        dropping.train()
        plain.train()
        assert not torch.allclose(dropping(x), plain(x), atol=1e-3)


def test_attention_dropout_alone_drops_attention_weights_in_training(tiny_overrides):
    """attention_drop_rate on its own reaches the softmax weights in training (on both attention paths),
    and, as inverted dropout, leaves the mean output where evaluation puts it."""
    torch.manual_seed(0)
    dropping = tiny(tiny_overrides, attention_drop_rate=[0.5, 0.5, 0.5])
    plain = tiny(tiny_overrides)
    plain.load_state_dict(dropping.state_dict())
    x = torch.randn(2, 3, 64, 64)
    for keep_attention in (False, True):
        for model in (dropping, plain):
            for module in model.modules():
                if isinstance(module, Attention):
                    module.keep_attention = keep_attention
            model.train()
        with torch.no_grad():
            assert not torch.allclose(dropping(x), plain(x), atol=1e-3), keep_attention
    layer = dropping.stages[0].blocks[0].attn
    layer.keep_attention = False
    tokens = torch.randn(1, 16, layer.proj.in_features)
    with torch.no_grad():
        layer.eval()
        expected = layer(tokens, 4, 4)
        layer.train()
        _fixed_batch_statistics(layer)
        draws = torch.stack([layer(tokens, 4, 4) for _ in range(300)])
    assert not torch.allclose(draws[0], expected, atol=1e-3)
    spread = draws.std(0) / len(draws) ** 0.5
    assert ((draws.mean(0) - expected).abs() < 5 * spread + 1e-6).all()


def test_projection_dropout_in_training_keeps_the_residual(tiny_overrides):
    """drop_rate reaches attention's output projection in training, and the residual is still added."""
    torch.manual_seed(0)
    layer = tiny(tiny_overrides, drop_rate=[0.5, 0.5, 0.5]).stages[0].blocks[0].attn
    tokens, residual = torch.randn(2, 1, 16, layer.proj.in_features)
    with torch.no_grad():
        expected = layer.eval()(tokens, 4, 4)
        layer.train()
        _fixed_batch_statistics(layer)
        torch.manual_seed(1)
        alone = layer(tokens, 4, 4)
        torch.manual_seed(1)
        added = layer(tokens, 4, 4, residual)
    assert not torch.allclose(alone, expected, atol=1e-3)
    torch.testing.assert_close(added, residual + alone, rtol=0, atol=1e-6)


@pytest.mark.parametrize("activation", ["quick_gelu", "gelu"])
def test_mlp_dropout_in_training_is_the_formula_with_its_gradients(tiny_overrides, activation):
    """drop_rate reaches the MLP in training: residual + drop(fc2(drop(act(fc1 x)))) with the module's own
    draws, and the gradients of that formula."""
    torch.manual_seed(0)
    mlp = tiny(tiny_overrides, drop_rate=[0.5] * 3, activation=activation).stages[0].blocks[0].mlp.train()
    perturb_weights(mlp)  # non-zero biases
    x, residual = (torch.randn(2, 16, mlp.fc1.in_features, requires_grad=True) for _ in range(2))

    def formula(dropout: float) -> torch.Tensor:
        hidden = F.linear(x, mlp.fc1.weight, mlp.fc1.bias)
        hidden = hidden * torch.sigmoid(1.702 * hidden) if activation == "quick_gelu" else F.gelu(hidden)
        out = F.linear(F.dropout(hidden, dropout), mlp.fc2.weight, mlp.fc2.bias)
        return residual + F.dropout(out, dropout)

    torch.manual_seed(1)
    got = mlp(x, residual)
    torch.manual_seed(1)
    want = formula(0.5)
    assert not torch.allclose(want, formula(0.0), atol=1e-3)  # the draws drop some
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    weights = torch.randn_like(want)
    got_grads = torch.autograd.grad((got * weights).sum(), (x, residual, *mlp.parameters()))
    want_grads = torch.autograd.grad((want * weights).sum(), (x, residual, *mlp.parameters()))
    for got_grad, want_grad in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(got_grad, want_grad, rtol=1e-4, atol=1e-5)


def test_a_block_in_training_adds_each_branch_through_stochastic_depth(tiny_overrides):
    """x + drop_path(attn(norm1(x))), then + drop_path(mlp(norm2(.))), with the block's own random draws."""
    torch.manual_seed(0)
    block = tiny(tiny_overrides, drop_path_rate=0.5).stages[2].blocks[-1].train()
    assert isinstance(block.drop_path, DropPath) and block.drop_path.drop_prob > 0
    _fixed_batch_statistics(block)
    x = torch.randn(8, 1 + 16, block.norm1.normalized_shape[0])
    with torch.no_grad():
        torch.manual_seed(1)
        got = block(x, 4, 4)
        torch.manual_seed(1)
        mid = x + block.drop_path(block.attn(block.norm1(x), 4, 4))
        want = mid + block.drop_path(block.mlp(block.norm2(mid)))
    assert not torch.allclose(want, mid + block.mlp(block.norm2(mid)), atol=1e-3)  # the draws drop some
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)

"""Parameter and FLOP counts: the paper's table, the info command, and torch's own FLOP counter."""

import json

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import torchcvt
from torchcvt.cli import main
from torchcvt.flops import count_flops, count_params, format_model_info, model_info
from torchcvt.layers import Attention

# (variant, input side, paper GFLOPs, exact parameter count with 1000 classes)
PAPER = [
    ("cvt_13", 224, 4.5, 19_997_480),
    ("cvt_13_384", 384, 16.3, 19_997_480),
    ("cvt_21", 224, 7.1, 31_622_696),
    ("cvt_21_384", 384, 24.9, 31_622_696),
    ("cvt_w24", 384, 193.2, 277_196_392),
]


def torch_macs(model: torch.nn.Module, x: torch.Tensor) -> int:
    """Multiply-adds that torch.utils.flop_counter sees (it counts 2 FLOPs per multiply-add)."""
    # The CPU fused attention kernel has no FLOP formula in torch; the explicit path is counted.
    for module in model.modules():
        if isinstance(module, Attention):
            module.keep_attention = True
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x)
    return counter.get_total_flops() // 2


@pytest.mark.parametrize(("name", "size", "paper_gflops", "params"), PAPER)
def test_info_json_reproduces_paper_table(capsys, name, size, paper_gflops, params):
    assert main(["info", name, "--json"]) == 0
    info = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert info["params"] == params
    assert info["img_size"] == [size, size]
    assert info["gflops"] == pytest.approx(paper_gflops, rel=0.02)
    assert info["paper"]["gflops"] == paper_gflops


@pytest.mark.parametrize(("name", "size", "paper_gflops", "params"), PAPER)
def test_python_api_reproduces_paper_table(name, size, paper_gflops, params):
    config = torchcvt.variant_config(name)
    assert count_flops(config, size) / 1e9 == pytest.approx(paper_gflops, rel=0.02)
    assert count_flops(config, (size, size)) == count_flops(config)  # default: config.img_size


def test_flops_grow_with_input_and_depth():
    config = torchcvt.variant_config("cvt_13")
    assert count_flops(config, 224) < count_flops(config, (224, 288)) < count_flops(config, 288)
    assert count_flops(config) < count_flops(torchcvt.variant_config("cvt_21"))


def test_real_cvt_13_matches_torch_flop_counter():
    model = torchcvt.create_model("cvt_13").eval()
    assert torch_macs(model, torch.randn(1, 3, 224, 224)) == count_flops(model.config, 224)
    assert count_params(model) == count_params(model.config) == 19_997_480


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"qkv_projection_method": ["avg", "avg", "avg"]},
        {"qkv_projection_method": ["linear", "dw_bn", "avg"], "cls_token": [True, False, False]},
        {"token_embedding": ["patch", "conv", "patch"], "position_embedding": [True, True, True]},
        {"stride_kv": [1, 3, 2], "kernel_qkv": [3, 5, 3], "padding_q": [1, 2, 1], "padding_kv": [1, 2, 0],
         "mlp_ratio": [2.0, 3.0, 4.5], "num_classes": 7},
    ],
)
def test_tiny_configs_match_torch_flop_counter(tiny_overrides, overrides):
    model = torchcvt.create_model("cvt_13", **{**tiny_overrides, **overrides}).eval()
    for size in [(97, 131), (64, 64)]:
        assert torch_macs(model, torch.randn(1, 3, *size)) == count_flops(model.config, size), size


def test_model_info_stages_and_data_config():
    info = model_info("cvt_13", img_size=(256, 320))
    assert [s["grid"] for s in info["stages"]] == [[64, 80], [32, 40], [16, 20]]
    assert [s["kv_grid"] for s in info["stages"]] == [[32, 40], [16, 20], [8, 10]]
    assert [s["tokens"] for s in info["stages"]] == [5120, 1280, 321]
    assert [s["depth"] for s in info["stages"]] == [1, 2, 10]
    assert sum(s["gflops"] for s in info["stages"]) < info["gflops"]  # the head is not in a stage
    assert info["data_config"]["crop_pct"] == 0.875
    text = format_model_info(info)
    assert "19,997,480" in text and "256x320" in text and "paper 4.5" not in text
    assert "paper 4.5" in format_model_info(model_info("cvt_13"))


def test_info_text_output(capsys):
    assert main(["info", "cvt_13_384"]) == 0
    out = capsys.readouterr().out
    assert "19,997,480" in out and "16.27 at 384x384 (paper 16.3" in out
    assert "crop_pct 1.0" in out and "bicubic" in out
    assert out.splitlines()[5].split()[:7] == ["1", "96x96", "9216", "48x48", "64", "1", "1"]


def test_info_bad_input(capsys):
    assert main(["info", "cvt_99"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("torchcvt info: error: unknown model 'cvt_99'; available: ") and "cvt_13" in err
    assert len(err.splitlines()) == 1
    with pytest.raises(SystemExit):
        main(["info", "cvt_13", "--img-size", "3x"])
    assert "expected N or HxW" in capsys.readouterr().err
    assert main(["info", "cvt_13", "--img-size", "2"]) == 2
    assert "input of 2x2 pixels is too small: stage 1" in capsys.readouterr().err
    with pytest.raises(ValueError, match="image size must be an int or"):
        count_flops(torchcvt.variant_config("cvt_13"), (1, 2, 3))

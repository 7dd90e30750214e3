"""Parity with transformers' CvtForImageClassification at random weights, both directions."""

import json
import logging

import pytest
import torch
from official_cvt import OfficialCvT, Spec
from transformers import AutoConfig, CvtForImageClassification
from transformers import CvtConfig as HfCvtConfig

import torchcvt
from torchcvt.cli import main
from torchcvt.weights import read_checkpoint, save_checkpoint, save_hf

# transformers' CvtStage cannot build a stage i with depth <= i, hence 1/2/3 blocks.
HF_TINY = {"embed_dim": [16, 32, 48], "num_heads": [1, 2, 3], "depth": [1, 2, 3]}
# transformers uses exact GELU; the BatchNorm statistics set by perturb only matter in eval mode.
OURS = {**HF_TINY, "activation": "gelu", "num_classes": 5}
CLASS_NAMES = ["ant", "bee", "cat", "dog", "eel"]


@pytest.fixture
def hf_model(perturb) -> CvtForImageClassification:
    return perturb(CvtForImageClassification(HfCvtConfig(**HF_TINY, num_labels=5)).eval())


@pytest.fixture
def images() -> torch.Tensor:
    return torch.randn(2, 3, 64, 72)


@torch.no_grad()
def hf_logits(model: CvtForImageClassification, images: torch.Tensor) -> torch.Tensor:
    return model(pixel_values=images).logits


@torch.no_grad()
def our_logits(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    return model.eval()(images)


def assert_logits_match(ours: torch.Tensor, reference: torch.Tensor) -> None:
    assert (reference[0] - reference[1]).abs().max() > 1e-2, "degenerate logits would hide a wrong mapping"
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=0)


def load_hf(path) -> CvtForImageClassification:
    model, info = CvtForImageClassification.from_pretrained(path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    return model.eval()


def test_hf_directory_loads_with_same_logits(tmp_path, hf_model, images):
    hf_model.save_pretrained(tmp_path / "hf")
    model = torchcvt.create_model("cvt_13", checkpoint=tmp_path / "hf", **OURS)
    assert_logits_match(our_logits(model, images), hf_logits(hf_model, images))


def test_hf_model_without_qkv_bias_and_other_strides_loads_with_same_logits(tmp_path, perturb, images):
    options = {"qkv_bias": [False] * 3, "stride_kv": [1, 2, 2], "padding_kv": [1, 0, 1]}
    hf_model = perturb(CvtForImageClassification(HfCvtConfig(**HF_TINY, **options, num_labels=5)).eval())
    hf_model.save_pretrained(tmp_path / "hf")
    model = torchcvt.create_model("cvt_13", checkpoint=tmp_path / "hf", **OURS, **options)
    assert_logits_match(our_logits(model, images), hf_logits(hf_model, images))


@pytest.mark.parametrize("weights_name", ["model.safetensors", "pytorch_model.bin"])
def test_hf_weights_file_alone_loads_with_same_logits(tmp_path, hf_model, images, weights_name):
    path = tmp_path / weights_name
    if weights_name == "model.safetensors":
        hf_model.save_pretrained(tmp_path / "hf")
        path = tmp_path / "hf" / weights_name
        (tmp_path / "hf" / "config.json").unlink()
    else:
        torch.save(hf_model.state_dict(), path)
    model = torchcvt.create_model("cvt_13", checkpoint=path, **OURS)
    assert_logits_match(our_logits(model, images), hf_logits(hf_model, images))


def test_hf_config_that_differs_from_the_model_names_the_field(tmp_path, hf_model):
    hf_model.save_pretrained(tmp_path / "hf")
    # Head counts leave no trace in the weights: only config.json can reveal the mismatch.
    with pytest.raises(ValueError, match=r"num_heads is \[1, 2, 3\] there but \[1, 1, 1\] here"):
        torchcvt.create_model("cvt_13", checkpoint=tmp_path / "hf", **{**OURS, "num_heads": [1, 1, 1]})


def test_cli_convert_to_hf_gives_same_logits_and_labels(tmp_path, perturb, images, capsys):
    model = perturb(torchcvt.create_model("cvt_13", **OURS))
    save_checkpoint(model, tmp_path / "ours", class_names=CLASS_NAMES)
    assert main(["convert", str(tmp_path / "ours"), str(tmp_path / "hf"), "--to", "hf"]) == 0
    assert "wrote" in capsys.readouterr().out
    hf_model = load_hf(tmp_path / "hf")
    assert_logits_match(hf_logits(hf_model, images), our_logits(model, images))
    assert [hf_model.config.id2label[i] for i in range(5)] == CLASS_NAMES
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["model_type"] == "cvt"


def test_cli_convert_hf_to_official_and_back(tmp_path, hf_model, images):
    hf_model.save_pretrained(tmp_path / "hf")
    assert main(["convert", str(tmp_path / "hf"), str(tmp_path / "cvt.pth"), "--to", "official",
                 "--model", "cvt_13"]) == 0
    state_dict = torch.load(tmp_path / "cvt.pth", weights_only=True)
    # The official module tree loads the file strictly and gives transformers' logits.
    official = OfficialCvT(Spec(depth=(1, 2, 3)), num_classes=5, activation="gelu")
    official.load_state_dict(state_dict, strict=True)
    assert_logits_match(official.eval()(images), hf_logits(hf_model, images))
    model = torchcvt.create_model("cvt_13", checkpoint=tmp_path / "cvt.pth", **OURS)
    assert_logits_match(our_logits(model, images), hf_logits(hf_model, images))
    # And back to transformers from the model the official file built.
    save_hf(model, tmp_path / "hf2")
    assert_logits_match(hf_logits(load_hf(tmp_path / "hf2"), images), hf_logits(hf_model, images))


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


def test_quick_gelu_model_to_hf_warns_outputs_differ(tmp_path, caplog):
    model = torchcvt.create_model("cvt_13", **{**OURS, "activation": "quick_gelu"})
    with caplog.at_level(logging.WARNING, logger="torchcvt"):
        save_hf(model, tmp_path / "hf")
    assert [m for m in _warnings(caplog) if "exact GELU" in m], caplog.text
    load_hf(tmp_path / "hf")


def test_models_transformers_cannot_run_warn(tmp_path, tiny_overrides, caplog):
    model = torchcvt.create_model("cvt_13", activation="gelu", **tiny_overrides)
    with caplog.at_level(logging.WARNING, logger="torchcvt"):
        save_hf(model, tmp_path / "hf")
    assert [m for m in _warnings(caplog) if "fails to build when depth[i] <= i (stage 1 has depth 1)" in m]
    caplog.clear()
    model = torchcvt.create_model("cvt_13", **{**OURS, "cls_token": [False] * 3})
    with caplog.at_level(logging.WARNING, logger="torchcvt"):
        save_hf(model, tmp_path / "hf2")
    assert [m for m in _warnings(caplog) if "fails without a class token in the last stage" in m]


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"qkv_projection_method": ["dw_bn", "avg", "dw_bn"]}, "stage 1's qkv_projection_method 'avg'"),
        ({"qkv_projection_method": ["linear"] * 3}, "stage 0's qkv_projection_method 'linear'"),
        ({"position_embedding": [False, False, True]}, "stage 2's position embedding"),
        ({"token_embedding": ["patch", "conv", "conv"]}, "stage 0's 'patch' token embedding"),
        ({"cls_token": [False, True, True]}, "stage 1's class token of width 32"),
    ],
)
def test_what_transformers_cannot_represent_is_an_error(tmp_path, overrides, match):
    model = torchcvt.create_model("cvt_13", **{**OURS, **overrides})
    with pytest.raises(ValueError, match=match):
        save_hf(model, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


QUICK_GELU = ("the model uses activation='quick_gelu', which transformers' CvT config cannot express (it "
              "always uses exact GELU): transformers' copy is an approximation, its outputs differ; "
              "--remote-code (remote_code=True) adds model code it runs exactly with trust_remote_code=True")
EPS = ("the model uses layer_norm_eps=1e-06 but transformers' CvT always uses 1e-05: transformers' outputs "
       "will differ (torchcvt reloads it exactly)")
NO_CLS = ("transformers' CvtForImageClassification.forward fails without a class token in the last stage: "
          "the files are correct but transformers cannot run them")


@pytest.mark.parametrize(
    ("overrides", "remote_code", "expected"),
    [
        ({}, False, []),
        ({"activation": "quick_gelu"}, False, [QUICK_GELU]),
        ({"activation": "quick_gelu", "layer_norm_eps": 1e-6}, True, []),  # the model code runs them exactly
        ({"layer_norm_eps": 1e-6}, False, [EPS]),
        ({"cls_token": [False, False, False]}, False, [NO_CLS]),
        ({"cls_token": [False, False, False]}, True, [NO_CLS]),
    ],
)
def test_an_export_to_transformers_warns_of_exactly_what_transformers_does_differently(
    tmp_path, caplog, overrides, remote_code, expected
):
    model = torchcvt.create_model("cvt_13", **{**OURS, **overrides})
    with caplog.at_level(logging.WARNING, logger="torchcvt"):
        save_hf(model, tmp_path / "hf", remote_code=remote_code)
    assert _warnings(caplog) == expected


def test_an_export_to_transformers_records_torchcvts_config_and_what_transformers_reads(tmp_path):
    model = torchcvt.create_model("cvt_13", **{**OURS, "activation": "quick_gelu", "layer_norm_eps": 1e-6})
    save_hf(model, tmp_path / "hf", class_names=CLASS_NAMES)
    seen = AutoConfig.from_pretrained(tmp_path / "hf")
    assert seen.architectures == ["CvtForImageClassification"] and seen.num_labels == 5
    assert seen.label2id == {name: i for i, name in enumerate(CLASS_NAMES)}
    stored = read_checkpoint(tmp_path / "hf")
    assert stored.architecture == "cvt_13" and stored.class_names == tuple(CLASS_NAMES)
    assert (stored.config["activation"], stored.config["layer_norm_eps"]) == ("quick_gelu", 1e-6)

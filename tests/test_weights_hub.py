"""Pretrained tags from a Hugging Face cache built on disk in the Hub's layout; no network anywhere."""

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import timm
import torch
from timm.models import adapt_input_conv
from trainkit import perturb_weights
from transformers import CvtConfig, CvtForImageClassification

import torchcvt
from torchcvt.factory import pretrained_weights
from torchcvt.weights import HF_BIN_NAME, WEIGHTS_NAME

# transformers' CvtStage needs depth[i] > i; the released cvt-13 is the same model, only larger.
HF_TINY = {"embed_dim": [16, 32, 48], "num_heads": [1, 2, 3], "depth": [1, 2, 3]}
REPO = "microsoft/cvt-13"
REVISION = "4f1c3e0b8a2d6e9f0a1b2c3d4e5f60718293a4b5"
SRC = Path(__file__).resolve().parents[1] / "src"


@pytest.fixture(scope="module")
def hf_model() -> CvtForImageClassification:
    """transformers' CvT at random weights, with moved BatchNorm statistics so that every tensor counts."""
    torch.manual_seed(0)
    return perturb_weights(CvtForImageClassification(CvtConfig(**HF_TINY, num_labels=1000)).eval())


def build_cache(home: Path, model: CvtForImageClassification, weights: str) -> Path:
    """HF_HOME/hub/models--microsoft--cvt-13/{refs/main, snapshots/REV/...} with one weights file."""
    repo = home / "hub" / f"models--{REPO.replace('/', '--')}"
    snapshot = repo / "snapshots" / REVISION
    model.save_pretrained(snapshot)
    if weights == HF_BIN_NAME:
        (snapshot / WEIGHTS_NAME).unlink()
        torch.save(model.state_dict(), snapshot / HF_BIN_NAME)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(REVISION)
    return snapshot


@pytest.mark.parametrize("weights", [WEIGHTS_NAME, HF_BIN_NAME])
def test_pretrained_matches_transformers_from_the_same_cache(offline_home, hf_model, weights):
    snapshot = build_cache(offline_home, hf_model, weights)
    assert sorted(p.name for p in snapshot.iterdir()) == sorted(["config.json", weights])
    ours = torchcvt.create_model("cvt_13", pretrained=True, activation="gelu", **HF_TINY).eval()
    theirs = CvtForImageClassification.from_pretrained(
        REPO, cache_dir=offline_home / "hub", local_files_only=True
    ).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x).logits, atol=1e-5, rtol=0)
    assert ours.pretrained_cfg["hf_hub_id"] == REPO and ours.pretrained_cfg["tag"] == "ms_in1k"
    assert ours.pretrained_cfg["label_names"][:2] == ("tench", "goldfish")


def test_tags_and_timm_entry_points(offline_home, hf_model):
    build_cache(offline_home, hf_model, WEIGHTS_NAME)
    reference = torchcvt.create_model("cvt_13.ms_in1k", pretrained=True, **HF_TINY).eval()
    assert reference.config.activation == "quick_gelu"  # official weights keep their activation
    via_timm = timm.create_model("cvt_13.ms_in1k", pretrained=True, **HF_TINY).eval()
    torch.testing.assert_close(via_timm.state_dict(), reference.state_dict(), atol=0, rtol=0)
    pin = {"hf_hub_id": f"{REPO}@{REVISION}"}  # timm's way of pinning a revision
    pinned = timm.create_model("cvt_13", pretrained=True, pretrained_cfg_overlay=pin, **HF_TINY)
    torch.testing.assert_close(pinned.state_dict(), reference.state_dict(), atol=0, rtol=0)
    other = "0" * 40
    with pytest.raises(ValueError, match=f"https://huggingface.co/{REPO}/tree/{other}"):
        overlay = {"hf_hub_id": f"{REPO}@{other}"}
        torchcvt.create_model("cvt_13", pretrained=True, pretrained_cfg_overlay=overlay, **HF_TINY)
    assert timm.list_pretrained("cvt*") == [
        "cvt_13.ms_in1k", "cvt_13_384.ms_in1k", "cvt_13_384.ms_in22k_ft_in1k", "cvt_21.ms_in1k",
        "cvt_21_384.ms_in1k", "cvt_21_384.ms_in22k_ft_in1k", "cvt_w24.ms_in22k_ft_in1k",
    ]
    assert torchcvt.list_models(pretrained=True) == timm.list_pretrained("cvt*")
    default_384 = timm.models.get_pretrained_cfg("cvt_13_384")
    assert (default_384.tag, default_384.hf_hub_id) == ("ms_in22k_ft_in1k", "microsoft/cvt-13-384-22k")
    for name in timm.list_pretrained("cvt*"):
        cfg = timm.models.get_pretrained_cfg(name)
        assert cfg.hf_hub_id.startswith("microsoft/cvt-") and cfg.license == "apache-2.0"
        assert cfg.paper_ids == "arXiv:2103.15808" and "top-1" in cfg.notes[0]
        assert cfg.num_classes == 1000 and cfg.input_size[1] in (224, 384)


def test_pretrained_cfg_overlay_file_needs_no_hub(offline_home, hf_model, tmp_path):
    snapshot = build_cache(tmp_path / "elsewhere", hf_model, WEIGHTS_NAME)
    overlay = {"file": snapshot / WEIGHTS_NAME}
    model = timm.create_model("cvt_13", pretrained=True, pretrained_cfg_overlay=overlay, activation="gelu",
                              **HF_TINY).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), hf_model(x).logits, atol=1e-5, rtol=0)


def test_new_head_and_in_chans_adapt_the_released_weights(offline_home, hf_model):
    build_cache(offline_home, hf_model, WEIGHTS_NAME)
    reference = torchcvt.create_model("cvt_13", pretrained=True, **HF_TINY)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a new head for fine-tuning is what was asked for: no warning
        model = torchcvt.create_model("cvt_13", pretrained=True, num_classes=10, in_chans=1, **HF_TINY)
    assert model.head.weight.shape == (10, 48) and "label_names" not in model.pretrained_cfg
    first = reference.stage0.patch_embed.proj.weight
    torch.testing.assert_close(model.stage0.patch_embed.proj.weight, adapt_input_conv(1, first))
    torch.testing.assert_close(model.stage0.patch_embed.proj.weight, first.sum(dim=1, keepdim=True))
    assert model.pretrained_cfg["input_size"] == (1, 224, 224)
    kept = ("head.", "stage0.patch_embed.proj")
    ours = {k: v for k, v in model.state_dict().items() if not k.startswith(kept)}
    for key, value in ours.items():
        assert torch.equal(value, reference.state_dict()[key]), key
    assert model(torch.randn(2, 1, 64, 64)).shape == (2, 10)


def test_missing_cache_is_a_one_line_error(offline_home):
    with pytest.raises(ValueError) as error:  # a TorchcvtError: the CLI shows it as one line
        torchcvt.create_model("cvt_21_384", pretrained=True)
    message = str(error.value)
    assert "microsoft/cvt-21-384-22k" in message and "HF_HUB_OFFLINE" in message and "HF_HOME" in message
    assert "https://huggingface.co/microsoft/cvt-21-384-22k" in message and "checkpoint=PATH" in message
    assert "torchcvt train: model.checkpoint=PATH" in message  # train's form of it: train has no --checkpoint
    assert "\n" not in message


def test_without_offline_mode_the_hub_is_announced_and_asked_once(offline_home, monkeypatch, caplog):
    """Without a network huggingface_hub retries for about half a minute a file: the user hears of it
    first, and a second file name is not tried after the Hub proved unreachable."""
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE")
    asked, heard = [], []

    def unreachable(repo, filename, **kwargs):
        asked.append(filename)
        heard.append(caplog.text)
        raise LocalEntryNotFoundError("cannot reach the Hub")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", unreachable)
    with caplog.at_level("INFO", logger="torchcvt"), pytest.raises(ValueError) as error:
        torchcvt.create_model("cvt_13", pretrained=True)
    assert asked == [WEIGHTS_NAME]
    assert "downloading the weights of microsoft/cvt-13" in heard[0]
    assert "set HF_HUB_OFFLINE=1 to use the cache alone" in heard[0]
    assert "the download failed (cannot reach the Hub); check the network" in str(error.value)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: torchcvt.create_model("cvt_13.ms_in9k"), r"no pretrained tag 'ms_in9k'; tags: cvt_13\.ms_"),
        (lambda: torchcvt.create_model("cvt_digits", pretrained=True), r"cvt_digits has no released weights"),
        (lambda: torchcvt.create_model("cvt_13", pretrained=True, checkpoint="x.pth"), r"not both"),
        (lambda: torchcvt.create_model("cvt_1", pretrained=True), r"unknown model 'cvt_1'"),
    ],
)
def test_bad_pretrained_requests(offline_home, call, message):
    with pytest.raises(ValueError, match=message):
        call()


def _cli(home: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HOME": str(home), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(SRC),
           "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "torchcvt", *args], capture_output=True, text=True, env=env,
                          timeout=120)


def test_cli_pretrained_predicts_with_imagenet_names(offline_home, hf_model, tmp_path, one_thread):
    from PIL import Image

    build_cache(offline_home, hf_model, HF_BIN_NAME)
    image = tmp_path / "image.png"
    Image.new("RGB", (80, 60), (200, 30, 90)).save(image)
    tiny = [f"--set={key}={value}" for key, value in HF_TINY.items()]
    done = _cli(offline_home, "predict", "--model", "cvt_13.ms_in1k", "--pretrained", *tiny, str(image),
                "--top-k", "3", "--json", str(tmp_path / "out.json"), "--quiet")
    assert done.returncode == 0, done.stderr
    predictions = json.loads((tmp_path / "out.json").read_text())
    expected = torchcvt.predictor("cvt_13", pretrained_weights("cvt_13")[1], **HF_TINY)(image, top_k=3)
    names = [p["label"] for p in predictions[0]["predictions"]]
    assert names == [p.label for p in expected]
    imagenet = torchcvt.create_model("cvt_13", pretrained=True, **HF_TINY).pretrained_cfg["label_names"]
    assert [imagenet[p["index"]] for p in predictions[0]["predictions"]] == names


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["predict", "--model", "cvt_13", "--pretrained", "image.png"], "HF_HUB_OFFLINE is set"),
        (["eval", "--model", "cvt_13", "--pretrained", "--checkpoint", "x.pth", "--data", "."],
         "--pretrained and --checkpoint exclude each other"),
        (["eval", "--model", "cvt_13", "--data", "."], "give --checkpoint CKPT or --pretrained"),
        (["convert", "--model", "cvt_13", "--pretrained", "a", "b", "--to", "hf"], "without SRC"),
        (["convert", "b", "--to", "hf"], "give SRC and DST, or --pretrained --model NAME and DST"),
        (["export", "--model", "cvt_digits", "--pretrained", "--format", "onnx", "-o", "x.onnx"],
         "cvt_digits has no released weights"),
    ],
)
def test_cli_pretrained_errors_are_one_line(offline_home, capsys, args, message):
    from torchcvt.cli import main

    assert main(args) == 2
    captured = capsys.readouterr()
    assert message in captured.err and captured.err.count("\n") == 1 and captured.out == ""

"""The one builder: every path to a model goes through create_model and reads a checkpoint the same way."""

import json
import logging

import pytest
import torch
from transformers import CvtConfig, CvtForImageClassification

import torchcvt
from torchcvt.cli import main
from torchcvt.factory import convert_checkpoint, create_model, model_from_checkpoint
from torchcvt.model import CvT
from torchcvt.weights import read_checkpoint, save_checkpoint, save_hf, save_official

# transformers' CvtStage needs depth[i] > i.
HF_TINY = {"embed_dim": [16, 32, 48], "num_heads": [1, 2, 3], "depth": [1, 2, 3]}
X = torch.randn(2, 3, 64, 64)


@pytest.fixture
def gelu_model(perturb) -> CvT:
    return perturb(create_model("cvt_13", num_classes=5, activation="gelu", **HF_TINY)).eval()


@torch.no_grad()
def same_outputs(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    return torch.equal(a.eval()(X), b.eval()(X))


def activation_notices(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if "activation='gelu'" in r.getMessage()]


@pytest.mark.parametrize("fmt", ["hf", "torchcvt"])
def test_a_gelu_model_comes_back_with_gelu_from_every_loader(tmp_path, gelu_model, fmt, caplog):
    """Saved as a transformers folder (or torchcvt's format), every loader rebuilds exact GELU."""
    saved = tmp_path / "saved"
    (save_hf if fmt == "hf" else save_checkpoint)(gelu_model, saved)
    with caplog.at_level(logging.INFO, logger="torchcvt"):
        loaders = {
            "model_from_checkpoint": model_from_checkpoint("cvt_13", saved),
            "unnamed": model_from_checkpoint(None, saved),
            "create_model": create_model("cvt_13", checkpoint=saved),
            "predictor": torchcvt.predictor("cvt_13", saved).model,
            "convert": convert_checkpoint(saved, tmp_path / "converted", "torchcvt"),
        }
    for how, model in loaders.items():
        assert model.config.activation == "gelu", how
        assert same_outputs(model, gelu_model), how
    assert read_checkpoint(tmp_path / "converted").config["activation"] == "gelu"
    assert not activation_notices(caplog)


def test_a_foreign_transformers_folder_loads_with_the_default_and_one_notice(tmp_path, caplog):
    torch.manual_seed(0)
    CvtForImageClassification(CvtConfig(**HF_TINY, num_labels=4)).save_pretrained(tmp_path / "hf")
    with caplog.at_level(logging.INFO, logger="torchcvt"):
        model = model_from_checkpoint("cvt_13", tmp_path / "hf")
    assert model.config.activation == "quick_gelu" and model.num_classes == 4
    notices = activation_notices(caplog)
    assert notices == [
        f"{tmp_path / 'hf' / 'model.safetensors'} is a transformers folder, which does not record the "
        "activation its weights were trained with: using quick_gelu (torchcvt's default, the official CvT's "
        "QuickGELU); if they were trained with transformers' exact GELU, pass activation='gelu' "
        "(--set activation=gelu)"]
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="torchcvt"):
        chosen = model_from_checkpoint("cvt_13", tmp_path / "hf", activation="gelu")
    assert chosen.config.activation == "gelu" and not activation_notices(caplog)


def test_save_official_says_what_the_pth_cannot_record(tmp_path, gelu_model, caplog):
    with caplog.at_level(logging.WARNING, logger="torchcvt"):
        save_official(gelu_model, tmp_path / "cvt.pth")
    assert [r for r in caplog.records if r.levelno == logging.WARNING
            and "reload cvt.pth with activation=gelu" in r.getMessage()], caplog.text


@pytest.fixture
def three_class_checkpoint(tmp_path, tiny_overrides, perturb):
    model = perturb(create_model("cvt_13", num_classes=3, **tiny_overrides))
    model.pretrained_cfg["label_names"] = ("cat", "dog", "fish")
    torch.save({"state_dict": model.state_dict(), "model_name": "cvt_13", "config": model.config.to_dict(),
                "class_names": ["cat", "dog", "fish"]}, tmp_path / "best.pth")
    return tmp_path / "best.pth", model


def test_a_checkpoints_head_and_class_names_are_kept_unless_num_classes_asks(three_class_checkpoint):
    path, trained = three_class_checkpoint
    model = create_model("cvt_13", checkpoint=path)
    assert model.num_classes == 3 and model.pretrained_cfg["label_names"] == ("cat", "dog", "fish")
    assert same_outputs(model, trained)
    predictor = torchcvt.predictor("cvt_13", path)
    assert predictor.model.num_classes == 3 and predictor.class_names == ["cat", "dog", "fish"]
    other = create_model("cvt_13", checkpoint=path, num_classes=5)
    assert other.num_classes == 5 and "label_names" not in other.pretrained_cfg
    assert create_model("cvt_digits").num_classes == 1000  # no weights: ImageNet-sized


def foreign(folder):
    """A folder torchcvt wrote, stripped of what torchcvt records: as transformers' own would be."""
    config = json.loads((folder / "config.json").read_text())
    del config["torchcvt"]
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize("strip", [False, True], ids=["torchcvt-written", "foreign"])
def test_a_transformers_folder_of_another_variant_is_a_one_line_error(tmp_path, capsys, strip):
    folder = save_hf(create_model("cvt_digits", num_classes=4), tmp_path / "digits-hf")
    if strip:
        foreign(folder)
    image = tmp_path / "image.png"
    from PIL import Image

    Image.new("RGB", (40, 30), (10, 200, 30)).save(image)
    assert main(["predict", "--model", "cvt_13", "--checkpoint", str(folder), str(image), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "holds a cvt_digits whose embed_dim is [32, 64, 128] but cvt_13's" in err
    assert "use cvt_digits as the model" in err
    assert model_from_checkpoint(None, folder).pretrained_cfg["architecture"] == "cvt_digits"


def test_a_folder_of_an_unregistered_architecture_is_built_with_a_notice(tmp_path, caplog):
    folder = foreign(save_hf(create_model("cvt_13", activation="gelu", **HF_TINY), tmp_path / "custom"))
    with caplog.at_level(logging.INFO, logger="torchcvt"):
        model = model_from_checkpoint("cvt_13", folder, activation="gelu")
    assert list(model.config.embed_dim) == HF_TINY["embed_dim"]
    assert "holds a CvT of its own architecture, not cvt_13's (embed_dim [16, 32, 48]" in caplog.text


def test_every_loader_builds_through_create_model(tmp_path, three_class_checkpoint, monkeypatch, capsys):
    """CvT is constructed only inside factory.create_model, whatever path asks for a model."""
    import inspect

    path, _ = three_class_checkpoint
    builders = []
    original = CvT.__init__

    def spy(self, *args, **kwargs):
        builders.append([frame.function for frame in inspect.stack()[1:4]])
        original(self, *args, **kwargs)

    monkeypatch.setattr(CvT, "__init__", spy)
    model_from_checkpoint("cvt_13", path)
    torchcvt.predictor("cvt_13", path)
    convert_checkpoint(path, tmp_path / "out.safetensors", "torchcvt")
    assert main(["export", "--model", "cvt_13", "--checkpoint", str(path), "--format", "torchscript",
                 "-o", str(tmp_path / "m.pt")]) == 0
    assert builders and all(callers[0] == "create_model" for callers in builders), builders

"""The transformers export is complete: pipeline, AutoImageProcessor and a model card work on what
`torchcvt convert --to hf` writes; commands take the variant a checkpoint records when --model is omitted."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from trainkit import digits_tree, tiny_overrides, train_on_one_thread

import torchcvt
from torchcvt.cli import main
from torchcvt.config import IMAGENET_MEAN, IMAGENET_STD
from torchcvt.data import eval_transform
from torchcvt.errors import TorchcvtError
from torchcvt.files import write_json
from torchcvt.weights import save_official
from torchcvt.weights.formats import hf_preprocessor_json

transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.usefixtures("one_thread")

CLASS_NAMES = ["zero", "one", "two"]
# transformers' CvtStage cannot build a stage i with depth <= i; transformers runs exact GELU.
HF_RUNNABLE = {"embed_dim": [16, 24, 32], "num_heads": [1, 1, 2], "depth": [1, 2, 3], "activation": "gelu"}


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real `torchcvt train` run on three named digit classes; returns its folder."""
    root = tmp_path_factory.mktemp("work")
    data = digits_tree(root / "digits")
    for split in ("train", "val"):
        for digit, name in enumerate(CLASS_NAMES):
            os.rename(data / split / str(digit), data / split / name)
    overrides = {"model.overrides": HF_RUNNABLE, "train.epochs": 3}
    train_on_one_thread(tiny_overrides(data, root / "run", **overrides))
    return root / "run"


@pytest.fixture(scope="module")
def hf_dir(run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("export") / "hf"
    assert main(["convert", str(run / "best.pth"), str(out), "--to", "hf"]) == 0
    return out


@pytest.fixture(scope="module")
def digit_png(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A digit the run never saw, as a non-square RGB PNG, so resizing matters."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    last_two = np.flatnonzero(digits.target == 2)[-1]  # the tree takes each class's first images
    pixels = np.clip(digits.images[last_two] * 255 / 16, 0, 255).astype(np.uint8)
    path = tmp_path_factory.mktemp("image") / "digit.png"
    Image.fromarray(pixels).resize((40, 52), Image.BICUBIC).convert("RGB").save(path)
    return path


def _image(width: int, height: int) -> Image.Image:
    rng = np.random.default_rng(width * height)
    y, x = np.mgrid[0:height, 0:width]
    pixels = np.stack([np.sin(x / 17) * 127 + 128, np.cos(y / 11) * 127 + 128, (x + y) % 256], -1)
    return Image.fromarray(np.clip(pixels + rng.normal(0, 20, pixels.shape), 0, 255).astype(np.uint8))


BICUBIC = {"interpolation": "bicubic"}


@pytest.mark.parametrize(
    ("size", "given", "processor"),
    [
        # the 224 models: resize 256, centre-crop 224; and a crop_pct other than ConvNext's default
        (224, {"crop_pct": 0.875, **BICUBIC}, "ConvNextImageProcessor"),
        (224, {"crop_pct": 0.9, **BICUBIC}, "ConvNextImageProcessor"),
        (384, {"crop_pct": 1.0, **BICUBIC}, "ConvNextImageProcessor"),  # the 384 models: squash
        # cvt_digits: squash below 384, where ConvNext would crop
        (32, {"crop_pct": 1.0, **BICUBIC}, "ViTImageProcessor"),
        (448, {"crop_pct": 0.875, **BICUBIC}, "BitImageProcessor"),  # a crop above 384: ConvNext squashes
        (224, {}, "ConvNextImageProcessor"),  # no crop_pct or interpolation given: the defaults agree
        (64, {"crop_pct": 1.0, "interpolation": "bilinear"}, "ViTImageProcessor"),  # not the default filter
        # not square: both sides by crop_pct, then the crop
        ((48, 64), {"crop_pct": 0.875, **BICUBIC}, "DeiTImageProcessor"),
    ],
)
def test_preprocessor_config_reproduces_the_eval_transform(tmp_path, size, given, processor):
    height, width = size if isinstance(size, tuple) else (size, size)
    data_config = {"input_size": (3, height, width), "mean": IMAGENET_MEAN, "std": IMAGENET_STD, **given}
    write_json(tmp_path / "preprocessor_config.json", hf_preprocessor_json(data_config))
    loaded = transformers.AutoImageProcessor.from_pretrained(tmp_path, backend="pil")
    assert type(loaded).__name__ == f"{processor}Pil"
    ours = eval_transform(data_config)
    for width, height in [(300, 400), (500, 375), (640, 480), (33, 40)]:
        image = _image(width, height)
        theirs = loaded(image, return_tensors="pt")["pixel_values"][0]
        torch.testing.assert_close(theirs, ours(image), atol=1e-5, rtol=0)


def test_an_interpolation_without_a_pil_filter_is_named():
    with pytest.raises(TorchcvtError) as error:
        hf_preprocessor_json({"input_size": (3, 32, 32), "interpolation": "lanczos9", "mean": IMAGENET_MEAN,
                              "std": IMAGENET_STD})
    assert str(error.value) == "interpolation 'lanczos9' has no PIL resampling filter"


def test_pipeline_gives_torchcvt_predict_top1_and_probabilities(hf_dir, run, digit_png, tmp_path):
    report = tmp_path / "predict.json"
    assert main(["predict", "--checkpoint", str(run / "best.pth"), str(digit_png), "--top-k", "3",
                 "--json", str(report), "--workers", "0", "--quiet"]) == 0
    ours = {p["label"]: p["prob"] for p in json.loads(report.read_text())[0]["predictions"]}
    assert max(ours.values()) < 0.999, "a saturated softmax would hide differences in the probabilities"
    processor = transformers.AutoImageProcessor.from_pretrained(hf_dir)
    assert type(processor).__name__.startswith("ViTImageProcessor")
    # The default backend (torchvision) and the PIL one, which resamples exactly as torchcvt does.
    for tolerance, options in ((1e-4, {}), (1e-6, {"image_processor": transformers.AutoImageProcessor
                                                    .from_pretrained(hf_dir, backend="pil")})):
        classify = transformers.pipeline("image-classification", model=str(hf_dir), top_k=3, **options)
        theirs = {p["label"]: p["score"] for p in classify(str(digit_png))}
        assert max(theirs, key=theirs.get) == max(ours, key=ours.get)
        assert theirs.keys() == ours.keys() == set(CLASS_NAMES)
        for label in CLASS_NAMES:
            assert theirs[label] == pytest.approx(ours[label], abs=tolerance)


def test_config_names_the_classes(hf_dir):
    config = json.loads((hf_dir / "config.json").read_text())
    in_folder_order = sorted(CLASS_NAMES)  # ImageFolder's
    assert config["id2label"] == {str(i): name for i, name in enumerate(in_folder_order)}
    assert config["label2id"] == {name: i for i, name in enumerate(in_folder_order)}


def test_model_card_has_hub_metadata_and_the_runs_metrics(hf_dir, run):
    import yaml

    text = (hf_dir / "README.md").read_text()
    assert text.startswith("---\n")
    meta = yaml.safe_load(text.split("---\n")[1])
    summary = json.loads((run / "summary.json").read_text())
    assert meta["library_name"] == "transformers" and meta["pipeline_tag"] == "image-classification"
    assert {"cvt", "torchcvt", "image-classification"} <= set(meta["tags"])
    assert meta["datasets"] == ["digits"] and meta["metrics"] == ["accuracy"]
    scores = meta["model-index"][0]["results"][0]["metrics"]
    assert [m["value"] for m in scores] == pytest.approx(
        [summary["best_val_top1"], summary["best_val_top5"]], abs=1e-4)
    assert "Activation: exact GELU" in text
    assert 'pipeline("image-classification"' in text and "torchcvt.create_model(None" in text


def test_quick_gelu_export_tells_the_user(tmp_path, capsys):
    model = torchcvt.create_model("cvt_digits", **{**HF_RUNNABLE, "activation": "quick_gelu"}, num_classes=2)
    torchcvt.weights.save_checkpoint(model, tmp_path / "ours", class_names=["cat", "dog"])
    assert main(["convert", str(tmp_path / "ours"), str(tmp_path / "hf"), "--to", "hf"]) == 0
    assert "exact GELU" in capsys.readouterr().err
    card = (tmp_path / "hf" / "README.md").read_text()
    assert "Activation: QuickGELU" in card and "transformers' CvT always runs exact GELU" in card
    assert "transformers' copy is an approximation" in card and "ONNX and TorchScript" in card
    assert "model-index" not in card  # no run summary: no metrics claimed


def test_remote_code_export_runs_a_quick_gelu_model_exactly_in_transformers(tmp_path, digit_png, capsys):
    from trainkit import perturb_weights

    torch.manual_seed(0)
    model = perturb_weights(torchcvt.create_model("cvt_digits", **{**HF_RUNNABLE, "activation": "quick_gelu",
                                                                    "layer_norm_eps": 1e-6}, num_classes=3))
    torchcvt.weights.save_checkpoint(model, tmp_path / "ours", class_names=CLASS_NAMES)
    ours_dir = str(tmp_path / "ours")
    assert main(["convert", ours_dir, str(tmp_path / "exact"), "--to", "hf", "--remote-code"]) == 0
    assert main(["convert", str(tmp_path / "ours"), str(tmp_path / "plain"), "--to", "hf"]) == 0
    assert "exact GELU" in capsys.readouterr().err  # the plain export warns, once
    report = tmp_path / "predict.json"
    assert main(["predict", "--checkpoint", str(tmp_path / "ours"), str(digit_png), "--top-k", "3",
                 "--json", str(report), "--workers", "0", "--quiet"]) == 0
    ours = {p["label"]: p["prob"] for p in json.loads(report.read_text())[0]["predictions"]}
    assert max(ours.values()) < 0.99, "a saturated softmax would hide differences in the probabilities"

    def pipeline_probabilities(folder: Path, **options) -> dict[str, float]:
        processor = transformers.AutoImageProcessor.from_pretrained(folder, backend="pil")
        classify = transformers.pipeline("image-classification", model=str(folder), top_k=3,
                                         image_processor=processor, **options)
        return {p["label"]: p["score"] for p in classify(str(digit_png))}

    exact = pipeline_probabilities(tmp_path / "exact", trust_remote_code=True)
    assert exact.keys() == ours.keys()
    assert max(abs(exact[label] - ours[label]) for label in ours) < 1e-4
    # The same folder without trust_remote_code, and the plain export: transformers' GELU, visibly apart.
    for folder in ("exact", "plain"):
        approximate = pipeline_probabilities(tmp_path / folder)
        assert max(abs(approximate[label] - ours[label]) for label in ours) > 1e-3
    card = (tmp_path / "exact" / "README.md").read_text()
    assert "trust_remote_code=True" in card and "modeling_torchcvt.py" in card
    assert (tmp_path / "exact" / "modeling_torchcvt.py").is_file()
    assert not (tmp_path / "plain" / "modeling_torchcvt.py").exists()
    assert "transformers' copy is an approximation" in (tmp_path / "plain" / "README.md").read_text()


def test_remote_code_is_for_the_transformers_format(tmp_path, capsys):
    model = torchcvt.create_model("cvt_digits", **HF_RUNNABLE, num_classes=2)
    torchcvt.weights.save_checkpoint(model, tmp_path / "ours")
    assert main(["convert", str(tmp_path / "ours"), str(tmp_path / "o.pth"), "--to", "official",
                 "--remote-code"]) == 2
    assert "remote code is for the transformers format (hf), not 'official'" in capsys.readouterr().err


def test_card_without_a_summary_beside_the_checkpoint_claims_no_metrics(run, tmp_path):
    (tmp_path / "best.pth").write_bytes((run / "best.pth").read_bytes())
    assert main(["convert", str(tmp_path / "best.pth"), str(tmp_path / "hf"), "--to", "hf"]) == 0
    meta = (tmp_path / "hf" / "README.md").read_text().split("---\n")[1]
    assert "model-index" not in meta and "datasets:\n- \"digits\"" in meta


@pytest.mark.parametrize(
    "command",
    [
        ["predict", "{image}", "--workers", "0", "--quiet"],
        ["embed", "{image}", "-o", "{out}/features.npy", "--workers", "0", "--quiet"],
        ["attention", "{image}", "-o", "{out}/attention.png"],
        ["export", "--format", "torchscript", "-o", "{out}/model.pt"],
        ["eval", "--data", "{data}", "--output", "{out}", "--workers", "0", "--device", "cpu"],
    ],
    ids=lambda command: command[0],
)
def test_commands_take_the_recorded_variant_without_model(run, digit_png, tmp_path, capsys, command):
    fill = {"image": str(digit_png), "out": str(tmp_path), "data": str(run.parent / "digits" / "val")}
    argv = [part.format(**fill) for part in command]
    assert main([argv[0], "--checkpoint", str(run / "best.pth"), *argv[1:]]) == 0
    capsys.readouterr()
    # An official .pth records no variant: a one-line error saying to pass --model.
    model = torchcvt.create_model(None, checkpoint=run / "best.pth")
    save_official(model, tmp_path / "official.pth")
    assert main([argv[0], "--checkpoint", str(tmp_path / "official.pth"), *argv[1:]]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"torchcvt {argv[0]}: error: ") and "\n" not in err, err
    assert "does not record which variant it holds: pass --model NAME (one of cvt_13," in err


def test_pretrained_without_model_is_a_one_line_error(capsys, digit_png):
    assert main(["predict", "--pretrained", str(digit_png)]) == 2
    assert "--pretrained needs --model NAME" in capsys.readouterr().err
    assert main(["predict", str(digit_png)]) == 2
    assert "give --model NAME (or a --checkpoint that records its variant)" in capsys.readouterr().err

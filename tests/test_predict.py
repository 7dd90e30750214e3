import csv
import json
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from torchcvt import Predictor, create_model, predictor
from torchcvt.cli import main
from torchcvt.inputs import find_images, read_image
from torchcvt.predict import imagenet_class_names
from torchcvt.reports import format_table, write_csv_report, write_json_report

CLASSES = ["cat", "dog", "fish", "bird"]
SMALL = {"input_size": (3, 64, 64), "crop_pct": 0.875}


def _photo(width: int, height: int, seed: int = 0) -> np.ndarray:
    """A smooth colour image with some texture, so resizing and cropping do real work."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 // max(width - 1, 1), y * 255 // max(height - 1, 1), (x + y) % 256], -1)
    return np.clip(base + rng.integers(0, 40, base.shape), 0, 255).astype(np.uint8)


def _png_header_only(path: Path, width: int, height: int) -> None:
    """A PNG whose header claims width x height pixels but whose data stops early."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    data = chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + data)


def write_images(root: Path) -> tuple[list[Path], dict[str, str]]:
    """Readable images in many formats and modes, plus broken files and the reason each must get."""
    (root / "nested" / "deeper").mkdir(parents=True)
    rgb = Image.fromarray(_photo(80, 60))
    good = {
        "photo.jpg": (rgb, {}),
        "rgba.png": (Image.fromarray(_photo(50, 70, 1)).convert("RGBA"), {}),
        "palette.gif": (rgb.convert("P", palette=Image.Palette.ADAPTIVE), {}),
        "gray.bmp": (rgb.convert("L"), {}),
        "cmyk.tiff": (rgb.convert("CMYK"), {}),
        "nested/still.webp": (rgb, {"lossless": True}),
        "nested/deeper/tiny.png": (Image.fromarray(_photo(3, 2, 2)), {}),
        "nested/deeper/sixteen.png": (Image.fromarray(_photo(40, 30)[..., 0].astype(np.uint16) * 257), {}),
    }
    paths = []
    for name, (image, options) in good.items():
        image.save(root / name, **options)
        paths.append(root / name)
    assert Image.open(root / "nested/deeper/sixteen.png").mode.startswith("I")
    (root / "empty.jpg").write_bytes(b"")
    data = (root / "photo.jpg").read_bytes()
    (root / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (root / "notes.png").write_text("not an image at all\n")
    _png_header_only(root / "bomb.png", 20000, 20000)
    bad = {"empty.jpg": "empty file", "truncated.jpg": "truncated", "notes.png": "not an image file",
           "bomb.png": "image too large"}
    (root / "readme.txt").write_text("skipped: not an image extension")
    (root / ".hidden.png").write_bytes(b"")
    return paths, bad


@pytest.fixture
def tiny_model(tiny_overrides):
    return create_model("cvt_13", num_classes=len(CLASSES), **tiny_overrides).eval()


@pytest.fixture
def tiny_checkpoint(tmp_path, tiny_model):
    path = tmp_path / "tiny.pth"
    torch.save({"state_dict": tiny_model.state_dict(), "class_names": CLASSES,
                "config": tiny_model.config.to_dict(), "model_name": "cvt_13"}, path)
    return path


def test_imagenet_class_names_are_the_standard_list():
    names = imagenet_class_names()
    assert len(names) == 1000
    assert (names[0], names[1], names[281], names[954], names[999]) == (
        "tench", "goldfish", "tabby", "banana", "toilet tissue")
    assert Predictor(create_model("cvt_13", embed_dim=[16, 32, 48], num_heads=[1, 2, 3],
                                  depth=[1, 1, 1])).class_names == names


def test_folders_are_walked_recursively(tmp_path):
    good, bad = write_images(tmp_path)
    found = find_images([tmp_path, tmp_path / "missing.jpg"])
    assert sorted(found[:-1]) == sorted(good + [tmp_path / name for name in bad])
    assert found[-1] == tmp_path / "missing.jpg"


def test_every_format_and_mode_is_classified_and_bad_files_get_reasons(tmp_path, tiny_model):
    good, bad = write_images(tmp_path)
    _png_header_only(tmp_path / "hundred_mp.png", 10000, 10000)  # above PIL's own 89 MP warning
    bad["hundred_mp.png"] = "truncated"
    seen = []
    model = Predictor(tiny_model, CLASSES, data_config=SMALL, batch_size=3)
    results = model.predict_files([tmp_path, tmp_path / "gone.jpg"], top_k=3, on_error=seen.append)
    bad["gone.jpg"] = "file not found"
    by_name = {Path(r.path).relative_to(tmp_path).as_posix(): r for r in results}
    assert set(by_name) == {p.relative_to(tmp_path).as_posix() for p in good} | set(bad)
    for path in good:
        result = by_name[path.relative_to(tmp_path).as_posix()]
        assert result.error is None
        probs = [p.prob for p in result.predictions]
        assert len(probs) == 3 and probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-6
        assert all(p.label == CLASSES[p.index] for p in result.predictions)
    for name, reason in bad.items():
        assert by_name[name].predictions is None
        assert reason in by_name[name].error, (name, by_name[name].error)
    assert sorted(r.path for r in seen) == sorted(str(tmp_path / name) for name in bad)
    # Batched file results equal one-by-one classification of the same files.
    single = model(good[0], top_k=3)
    batched = by_name["photo.jpg"].predictions
    assert [p.index for p in single] == [p.index for p in batched]
    assert [p.prob for p in single] == pytest.approx([p.prob for p in batched], abs=1e-6)


def test_large_photo_is_read(tmp_path, tiny_model):
    path = tmp_path / "large.jpg"
    gradient = Image.linear_gradient("L").resize((6000, 4000))
    Image.merge("RGB", [gradient, gradient.transpose(Image.Transpose.FLIP_LEFT_RIGHT), gradient]).save(path)
    result = Predictor(tiny_model, CLASSES, data_config=SMALL).predict_files([path])[0]
    assert result.error is None and len(result.predictions) == 4


def test_inputs_as_paths_pil_images_and_tensors_agree(tmp_path, tiny_model):
    path = tmp_path / "a.png"
    Image.fromarray(_photo(90, 70)).save(path)
    model = Predictor(tiny_model, CLASSES, data_config=SMALL)
    image = Image.open(path)
    uint8 = torch.from_numpy(np.array(image)).permute(2, 0, 1)
    ready = model.preprocess(image)
    logits = model.logits([path, image, uint8, ready])
    torch.testing.assert_close(logits, logits[:1].expand(4, -1), rtol=0, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(logits[0], tiny_model(ready[None])[0], rtol=1e-5, atol=1e-5)
    assert model.logits(ready[None].repeat(5, 1, 1, 1)).shape == (5, len(CLASSES))
    assert model(path, top_k=2) == model([path], top_k=2)[0]


def test_exif_orientation_is_applied(tmp_path, tiny_model):
    upright = Image.fromarray(_photo(40, 64))
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # what the camera wrote; EXIF 6 turns it back
    exif = Image.Exif()
    exif[0x0112] = 6
    stored.save(tmp_path / "rotated.png", exif=exif)
    assert read_image(tmp_path / "rotated.png").size == upright.size
    np.testing.assert_array_equal(np.asarray(read_image(tmp_path / "rotated.png")), np.asarray(upright))


def test_sixteen_bit_images_are_scaled_not_clipped(tmp_path):
    values = _photo(30, 20)[..., 0]
    Image.fromarray(values.astype(np.uint16) * 257).save(tmp_path / "deep.png")
    np.testing.assert_array_equal(np.asarray(read_image(tmp_path / "deep.png"))[..., 0], values)


def test_reports_json_csv_and_table(tmp_path, tiny_model):
    Image.fromarray(_photo(32, 32)).save(tmp_path / "ok.png")
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8\xff")
    results = Predictor(tiny_model, CLASSES, data_config=SMALL).predict_files([tmp_path], top_k=2)
    write_json_report(results, tmp_path / "r.json")
    report = json.loads((tmp_path / "r.json").read_text())
    assert report[0]["path"].endswith("bad.jpg") and set(report[0]) == {"path", "error"}
    assert set(report[1]) == {"path", "predictions"}
    assert [set(p) for p in report[1]["predictions"]] == [{"index", "label", "prob"}] * 2
    write_csv_report(results, tmp_path / "r.csv")
    rows = list(csv.DictReader(open(tmp_path / "r.csv")))
    assert len(rows) == 3 and rows[0]["error"] and [r["rank"] for r in rows[1:]] == ["1", "2"]
    table = format_table(results).splitlines()
    assert table[0].split() == ["path", "#", "prob", "class"]
    assert "error:" in table[1] and table[2].split()[1] == "1" and table[3].split()[0] == "2"


def test_bad_arguments_are_clear_errors(tmp_path, tiny_model):
    model = Predictor(tiny_model, CLASSES, data_config=SMALL)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no image files found"):
        model.predict_files([tmp_path / "empty"])
    with pytest.raises(ValueError, match="top_k must be at least 1"):
        model(torch.zeros(3, 64, 64), top_k=0)
    with pytest.raises(ValueError, match="file not found"):
        model(tmp_path / "nope.jpg")
    with pytest.raises(ValueError, match="cannot read a int"):
        model([3])
    with pytest.raises(ValueError, match="3 class names for a model with 4 outputs"):
        Predictor(tiny_model, CLASSES[:3])
    with pytest.raises(ValueError, match="no classifier head"):
        Predictor(create_model("cvt_13", num_classes=0, embed_dim=[16, 32, 48], num_heads=[1, 2, 3],
                               depth=[1, 1, 1]), data_config=SMALL)(torch.zeros(3, 64, 64))


def test_class_names_come_from_the_checkpoint(tiny_checkpoint, tiny_overrides, tiny_model):
    loaded = predictor("cvt_13", tiny_checkpoint, **tiny_overrides)
    assert loaded.class_names == CLASSES and loaded.model.num_classes == 4
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(loaded.logits(x), tiny_model(x).detach())


def _tiny_cli(tiny_overrides):
    return [f"--set={key}={json.dumps(value)}" for key, value in tiny_overrides.items()]


@torch.no_grad()
def _top2_computed_here(model: torch.nn.Module, path: Path) -> tuple[list[str], list[float]]:
    """Labels and probabilities of the two best classes, with torchvision's resize-and-crop at 224 (cvt_13's
    evaluation: crop_pct 0.875) and the ImageNet mean and std, not torchcvt's preprocessing."""
    from torchvision import transforms as T

    transform = T.Compose([T.Resize(256, interpolation=T.InterpolationMode.BICUBIC, antialias=True),
                           T.CenterCrop(224), T.ToTensor(),
                           T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
    probs = model.eval()(transform(Image.open(path).convert("RGB"))[None]).softmax(1)[0]
    top = probs.topk(2)
    return [CLASSES[i] for i in top.indices], top.values.tolist()


def test_cli_predict(tmp_path, tiny_model, tiny_overrides, perturb, capsys):
    images = tmp_path / "images"
    images.mkdir()
    _, bad = write_images(images)
    model = perturb(tiny_model)  # distinct, confident probabilities: a wrong label or order shows
    checkpoint = tmp_path / "perturbed.pth"
    torch.save({"state_dict": model.state_dict(), "class_names": CLASSES,
                "config": model.config.to_dict(), "model_name": "cvt_13"}, checkpoint)
    args = ["predict", "--model", "cvt_13", "--checkpoint", str(checkpoint), *_tiny_cli(tiny_overrides),
            "--top-k", "2", "--json", str(tmp_path / "r.json"), "--csv", str(tmp_path / "r.csv")]
    assert main([*args, str(images)]) == 1
    out, err = capsys.readouterr()
    report = json.loads((tmp_path / "r.json").read_text())
    assert len(report) == 12 and sum("error" in r for r in report) == len(bad)
    for name, reason in bad.items():
        assert f"{images / name}: " in err and reason in err
    assert "4 of 12 file(s) could not be read" in err and "Traceback" not in err
    labels, probs = _top2_computed_here(model, images / "photo.jpg")
    assert probs[0] - probs[1] > 0.02, "too close a race to check the order"
    photo = next(r for r in report if r["path"].endswith("photo.jpg"))
    assert [p["label"] for p in photo["predictions"]] == labels
    assert [p["index"] for p in photo["predictions"]] == [CLASSES.index(label) for label in labels]
    assert [p["prob"] for p in photo["predictions"]] == pytest.approx(probs, abs=1e-4)
    line = next(line for line in out.splitlines() if "photo.jpg" in line)
    assert f"{labels[0]} ({CLASSES.index(labels[0])})" in line, line
    assert main([*args, str(images / "photo.jpg"), str(images / "nested")]) == 0
    assert main(["predict", "--model", "cvt_13", "--top-k", "0", str(images)]) == 2
    assert "--top-k must be at least 1" in capsys.readouterr().err
    assert main(["predict", "--model", "cvt_13", "--set", "depth", str(images)]) == 2
    assert "--set expects FIELD=VALUE" in capsys.readouterr().err


def test_cli_predict_process_exit_codes(tmp_path, tiny_checkpoint, tiny_overrides):
    Image.fromarray(_photo(32, 32)).save(tmp_path / "ok.webp")
    (tmp_path / "broken.gif").write_bytes(b"GIF89a")
    run = subprocess.run(
        [sys.executable, "-m", "torchcvt", "predict", "--model", "cvt_13",
         "--checkpoint", str(tiny_checkpoint), *_tiny_cli(tiny_overrides), "--workers", "2",
         str(tmp_path / "ok.webp"), str(tmp_path / "broken.gif")],
        capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 1, run.stderr
    assert "broken.gif: " in run.stderr and "Traceback" not in run.stderr
    # stderr is a pipe, not a terminal: progress comes as log lines, not a bar.
    assert "torchcvt predict: 2/2 images (" in run.stderr
    assert "ok.webp" in run.stdout


def test_non_finite_outputs_are_errors_never_nan_in_reports(tmp_path, tiny_model, tiny_overrides, capsys):
    Image.fromarray(_photo(32, 32)).save(tmp_path / "a.png")
    Image.fromarray(_photo(40, 30, 1)).save(tmp_path / "b.png")
    with torch.no_grad():
        tiny_model.head.bias[1] = float("nan")  # weights gone bad, as after a diverged run
    torch.save({"state_dict": tiny_model.state_dict(), "class_names": CLASSES,
                "config": tiny_model.config.to_dict(), "model_name": "cvt_13"}, tmp_path / "nan.pth")
    assert main(["predict", "--model", "cvt_13", "--checkpoint", str(tmp_path / "nan.pth"),
                 *_tiny_cli(tiny_overrides), "--json", str(tmp_path / "r.json"), "--quiet",
                 str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert f"{tmp_path / 'a.png'}: the output of model cvt_13 is NaN or infinite for this image" in err
    assert "2 of 2 file(s) could not be read or classified" in err
    def strict(constant: str):
        raise AssertionError(f"{constant} is not JSON")

    report = json.loads((tmp_path / "r.json").read_text(), parse_constant=strict)
    assert [set(r) for r in report] == [{"path", "error"}] * 2
    features, results = Predictor(tiny_model, CLASSES, data_config=SMALL).embed_files([tmp_path])
    assert features.shape[0] == 2 and all(r.error is None for r in results)  # features do not use the head


def test_eval_transform_is_torchvision_resize_and_crop_for_ordinary_images():
    from torchvision import transforms as T

    from torchcvt.data import eval_transform

    config = {"input_size": (3, 64, 64), "crop_pct": 0.875, "interpolation": "bicubic",
              "mean": (0.5,) * 3, "std": (0.25,) * 3}
    reference = T.Compose([T.Resize(73, interpolation=T.InterpolationMode.BICUBIC, antialias=True),
                           T.CenterCrop(64), T.ToTensor(), T.Normalize((0.5,) * 3, (0.25,) * 3)])
    for width, height in [(80, 60), (60, 80), (73, 73), (3, 2), (640, 41), (41, 656)]:
        image = Image.fromarray(_photo(width, height))
        torch.testing.assert_close(eval_transform(config)(image), reference(image), rtol=0, atol=0)
    # Beyond the bound only the crop is resampled: the same pixels up to PIL's rounding.
    image = Image.fromarray(_photo(6000, 20))
    crop = np.asarray(eval_transform({**config, "mean": (0,) * 3, "std": (1,) * 3})(image)) * 255
    full = np.asarray(reference.transforms[1](reference.transforms[0](image))).transpose(2, 0, 1)
    assert np.abs(crop - full).max() <= 2


def test_extreme_aspect_ratios_take_little_memory(tmp_path):
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (4, 100000, 3), dtype=np.uint8)).save(
        tmp_path / "wide.png")
    Image.new("RGB", (1, 1000000), (10, 200, 30)).save(tmp_path / "tall.png")
    script = (
        "import resource, sys\n"
        "from torchcvt import Predictor, create_model\n"
        "model = create_model('cvt_13', embed_dim=[16, 32, 48], num_heads=[1, 2, 3], depth=[1, 1, 1])\n"
        "predictor = Predictor(model)\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "results = predictor.predict_files(sys.argv[1:], top_k=1, progress=False)\n"
        "assert all(r.error is None for r in results), results\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)\n"
    )
    files = [str(tmp_path / "wide.png"), str(tmp_path / "tall.png")]
    run = subprocess.run([sys.executable, "-c", script, *files], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert int(run.stdout) < 1024 * 1024  # kilobytes on Linux: under 1 GB on top of the loaded model


def test_symlinked_folders_are_followed_and_broken_entries_reported(tmp_path, tiny_checkpoint, tiny_overrides,
                                                                    capsys):
    images, elsewhere = tmp_path / "images", tmp_path / "elsewhere"
    (images / "sub").mkdir(parents=True)
    elsewhere.mkdir()
    Image.fromarray(_photo(32, 32)).save(images / "a.png")
    Image.fromarray(_photo(32, 32, 1)).save(elsewhere / "b.png")
    (images / "linked").symlink_to(elsewhere, target_is_directory=True)
    (images / "sub" / "loop").symlink_to(images, target_is_directory=True)  # walking it would never end
    (images / "dangling.png").symlink_to(tmp_path / "gone.png")
    expected = [images / "a.png", images / "dangling.png", images / "linked" / "b.png"]
    if os.geteuid() != 0:  # root lists any folder, whatever its mode
        (images / "locked").mkdir(mode=0o000)
        expected.insert(2, images / "locked")
    assert find_images([images, images / "linked"]) == expected  # each folder once
    args = ["predict", "--model", "cvt_13", "--checkpoint", str(tiny_checkpoint), *_tiny_cli(tiny_overrides),
            "--json", str(tmp_path / "r.json"), "--quiet", str(images)]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert f"{images / 'dangling.png'}: broken symbolic link (its target {tmp_path / 'gone.png'}" in err
    if os.geteuid() != 0:
        assert f"{images / 'locked'}: folder cannot be listed (permission denied)" in err
    report = {Path(r["path"]).name: r for r in json.loads((tmp_path / "r.json").read_text())}
    assert "predictions" in report["b.png"] and "predictions" in report["a.png"]


def test_empty_images_are_errors_and_empty_batches_empty_results(tiny_model):
    from torchcvt.inputs import UnreadableImageError

    model = Predictor(tiny_model, CLASSES, data_config=SMALL)
    with pytest.raises(UnreadableImageError, match=r"^image has no pixels \(0x0\)$"):
        model(Image.new("RGB", (0, 0)))
    with pytest.raises(UnreadableImageError, match=r"^image has no pixels \(7x0\)$"):
        model([torch.zeros(3, 0, 7, dtype=torch.uint8)])
    assert model(torch.zeros(0, 3, 64, 64)) == [] and model([]) == []
    assert model.logits([]).shape == (0, len(CLASSES))
    assert model.embed(torch.zeros(0, 3, 64, 64)).shape == (0, tiny_model.num_features)


def test_worker_processes_decode_the_same(tmp_path, tiny_model):
    write_images(tmp_path)
    model = Predictor(tiny_model, CLASSES, data_config=SMALL, batch_size=3)
    alone = model.predict_files([tmp_path], top_k=2, progress=False)
    assert model.predict_files([tmp_path], top_k=2, progress=False, workers=2) == alone
    with pytest.raises(ValueError, match="workers must be 0 or more, got -1"):
        model.predict_files([tmp_path], workers=-1)

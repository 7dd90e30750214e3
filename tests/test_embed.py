import json

import numpy as np
import pytest
import torch
from PIL import Image

from torchcvt import Predictor, create_model
from torchcvt.cli import main
from torchcvt.reports import load_embeddings, save_embeddings

SMALL = {"input_size": (3, 64, 64), "crop_pct": 1.0}


def _images(folder):
    folder.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (70, 50, 3), dtype=np.uint8)).save(folder / "a.jpg")
    Image.fromarray(rng.integers(0, 255, (40, 40), dtype=np.uint8)).save(folder / "b.png")
    Image.fromarray(rng.integers(0, 255, (30, 60, 4), dtype=np.uint8)).save(folder / "c.webp")
    (folder / "d.tiff").write_bytes(b"II*\x00broken")
    return [folder / name for name in ("a.jpg", "b.png", "c.webp")], folder / "d.tiff"


def test_embeddings_are_pre_logits_features(tmp_path, tiny_overrides):
    model = create_model("cvt_13", num_classes=7, **tiny_overrides).eval()
    good, bad = _images(tmp_path / "img")
    predictor = Predictor(model, data_config=SMALL, batch_size=2)
    features, results = predictor.embed_files([tmp_path / "img"])
    assert [r.path for r in results] == [str(p) for p in good] + [str(bad)]
    assert results[-1].error and all(r.error is None for r in results[:-1])
    batch = torch.stack([predictor.preprocess(p) for p in good])
    with torch.no_grad():
        expected = model.forward_head(model.forward_features(batch), pre_logits=True)
        torch.testing.assert_close(model.head(features), model(batch), rtol=1e-5, atol=1e-5)
    assert features.shape == (3, 48)
    torch.testing.assert_close(features, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(predictor.embed(good), expected, rtol=1e-5, atol=1e-5)


def test_features_only_maps(tiny_overrides):
    backbone = create_model("cvt_13", features_only=True, **tiny_overrides).eval()
    maps = backbone(torch.randn(1, 3, 64, 96))
    assert [tuple(m.shape) for m in maps] == [(1, 16, 16, 24), (1, 32, 8, 12), (1, 48, 4, 6)]


@pytest.mark.parametrize("suffix", [".safetensors", ".npy"])
def test_save_and_load_round_trip(tmp_path, suffix):
    features = torch.randn(3, 5)
    written = save_embeddings(tmp_path / f"e{suffix}", features, ["x.jpg", "y/z.png", "w.gif"])
    assert all(path.exists() for path in written)
    loaded, files = load_embeddings(tmp_path / f"e{suffix}")
    torch.testing.assert_close(loaded, features)
    assert files == ["x.jpg", "y/z.png", "w.gif"]
    with pytest.raises(ValueError, match="3 feature rows but 2 file names"):
        save_embeddings(tmp_path / f"f{suffix}", features, ["a", "b"])


def test_cli_embed(tmp_path, tiny_overrides, capsys):
    good, bad = _images(tmp_path / "img")
    weights = tmp_path / "w.pth"
    torch.save(create_model("cvt_13", **tiny_overrides).state_dict(), weights)
    overrides = ["--checkpoint", str(weights)]
    overrides += [f"--set={key}={json.dumps(value)}" for key, value in tiny_overrides.items()]
    out = tmp_path / "emb.safetensors"
    assert main(["embed", "--model", "cvt_13", *overrides, str(tmp_path / "img"), "-o", str(out)]) == 1
    captured = capsys.readouterr()
    assert f"{bad}: " in captured.err and "1 of 4 file(s) could not be read" in captured.err
    assert "3 x 48 features" in captured.out
    features, files = load_embeddings(out)
    assert files == [str(p) for p in good] and features.shape == (3, 48)
    npy = tmp_path / "emb.npy"
    assert main(["embed", "--model", "cvt_13", *overrides, *map(str, good), "-o", str(npy)]) == 0
    torch.testing.assert_close(load_embeddings(npy)[0], features, rtol=1e-5, atol=1e-5)
    assert main(["embed", "--model", "cvt_13", str(good[0]), "-o", str(tmp_path / "e.csv")]) == 2
    assert "-o must end in .safetensors or .npy" in capsys.readouterr().err

import re

import numpy as np
import pytest
import torch
from PIL import Image

from torchcvt import attention_map, create_model
from torchcvt.attention_maps import default_stage, describe, key_grid, record_attention, render_attention
from torchcvt.cli import main
from torchcvt.geometry import projected_centres, token_centres
from torchcvt.layers import Attention


@pytest.fixture
def model(tiny_overrides):
    return create_model("cvt_13", **tiny_overrides).eval()


def test_class_token_map_is_the_stored_softmax_row(model):
    x = torch.randn(2, 3, 96, 80)
    with torch.no_grad():
        before = model(x)
    amap = attention_map(model, x)
    assert amap.stage == 2 and amap.block == 1 and amap.query is None
    assert amap.weights.shape == (2, 3, 3, 3)  # 96x80 -> 6x5 tokens -> 3x3 keys at stride_kv 2
    with record_attention(model) as modules, torch.no_grad():
        after = model(x)
        raw = modules[-1].last_attention
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(amap.weights, raw[:, :, 0, 1:].reshape(2, 3, 3, 3))
    sums = amap.weights.sum(dim=(-1, -2))
    assert bool(((sums > 0) & (sums < 1)).all())  # the rest went to the class token itself
    assert not any(m.keep_attention or m.last_attention is not None for m in model.modules()
                   if isinstance(m, Attention))


def test_key_centres_match_receptive_fields(tiny_overrides):
    """Each key's receptive field in the image is centred on the pixel torchcvt.geometry places it at."""
    model = create_model("cvt_13", **{**tiny_overrides, "depth": [0, 0, 1]}).eval()
    captured = {}
    attn = model.stage2.blocks[0].attn
    attn.conv_proj_k.register_forward_hook(lambda module, args, out: captured.update(k=out))
    x = torch.randn(1, 3, 160, 160, requires_grad=True)
    with record_attention(model):
        model.forward_features(x)
    keys = captured["k"]
    scale, offset = projected_centres(model.config, 2, query=False)
    # Stage tokens sit at 4t + 1, 8t + 1, 16t + 1 pixels; keys (stride 2 over stage 2's tokens) at 32k + 1.
    assert (scale, offset) == (32.0, 1.0)
    for row, col in [(1, 1), (1, 2)]:
        (grad,) = torch.autograd.grad(keys[0, :, row, col].sum(), x, retain_graph=True)
        ys, xs = np.nonzero(grad[0].abs().sum(0).numpy())
        assert (ys.min() + ys.max()) / 2 == row * scale + offset
        assert (xs.min() + xs.max()) / 2 == col * scale + offset
    assert token_centres(model.config, 0) == (4.0, 1.0)


def test_query_position_in_a_stage_without_class_token(model):
    x = torch.randn(1, 3, 64, 64)
    scale, offset = token_centres(model.config, 0)
    amap = attention_map(model, x, stage=0, query=(4 * scale + offset + 1, 9 * scale + offset - 1))
    assert amap.query == (4 * scale + offset, 9 * scale + offset)
    with record_attention(model), torch.no_grad():
        model(x)
        raw = model.stage0.blocks[0].attn.last_attention
    assert amap.weights.shape == (1, 1, 8, 8)
    torch.testing.assert_close(amap.weights.flatten(2), raw[:, :, 9 * 16 + 4])
    centre = attention_map(model, x, stage=1)
    assert centre.query is not None and centre.weights.shape == (1, 2, 4, 4)


def test_upsampled_maps_hit_key_values_at_key_centres(model):
    amap = attention_map(model, torch.randn(1, 3, 96, 96), stage=1)
    full = amap.upsample()
    assert full.shape == (1, 2, 96, 96)
    rows, cols = amap.key_rows.long(), amap.key_cols.long()
    torch.testing.assert_close(full[:, :, rows][:, :, :, cols], amap.weights)
    assert torch.allclose(full[..., 0, 0], amap.weights[..., 0, 0])  # flat beyond the outermost keys


def test_bad_arguments(model):
    x = torch.randn(1, 3, 64, 64)
    with pytest.raises(ValueError, match=r"stage index 3 does not exist; the model has stages 0..2 \("):
        attention_map(model, x, stage=3)
    with pytest.raises(ValueError, match="block 1 does not exist; stage 1 has 1 block"):
        attention_map(model, x, stage=0, block=1)
    with pytest.raises(ValueError, match="outside the 64x64 input"):
        attention_map(model, x, query=(70, 3))
    with pytest.raises(ValueError, match="too small"):
        attention_map(model, torch.randn(1, 3, 2, 2))


def test_render_and_cli(tmp_path, model, tiny_overrides, capsys):
    amap = attention_map(model, torch.randn(1, 3, 64, 64), stage=0, query=(10, 20))
    out = render_attention(np.zeros((64, 64, 3)), amap, tmp_path / "q.png")
    assert Image.open(out).format == "PNG"
    photo = np.random.default_rng(0).integers(0, 255, (120, 90, 3), dtype=np.uint8)
    Image.fromarray(photo).convert("P").save(tmp_path / "photo.gif")
    overrides = [f"--set={k}={v}" for k, v in tiny_overrides.items()]
    assert main(["attention", "--model", "cvt_13", *overrides, str(tmp_path / "photo.gif"),
                 "-o", str(tmp_path / "a.png")]) == 0
    assert "(stage 3 of 3, block 2 of 2, class token, 3 head(s), 7x7 keys)" in capsys.readouterr().out
    with Image.open(tmp_path / "a.png") as image:
        assert image.format == "PNG" and image.width > 600
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really")
    assert main(["attention", "--model", "cvt_13", *overrides, str(tmp_path / "broken.jpg"),
                 "-o", str(tmp_path / "b.png")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"torchcvt attention: error: {tmp_path / 'broken.jpg'}: ")
    assert "Traceback" not in err
    assert not (tmp_path / "b.png").exists()


def _digit_image(path) -> str:
    from torchcvt.data import write_digits

    train, _ = write_digits(path.parent / "digits", labels=[3])
    return str(sorted((train / "3").iterdir())[0])


def test_default_stage_skips_a_one_key_grid(tmp_path, capsys):
    """cvt_digits at 32x32: the last stage has one key (a uniform map), so stage 2 (from 1) is drawn."""
    model = create_model("cvt_digits").eval()
    config = model.config
    assert [key_grid(config, i, 32, 32) for i in range(3)] == [(4, 4), (2, 2), (1, 1)]
    assert default_stage(config, 32, 32) == 1 and default_stage(config, 64, 64) == 2
    x = torch.randn(1, 3, 32, 32)
    assert attention_map(model, x).stage == 1
    last = attention_map(model, x, stage=-1)
    assert last.single_key and torch.allclose(last.upsample()[0, 0], last.upsample()[0, 0, 0, 0])
    image = _digit_image(tmp_path)
    assert main(["attention", "--model", "cvt_digits", image, "-o", str(tmp_path / "a.png")]) == 0
    out, err = capsys.readouterr()
    assert "(stage 2 of 3, block 1 of 1, query at (17, 17), 2 head(s), 2x2 keys)" in out
    assert "drawing stage 2: the last stage's key grid is 1x1 at 32x32" in out and "--stage 3" in out
    assert err == ""
    # Asked for, the one-key stage is drawn with a warning that names the stages worth drawing.
    argv = ["attention", "--model", "cvt_digits", "--stage", "3", image, "-o", str(tmp_path / "b.png")]
    assert main(argv) == 0
    out, err = capsys.readouterr()
    assert "(stage 3 of 3, block 2 of 2, class token, 4 head(s), 1x1 keys)" in out
    assert "warning: stage 3's key grid is 1x1 at 32x32" in err and "stages with more keys: 1, 2" in err


def test_stages_and_blocks_are_numbered_from_one_as_in_info(tmp_path, capsys):
    image = _digit_image(tmp_path)
    assert main(["info", "cvt_digits"]) == 0
    info = capsys.readouterr().out
    assert re.search(r"^  1 +8x8 +64 +4x4", info, re.MULTILINE)  # info's stage 1: the 4x4 key grid
    argv = ["attention", "--model", "cvt_digits", image, "--stage", "1", "--block", "1"]
    assert main([*argv, "-o", str(tmp_path / "s1.png")]) == 0
    assert "(stage 1 of 3, block 1 of 1, query at (17, 17), 1 head(s), 4x4 keys)" in capsys.readouterr().out
    for options, message in (
        (["--stage", "0"], "--stage 0 does not exist: the model has stages 1..3"),
        (["--stage", "4"], "--stage 4 does not exist: the model has stages 1..3"),
        (["--stage", "1", "--block", "2"], "--block 2 does not exist: stage 1 has blocks 1..1"),
    ):
        bad = ["attention", "--model", "cvt_digits", image, "-o", str(tmp_path / "x.png"), *options]
        assert main(bad) == 2
        assert capsys.readouterr().err.strip() == f"torchcvt attention: error: {message}"
    assert not (tmp_path / "x.png").exists()
    # The PNG's title numbers the stage the same way.
    amap = attention_map(create_model("cvt_digits").eval(), torch.randn(1, 3, 32, 32), stage=0)
    assert describe(amap) == "stage 1, block 1: attention of the query at (17, 17)"


def test_png_carries_a_colour_bar_on_one_scale(tmp_path, model, monkeypatch):
    from matplotlib.figure import Figure

    figures = []
    monkeypatch.setattr(Figure, "savefig", lambda self, *a, **k: figures.append(self))
    amap = attention_map(model, torch.randn(1, 3, 64, 64), stage=1)
    render_attention(np.zeros((64, 64, 3)), amap, tmp_path / "q.png")
    (figure,) = figures
    bars = [ax for ax in figure.axes if ax.get_label() == "<colorbar>"]
    assert len(bars) == 1 and bars[0].get_ylabel() == "attention weight per key"
    heats = [image for ax in figure.axes for image in ax.get_images() if image.get_cmap().name == "inferno"]
    assert len(heats) == 1 + 2  # the mean and each of stage 2's two heads
    full = amap.upsample()
    low, top = float(full.min()), float(full.max())
    assert low < top and all(image.get_clim() == (pytest.approx(low), pytest.approx(top)) for image in heats)
    # A one-key stage says so on the picture.
    figures.clear()
    single = attention_map(create_model("cvt_digits").eval(), torch.randn(1, 3, 32, 32), stage=2)
    render_attention(np.zeros((32, 32, 3)), single, tmp_path / "s.png")
    assert "1x1 key grid at this input size" in figures[0].get_suptitle()
    # Each head's map is one value (the rest of its attention goes to the class token itself).
    heads = single.weights[0].flatten()
    limits = [image.get_clim() for ax in figures[0].axes for image in ax.get_images()
              if image.get_cmap().name == "inferno"]
    want = (pytest.approx(float(heads.min())), pytest.approx(float(heads.max())))
    assert len(limits) == 5 and all(limit == want for limit in limits)

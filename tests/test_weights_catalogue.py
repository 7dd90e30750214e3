"""The weight catalogue: every quoted fact about released weights comes from it or agrees with it."""

import re
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from timm.data import create_transform, resolve_data_config

import torchcvt
from torchcvt import factory
from torchcvt.cli import main
from torchcvt.data import eval_transform
from torchcvt.flops import count_flops, count_params
from torchcvt.weights.catalogue import CATALOGUE, HUB_LICENSE, builder_docstring, weights_of

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
from update_docs import DOC_TABLES, generated_table, model_table  # noqa: E402


@pytest.mark.parametrize("relative", sorted(DOC_TABLES))
def test_doc_tables_are_the_catalogues(relative):
    name, render = DOC_TABLES[relative]
    table = generated_table((ROOT / relative).read_text(encoding="utf-8"), name)
    assert table is not None, f"{relative} lost its <!-- {name} --> markers"
    fix = "python tools/update_docs.py"
    assert table == render(), f"{relative} disagrees with the weight catalogue: run `{fix}`"


def test_every_parameter_figure_in_the_docs_is_a_catalogue_figure():
    counted = {f"{weights.params_m}M" for weights in CATALOGUE}
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        quoted = set(re.findall(r"\b\d+\.\dM\b", path.read_text(encoding="utf-8")))
        assert quoted <= counted, f"{path.name} quotes {sorted(quoted - counted)}, not in the catalogue"


@pytest.mark.parametrize("weights", CATALOGUE, ids=lambda w: w.name)
def test_catalogue_figures_match_what_torchcvt_counts(weights):
    config = torchcvt.variant_config(weights.architecture)
    assert round(count_params(config) / 1e6, 1) == weights.params_m
    assert count_flops(config) / 1e9 == pytest.approx(weights.gflops, rel=0.02)
    assert round(weights.params_m) == pytest.approx(weights.paper_params_m, abs=0.5)


@pytest.mark.parametrize("name", sorted(torchcvt.VARIANTS))
def test_builder_docstrings_quote_each_tags_own_top1(name):
    builder = getattr(factory, name)
    assert builder.__doc__ == builder_docstring(name)
    for weights in weights_of(name):
        assert f"{weights.name} (" in builder.__doc__
        assert f"{weights.top1}% ImageNet-1k top-1" in builder.__doc__
    figures = re.findall(r"(\d+\.\d)M parameters", builder.__doc__)
    assert figures == ([str(weights_of(name)[0].params_m)] if weights_of(name) else [])


def test_untagged_384_names_quote_the_22k_weights_they_load():
    doc = factory.cvt_13_384.__doc__
    assert "cvt_13_384.ms_in22k_ft_in1k (default; ImageNet-22k pre-training, 83.3%" in doc
    notes = timm.models.get_pretrained_cfg("cvt_13_384").notes
    assert notes == ("ImageNet-1k top-1 83.3% (CvT paper, Table 3)",)


def test_timm_cfgs_carry_the_catalogue():
    for weights in CATALOGUE:
        cfg = timm.models.get_pretrained_cfg(weights.name)
        assert (cfg.hf_hub_id, cfg.license) == (weights.hf_hub_id, HUB_LICENSE)
        assert cfg.license == "apache-2.0"
        assert cfg.input_size == weights.data_config()["input_size"]
        assert cfg.crop_mode == ("squash" if weights.resolution == 384 else "center")
        assert f"{weights.top1}%" in cfg.notes[0]


def test_info_lists_each_tag_with_its_top1(capsys):
    assert main(["info", "cvt_21_384"]) == 0
    out = capsys.readouterr().out
    assert "weights: cvt_21_384.ms_in22k_ft_in1k (default), ImageNet-22k, 84.9% ImageNet-1k top-1" in out
    assert "weights: cvt_21_384.ms_in1k, ImageNet-1k, 83.3% ImageNet-1k top-1" in out
    assert "licence apache-2.0" in out and "crop_pct 1.0 (squash)" in out


@pytest.mark.parametrize("name", ["cvt_13_384", "cvt_13"])
def test_timm_preprocessing_is_the_official_evaluation(name):
    """384: squashed to 384x384 (official TEST.CENTER_CROP False); 224: resize 256, centre crop."""
    model = timm.create_model(name, pretrained=False)
    config = resolve_data_config(model=model)
    assert config["crop_mode"] == ("squash" if name.endswith("384") else "center")
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (300, 500, 3), dtype=np.uint8))
    theirs = create_transform(**config)(image)
    ours = eval_transform(model.pretrained_cfg)(image)
    size = model.pretrained_cfg["input_size"][1]
    assert theirs.shape == ours.shape == (3, size, size)
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=0)


def test_w24_top1_gives_the_paper_and_the_official_readme():
    # The paper's Table 3 says 87.7; microsoft/CvT's README lists 87.6 for the same weights.
    from torchcvt.weights.catalogue import WEIGHTS, timm_cfg

    w24 = WEIGHTS["cvt_w24.ms_in22k_ft_in1k"]
    assert "| 87.7 (official README: 87.6) |" in model_table()
    assert timm_cfg("cvt_w24", w24)["notes"] == (
        "ImageNet-1k top-1 87.7% (CvT paper, Table 3)",
        "ImageNet-1k top-1 87.6% (official repository's README)",
    )

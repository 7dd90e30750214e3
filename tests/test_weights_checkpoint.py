"""Reading and writing checkpoints: official layouts, torchcvt's format, training checkpoints, bad inputs."""

import argparse
import dataclasses
import json
import logging
import warnings

import pytest
import torch
from official_cvt import OfficialCvT, Spec, perturbed

import torchcvt
from torchcvt.cli import main
from torchcvt.errors import TorchcvtError
from torchcvt.factory import convert_checkpoint
from torchcvt.weights import checkpoint_variant, read_checkpoint, save_checkpoint, save_hf, save_official

CLASS_NAMES = [f"class {i}" for i in range(7)]


@pytest.fixture
def model(tiny_overrides, perturb) -> torchcvt.CvT:
    return perturb(torchcvt.create_model("cvt_13", num_classes=7, **tiny_overrides)).eval()


@pytest.fixture
def official_file(tmp_path, model):
    return save_official(model, tmp_path / "cvt.pth")


def assert_same_weights(loaded: torch.nn.Module, source: torch.nn.Module, skip: str = "\0") -> None:
    expected = {k: v for k, v in source.state_dict().items() if not k.startswith(skip)}
    actual = {k: v for k, v in loaded.state_dict().items() if not k.startswith(skip)}
    assert actual.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(actual[key], value), key


@torch.no_grad()
def assert_same_outputs(loaded: torch.nn.Module, source: torch.nn.Module) -> None:
    images = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(loaded.eval()(images), source(images), atol=0, rtol=0)


@pytest.fixture
def official_reference() -> OfficialCvT:
    """Perturbed weights in the official code's module tree (tests/official_cvt.py), QuickGELU as there."""
    return perturbed(OfficialCvT(Spec(), num_classes=7, activation="quick_gelu"))


@pytest.mark.parametrize(
    "wrap",
    [
        pytest.param(lambda sd: sd, id="plain"),
        pytest.param(lambda sd: {f"module.{k}": v for k, v in sd.items()}, id="module-prefix"),
        pytest.param(lambda sd: {"epoch": 30, "state_dict": sd, "optimizer": {"lr": 0.1}}, id="nested"),
        pytest.param(lambda sd: {"model": {f"module._orig_mod.{k}": v for k, v in sd.items()}}, id="ddp"),
    ],
)
def test_official_layouts_load_exactly(tmp_path, official_reference, tiny_overrides, wrap):
    """A state dict of the official module tree, as saved by the official code, plain or wrapped."""
    torch.save(wrap(official_reference.state_dict()), tmp_path / "checkpoint.pth")
    loaded = torchcvt.create_model("cvt_13", num_classes=7, checkpoint=tmp_path / "checkpoint.pth",
                                   **tiny_overrides)
    assert_same_weights(loaded, official_reference)
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(images), official_reference(images), atol=1e-4, rtol=0)


def test_save_official_writes_the_official_module_trees_keys_and_our_values(official_file, model):
    state_dict = torch.load(official_file, weights_only=True)
    assert type(state_dict) is dict and all(isinstance(v, torch.Tensor) for v in state_dict.values())
    official = OfficialCvT(Spec(), num_classes=7, activation="quick_gelu").state_dict()
    assert {k: v.shape for k, v in state_dict.items()} == {k: v.shape for k, v in official.items()}
    assert all(torch.equal(value, model.state_dict()[key]) for key, value in state_dict.items())
    # The official code loads it as it is: strict, no key left over or missing.
    OfficialCvT(Spec(), num_classes=7, activation="quick_gelu").load_state_dict(state_dict, strict=True)
    assert read_checkpoint(official_file).format == "official"


@pytest.mark.parametrize("name", ["saved", "saved.safetensors"])
def test_torchcvt_format_round_trip_keeps_config_and_class_names(tmp_path, model, tiny_overrides, name):
    model.pretrained_cfg = {"architecture": "cvt_13"}
    path = save_checkpoint(model, tmp_path / name, class_names=CLASS_NAMES)
    if path.is_dir():
        meta = json.loads((path / "config.json").read_text())
        assert (meta["format"], meta["architecture"]) == ("torchcvt", "cvt_13")
        assert meta["class_names"] == CLASS_NAMES
        assert meta["config"]["depth"] == tiny_overrides["depth"]
    loaded = torchcvt.create_model("cvt_13", num_classes=7, checkpoint=path, **tiny_overrides)
    assert_same_weights(loaded, model)
    assert_same_outputs(loaded, model)
    assert loaded.pretrained_cfg["label_names"] == tuple(CLASS_NAMES)
    # The config inside is enough to convert without naming the variant, and class names travel along.
    convert_checkpoint(path, tmp_path / "again", "torchcvt")
    assert read_checkpoint(tmp_path / "again").class_names == tuple(CLASS_NAMES)


def test_torchcvt_checkpoint_of_other_config_names_the_field(tmp_path, model, tiny_overrides):
    save_checkpoint(model, tmp_path / "saved")
    with pytest.raises(ValueError, match=r"num_heads is \[1, 2, 3\] there but \[1, 1, 1\] here"):
        torchcvt.create_model("cvt_13", num_classes=7, checkpoint=tmp_path / "saved",
                              **{**tiny_overrides, "num_heads": [1, 1, 1]})


def test_training_checkpoint_of_torchcvt_train_loads_with_class_names(tmp_path, model, tiny_overrides):
    torch.save({"state_dict": model.state_dict(), "model_name": "cvt_13", "config": model.config.to_dict(),
                "class_names": CLASS_NAMES, "epoch": 3, "optimizer": {"state": {}}}, tmp_path / "last.pth")
    loaded = torchcvt.create_model("cvt_13", num_classes=7, checkpoint=tmp_path / "last.pth",
                                   **tiny_overrides)
    assert_same_weights(loaded, model)
    assert loaded.pretrained_cfg["label_names"] == tuple(CLASS_NAMES)


def test_other_num_classes_gets_a_new_head_with_a_notice(official_file, model, tiny_overrides, caplog):
    with caplog.at_level(logging.INFO, logger="torchcvt"):
        loaded = torchcvt.create_model("cvt_13", num_classes=3, checkpoint=official_file, **tiny_overrides)
    assert caplog.messages == [f"{official_file} has a head of 7 classes, the model one of 3: the model "
                               "keeps its new head, initialised at random (train it before use)"]
    assert_same_weights(loaded, model, skip="head.")
    assert loaded.head.weight.shape == (3, 48)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a headless backbone leaves the head out without a warning
        headless = torchcvt.create_model("cvt_13", num_classes=0, checkpoint=official_file, **tiny_overrides)
        backbone = torchcvt.create_model("cvt_13", features_only=True, checkpoint=official_file,
                                         **tiny_overrides)
    assert_same_weights(headless, model, skip="head.")
    assert_same_weights(backbone.model, model, skip="head.")


def test_checkpoint_of_another_depth_lists_the_keys(tmp_path, tiny_overrides):
    deeper = torchcvt.create_model("cvt_13", num_classes=7, **{**tiny_overrides, "depth": [1, 1, 3]})
    save_official(deeper, tmp_path / "deeper.pth")
    with pytest.raises(ValueError) as error:
        torchcvt.create_model("cvt_13", num_classes=7, checkpoint=tmp_path / "deeper.pth", **tiny_overrides)
    message = str(error.value)
    assert message.startswith(
        f"{tmp_path / 'deeper.pth'} does not fit the model: it looks like another variant (depth [1, 1, 3], "
        "embed_dim [16, 32, 48]; the model has depth [1, 1, 2], embed_dim [16, 32, 48]): 34 unexpected "
        "(stage2.blocks.2.norm1.weight, ")
    assert "\n" not in message


def test_cvt_21_checkpoint_into_cvt_13_names_the_variant(tmp_path):
    save_official(torchcvt.create_model("cvt_21"), tmp_path / "cvt_21.pth")
    with pytest.raises(ValueError) as error:
        torchcvt.create_model("cvt_13", checkpoint=tmp_path / "cvt_21.pth")
    assert str(error.value).startswith(
        f"{tmp_path / 'cvt_21.pth'} does not fit the model: it looks like another variant (depth [1, 4, 16], "
        "embed_dim [64, 192, 384]; the model has depth [1, 2, 10], embed_dim [64, 192, 384]) such as cvt_21 "
        "or cvt_21_384: 272 unexpected (")


def truncate(path, fraction: float) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * fraction)])


def truncated_official(path, model) -> None:
    truncate(save_official(model, path), 0.5)


def truncated_safetensors(fraction: float):
    def make(path, model) -> None:
        truncate(save_checkpoint(model, path.with_suffix(".safetensors")).rename(path), fraction)

    return make


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda p, m: p.write_bytes(b""), "is empty, not a checkpoint"),
        (lambda p, m: p.write_text("stage0.norm.weight 1\n"), "not a checkpoint: it is a text file"),
        (lambda p, m: p.write_bytes(bytes(range(1, 256)) * 4), "it is unrecognised binary data"),
        (truncated_official, "not a readable PyTorch checkpoint, truncated or damaged"),
        (truncated_safetensors(0.9), "damaged or truncated safetensors file"),
        (truncated_safetensors(0.01), r"truncated safetensors file \(\d+ bytes, its header alone needs"),
        (lambda p, m: torch.save({"args": argparse.Namespace(lr=0.1)}, p),
         r"pickled Python objects besides tensors \(argparse.Namespace\)"),
        (lambda p, m: torch.save({"conv1.weight": torch.ones(1), "fc.bias": torch.ones(1)}, p),
         r"2 tensors but none of a CvT .*: conv1.weight, fc.bias"),
        (lambda p, m: torch.save([torch.ones(1)], p), "holds a list, not a state dict"),
        (lambda p, m: torch.save({"epoch": 3}, p), r"not a state dict of tensors: non-tensor entries epoch"),
    ],
    ids=["empty", "text", "random-bytes", "truncated-pth", "truncated-safetensors-data",
         "truncated-safetensors-header", "pickled-object", "not-cvt", "list", "no-tensors"],
)
def test_a_file_that_is_not_a_checkpoint_is_a_one_line_error(tmp_path, model, tiny_overrides, make, match):
    path = tmp_path / "checkpoint.bin"
    make(path, model)
    with pytest.raises(ValueError, match=match) as error:
        torchcvt.create_model("cvt_13", num_classes=7, checkpoint=path, **tiny_overrides)
    assert str(path) in str(error.value) and "\n" not in str(error.value)


def test_missing_checkpoint_and_directory_without_weights(tmp_path, tiny_overrides):
    with pytest.raises(TorchcvtError, match="checkpoint .*nothing.pth does not exist"):
        torchcvt.create_model("cvt_13", checkpoint=tmp_path / "nothing.pth", **tiny_overrides)
    with pytest.raises(ValueError, match="is a directory without model.safetensors or pytorch_model.bin"):
        torchcvt.create_model("cvt_13", checkpoint=tmp_path, **tiny_overrides)


def test_directory_with_a_foreign_config_is_an_error(tmp_path, model, tiny_overrides):
    save_checkpoint(model, tmp_path / "saved")
    (tmp_path / "saved" / "config.json").write_text(json.dumps({"model_type": "vit"}))
    with pytest.raises(ValueError, match="neither a transformers CvT config .* nor a torchcvt config.*'vit'"):
        torchcvt.create_model("cvt_13", num_classes=7, checkpoint=tmp_path / "saved", **tiny_overrides)
    (tmp_path / "saved" / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json is not valid JSON"):
        torchcvt.create_model("cvt_13", num_classes=7, checkpoint=tmp_path / "saved", **tiny_overrides)


def test_cli_convert_reports_bad_input_in_one_line(tmp_path, official_file, capsys):
    (tmp_path / "notes.txt").write_text("hello\n")
    assert main(["convert", str(tmp_path / "notes.txt"), str(tmp_path / "out"), "--to", "hf"]) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"torchcvt convert: error: {tmp_path / 'notes.txt'} is not a checkpoint: it is a text file, "
        "neither safetensors nor a torch.save file"
    ]
    assert main(["convert", str(official_file), str(tmp_path / "out"), "--to", "torchcvt"]) == 2
    err = capsys.readouterr().err
    assert "official checkpoints carry no config): name it with --model" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_cli_convert_official_to_torchcvt(tmp_path, capsys):
    """A full-size cvt_13 file in the official module tree converts to a checkpoint with its logits."""
    spec = Spec(embed_dim=(64, 192, 384), num_heads=(1, 3, 6), depth=(1, 2, 10))
    reference = perturbed(OfficialCvT(spec, num_classes=1000, activation="quick_gelu"), scale=0.05)
    torch.save(reference.state_dict(), tmp_path / "cvt_13.pth")
    assert main(["convert", str(tmp_path / "cvt_13.pth"), str(tmp_path / "out"), "--to", "torchcvt",
                 "--model", "cvt_13"]) == 0
    assert "wrote" in capsys.readouterr().out
    checkpoint = read_checkpoint(tmp_path / "out")
    assert (checkpoint.format, checkpoint.architecture) == ("torchcvt", "cvt_13")
    assert checkpoint.num_classes == 1000
    assert checkpoint.config["activation"] == "quick_gelu"
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        converted = torchcvt.create_model("cvt_13", checkpoint=tmp_path / "out").eval()(images)
        torch.testing.assert_close(converted, reference(images), atol=1e-4, rtol=0)


def _hub_style(path, name: str, **overrides):
    """A transformers folder as the Hub has them: config.json without torchcvt's own record."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        save_hf(torchcvt.create_model(name, num_classes=3, activation="gelu", **overrides), path)
    config = json.loads((path / "config.json").read_text())
    del config["torchcvt"]
    (path / "config.json").write_text(json.dumps(config))
    return path


@pytest.mark.parametrize(("name", "also"), [("cvt_13", "cvt_13_384"), ("cvt_21", "cvt_21_384")])
def test_a_checkpoint_that_names_no_variant_builds_the_first_that_holds_it(tmp_path, caplog, name, also):
    stored = read_checkpoint(_hub_style(tmp_path / name, name))
    assert stored.architecture is None
    with caplog.at_level(logging.INFO, logger="torchcvt.weights.load"):
        assert checkpoint_variant(stored) == name
    assert caplog.messages == [f"{stored.path} names no variant; its architecture is that of {name} and "
                               f"{also}: building {name}"]
    # The input channels and the activation adapt at loading: they do not make another architecture.
    gray = dataclasses.replace(stored, config={**stored.config, "num_channels": 1, "activation": "silu"})
    assert checkpoint_variant(gray) == name


def test_a_checkpoint_held_by_one_variant_or_none_says_nothing(tmp_path, caplog, model):
    stored = read_checkpoint(_hub_style(tmp_path / "c13", "cvt_13"))
    # CvT-W24's stages as the paper gives them (Table 2): no other variant has them.
    w24 = dataclasses.replace(stored, config={**stored.config, "depth": [2, 2, 20],
                                              "embed_dim": [192, 768, 1024], "num_heads": [3, 12, 16]})
    odd = dataclasses.replace(stored, config={**stored.config, "depth": [1, 2, 3]})
    with caplog.at_level(logging.INFO, logger="torchcvt.weights.load"):
        assert checkpoint_variant(w24) == "cvt_w24"
        assert checkpoint_variant(odd) is None
        assert checkpoint_variant(read_checkpoint(save_official(model, tmp_path / "o.pth"))) is None
    assert caplog.messages == []


def test_other_architecture_message_lists_every_clash_and_the_variants_that_hold_it(tmp_path, model,
                                                                                     tiny_overrides):
    save_checkpoint(model, tmp_path / "tiny")
    with pytest.raises(TorchcvtError) as error:
        torchcvt.create_model("cvt_13", num_classes=7, checkpoint=tmp_path / "tiny",
                              **{**tiny_overrides, "num_heads": [1, 1, 1], "depth": [1, 1, 1]})
    assert str(error.value) == (f"{tmp_path / 'tiny' / 'model.safetensors'} was saved from another "
                                "architecture: num_heads is [1, 2, 3] there but [1, 1, 1] here; depth is "
                                "[1, 1, 2] there but [1, 1, 1] here; create the model with matching "
                                "overrides")
    hub = _hub_style(tmp_path / "c13", "cvt_13")  # records the fields, not the variant
    with pytest.raises(TorchcvtError) as error:
        torchcvt.create_model("cvt_13", checkpoint=hub, depth=[1, 4, 16])
    assert str(error.value) == (f"{hub / 'model.safetensors'} was saved from another architecture (it "
                                "looks like cvt_13 or cvt_13_384): depth is [1, 2, 10] there but [1, 4, 16] "
                                "here; create the model with matching overrides")


def test_a_file_of_the_models_layout_that_does_not_fit_gives_no_layout_hint(tmp_path, model, tiny_overrides):
    state = torch.load(save_official(model, tmp_path / "o.pth"), weights_only=True)
    del state["stage0.patch_embed.norm.weight"]
    torch.save(state, tmp_path / "short.pth")
    with pytest.raises(TorchcvtError) as error:
        torchcvt.create_model("cvt_13", num_classes=7, checkpoint=tmp_path / "short.pth", **tiny_overrides)
    missing = "1 missing (stage0.patch_embed.norm.weight)"
    assert str(error.value) == f"{tmp_path / 'short.pth'} does not fit the model: {missing}"


def test_batch_counters_may_be_absent_and_a_misshaped_tensor_is_named(tmp_path, model, tiny_overrides):
    state = torch.load(save_official(model, tmp_path / "o.pth"), weights_only=True)
    counters = [key for key in state if key.endswith("num_batches_tracked")]
    assert counters
    torch.save({k: v for k, v in state.items() if k not in counters}, tmp_path / "no-counters.pth")
    loaded = torchcvt.create_model("cvt_13", num_classes=7, checkpoint=tmp_path / "no-counters.pth",
                                   **tiny_overrides)
    assert_same_outputs(loaded, model)
    state["stage0.patch_embed.norm.weight"] = torch.ones(15)
    torch.save(state, tmp_path / "misshaped.pth")
    with pytest.raises(TorchcvtError) as error:
        torchcvt.create_model("cvt_13", num_classes=7, checkpoint=tmp_path / "misshaped.pth",
                              **tiny_overrides)
    assert str(error.value) == (f"{tmp_path / 'misshaped.pth'} does not fit the model: 1 mis-shaped "
                                "(stage0.patch_embed.norm.weight (15,) vs (16,) in the model)")


def test_load_checkpoint_takes_a_path_or_a_checkpoint_already_read(tmp_path, model, tiny_overrides):
    path = save_checkpoint(model, tmp_path / "tiny")
    fresh = torchcvt.create_model("cvt_13", num_classes=7, **tiny_overrides)
    stored = torchcvt.load_checkpoint(fresh, path)
    assert stored.path == path / "model.safetensors" and stored.num_classes == 7
    assert_same_weights(fresh, model)
    again = torchcvt.create_model("cvt_13", num_classes=7, **tiny_overrides)
    assert torchcvt.load_checkpoint(again, stored) is stored
    assert_same_outputs(again, model)


@pytest.mark.parametrize("channels", [1, 4])
def test_a_model_of_other_input_channels_loads_its_own_first_convolution_unchanged(tmp_path, tiny_overrides,
                                                                                  perturb, channels):
    source = perturb(torchcvt.create_model("cvt_13", num_classes=7, num_channels=channels, **tiny_overrides))
    save_official(source, tmp_path / "o.pth")
    loaded = torchcvt.create_model("cvt_13", num_classes=7, num_channels=channels,
                                   checkpoint=tmp_path / "o.pth", **tiny_overrides)
    assert_same_weights(loaded, source)


def test_a_file_without_the_first_convolution_or_with_two_problems_lists_them(tmp_path, model,
                                                                              tiny_overrides):
    state = torch.load(save_official(model, tmp_path / "o.pth"), weights_only=True)
    first = state.pop("stage0.patch_embed.proj.weight")
    torch.save(state, tmp_path / "headless.pth")
    with pytest.raises(TorchcvtError) as error:
        torchcvt.create_model("cvt_13", num_classes=7, checkpoint=tmp_path / "headless.pth", **tiny_overrides)
    assert str(error.value) == (f"{tmp_path / 'headless.pth'} does not fit the model: 1 missing "
                                "(stage0.patch_embed.proj.weight)")
    state["stage0.patch_embed.proj.weight"] = first
    del state["stage1.patch_embed.norm.bias"]
    state["extra.weight"] = torch.ones(2)
    torch.save(state, tmp_path / "two.pth")
    with pytest.raises(TorchcvtError) as error:
        torchcvt.create_model("cvt_13", num_classes=7, checkpoint=tmp_path / "two.pth", **tiny_overrides)
    assert str(error.value) == (f"{tmp_path / 'two.pth'} does not fit the model: 1 missing "
                                "(stage1.patch_embed.norm.bias); 1 unexpected (extra.weight)")


def test_a_layout_of_a_variants_depth_but_other_widths_names_no_variant(tmp_path, tiny_overrides):
    """The hint names a variant only when both depth and width are that variant's."""
    widths = {**tiny_overrides, "depth": [1, 2, 10]}
    save_official(torchcvt.create_model("cvt_13", num_classes=7, **widths), tmp_path / "deep.pth")
    with pytest.raises(TorchcvtError) as error:
        torchcvt.create_model("cvt_13", num_classes=7, checkpoint=tmp_path / "deep.pth", **tiny_overrides)
    assert str(error.value).startswith(
        f"{tmp_path / 'deep.pth'} does not fit the model: it looks like another variant (depth [1, 2, 10], "
        "embed_dim [16, 32, 48]; the model has depth [1, 1, 2], embed_dim [16, 32, 48]): ")


def test_a_variants_checkpoint_asked_as_another_names_the_variant_it_holds(tmp_path):
    """Recorded by name, the one variant; recorded by its fields alone, every variant that holds them."""
    named = save_checkpoint(torchcvt.create_model("cvt_13_384"), tmp_path / "named")
    with pytest.raises(TorchcvtError) as error:
        torchcvt.create_model("cvt_21", checkpoint=named)
    assert str(error.value) == (
        f"checkpoint {named / 'model.safetensors'} holds a cvt_13_384 whose depth is [1, 2, 10] but cvt_21's "
        "is [1, 4, 16], so cvt_21 cannot hold it: use cvt_13_384 as the model (or leave it out)")
    hub = _hub_style(tmp_path / "hub", "cvt_13")
    with pytest.raises(TorchcvtError) as error:
        torchcvt.create_model("cvt_21", checkpoint=hub)
    assert str(error.value) == (
        f"checkpoint {hub / 'model.safetensors'} holds a cvt_13 or cvt_13_384 whose depth is [1, 2, 10] but "
        "cvt_21's is [1, 4, 16], so cvt_21 cannot hold it: use cvt_13 as the model (or leave it out)")


def test_which_notices_loading_another_name_or_an_unregistered_architecture_gives(tmp_path, tiny_overrides,
                                                                                  caplog):
    named = save_checkpoint(torchcvt.create_model("cvt_13_384", num_classes=3), tmp_path / "named")
    custom = _hub_style(tmp_path / "custom", "cvt_13", **tiny_overrides)  # records no variant
    caplog.clear()  # what saving said
    with caplog.at_level(logging.INFO, logger="torchcvt.weights.load"):
        torchcvt.create_model("cvt_13", checkpoint=named)  # the same architecture under another name
        torchcvt.create_model("cvt_13_384", checkpoint=named)  # its own name: nothing to say
        torchcvt.create_model("cvt_13", checkpoint=custom, activation="gelu", **tiny_overrides)  # as asked
    assert caplog.messages == [f"{named / 'model.safetensors'} holds cvt_13_384 weights: building them as "
                               "cvt_13, as asked (the same architecture)"]
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="torchcvt.weights.load"):
        torchcvt.create_model("cvt_13", checkpoint=custom, activation="gelu")
    assert caplog.messages == [
        f"{custom / 'model.safetensors'} holds a CvT of its own architecture, not cvt_13's "
        "(embed_dim [16, 32, 48], num_heads [1, 2, 3], depth [1, 1, 2]): building what it records"]


def test_another_activation_loads_with_one_warning_and_a_backbone_gets_no_head(tmp_path, model,
                                                                               tiny_overrides, caplog):
    path = save_checkpoint(model, tmp_path / "quick")  # the model's QuickGELU is recorded
    with caplog.at_level(logging.WARNING, logger="torchcvt.weights.load"):
        exact = torchcvt.create_model("cvt_13", num_classes=7, checkpoint=path, activation="gelu",
                                      **tiny_overrides)
    assert caplog.messages == [f"{path / 'model.safetensors'} was saved with activation='quick_gelu' but the "
                               "model uses 'gelu': its outputs will differ from the saved model's"]
    assert_same_weights(exact, model)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="torchcvt"):  # a backbone has no head to leave out
        backbone = torchcvt.create_model("cvt_13", features_only=True, checkpoint=path, **tiny_overrides)
    assert caplog.messages == []
    assert backbone.model.num_classes == 0 and not hasattr(backbone.model.head, "weight")


def test_a_model_built_without_pretrained_cfg_gets_the_class_names(tmp_path, model, tiny_overrides):
    path = save_checkpoint(model, tmp_path / "named", class_names=CLASS_NAMES)
    bare = torchcvt.create_model("cvt_13", num_classes=7, **tiny_overrides)
    del bare.pretrained_cfg  # as a CvT made by hand from a config has none
    torchcvt.load_checkpoint(bare, path)
    assert bare.pretrained_cfg == {"label_names": tuple(CLASS_NAMES)}

"""Checkpoints whose tensors or metadata are of the wrong kind: one line naming the file, the key and what it
holds, never a traceback and never garbage weights."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import CvtConfig, CvtForImageClassification

import torchcvt
from torchcvt.cli import main
from torchcvt.errors import TorchcvtError
from torchcvt.weights import save_checkpoint, save_hf
from torchcvt.weights.formats import config_from_hf, detect_layout, hf_to_torchcvt


@pytest.fixture
def model(tiny_overrides, perturb) -> torchcvt.CvT:
    return perturb(torchcvt.create_model("cvt_13", num_classes=3, **tiny_overrides)).eval()


def _one_line(capsys: pytest.CaptureFixture, argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err and len(err) < 400, err
    return err


@pytest.mark.filterwarnings("error::UserWarning")  # torch's raw complex-cast warning is not an answer
@pytest.mark.parametrize("dtype", [torch.int8, torch.bool, torch.complex64, torch.uint8, torch.int64])
def test_non_floating_tensors_never_load_into_float_weights(tmp_path: Path, model, tiny_overrides,
                                                            dtype: torch.dtype) -> None:
    path = save_checkpoint(model, tmp_path / "model.safetensors")
    with open(path, "rb") as handle:
        header = json.loads(handle.read(int.from_bytes(handle.read(8), "little")))
    tensors = load_file(path)
    key = "stage1.blocks.0.mlp.fc1.weight"
    assert key in tensors
    tensors[key] = (tensors[key] * 10).to(dtype)
    save_file(tensors, path, metadata=header["__metadata__"])
    words = rf"{path}: tensor {key} holds {str(dtype)[6:]} values where the model has float32 weights"
    with pytest.raises(ValueError, match=words):
        torchcvt.create_model("cvt_13", num_classes=3, checkpoint=path, **tiny_overrides)


def _with_torchcvt_metadata(model, path: Path, **changes: object) -> Path:
    save_checkpoint(model, path)
    with open(path, "rb") as handle:
        header = json.loads(handle.read(int.from_bytes(handle.read(8), "little")))
    meta = {**json.loads(header["__metadata__"]["torchcvt"]), **changes}
    save_file(load_file(path), path, metadata={**header["__metadata__"], "torchcvt": json.dumps(meta)})
    return path


@pytest.mark.parametrize(("changes", "words"), [
    ({"class_names": 5}, "class_names must be a list of class names (strings), got 5"),
    ({"class_names": ["a", 7, "c"]}, "class_names must be a list of class names (strings), got ['a', 7"),
    ({"architecture": ["x"]}, "architecture must be a variant name (a string), got ['x']"),
    ({"config": [1, 2] * 10_000}, "torchcvt metadata has no valid config"),
])
def test_malformed_safetensors_metadata(tmp_path: Path, model, capsys: pytest.CaptureFixture,
                                        changes: dict, words: str) -> None:
    path = _with_torchcvt_metadata(model, tmp_path / "model.safetensors", **changes)
    err = _one_line(capsys, ["convert", str(path), str(tmp_path / "out.pth"), "--to", "official"])
    assert f"{path} (safetensors metadata torchcvt): " in err and words in err


@pytest.mark.parametrize(("edit", "words"), [
    ({"id2label": 3}, "id2label must map each class index 0..N-1 to its name, got 3"),
    ({"id2label": ["a", "b", "c"]}, "id2label must map each class index 0..N-1 to its name, got ['a', 'b'"),
    ({"id2label": {"a": "x", "b": "y", "c": "z"}}, "got the keys ['a', 'b', 'c']"),
    ({"id2label": {"0": "x", "1": "y", "5": "z"}}, "got the keys ['0', '1', '5']"),
    ({"id2label": {"0": "x", "1": 2, "2": "z"}}, "id2label must be a list of class names (strings)"),
    ({"torchcvt": {"config": ["depth"]}}, "torchcvt.config must be a mapping of config fields, got ['dep"),
    ({"torchcvt": {"architecture": 13}}, "torchcvt.architecture must be a variant name (a string), got 13"),
])
def test_malformed_config_json(tmp_path: Path, model, capsys: pytest.CaptureFixture, edit: dict,
                               words: str) -> None:
    model.config.activation = "gelu"  # what transformers' config can express: no warning
    folder = save_hf(model, tmp_path / "hf", class_names=["a", "b", "c"])
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **edit}))
    err = _one_line(capsys, ["convert", str(folder), str(tmp_path / "out.pth"), "--to", "official"])
    assert f"{folder / 'config.json'}: " in err and words in err


def test_a_transformers_config_gives_its_head_size_by_id2label_or_num_labels_or_not_at_all():
    depth = {"depth": [1, 2, 3]}
    labelled = {**depth, "id2label": {"0": "ant", "1": "bee"}, "num_labels": 2}
    assert config_from_hf(labelled, "c.json") == ({**depth, "num_classes": 2}, None, ("ant", "bee"))
    counted = {**depth, "num_labels": 4}  # written by hand: no id2label
    assert config_from_hf(counted, "c.json") == ({**depth, "num_classes": 4}, None, None)
    assert config_from_hf(depth, "c.json") == (depth, None, None)
    generic = {**depth, "id2label": {"0": "LABEL_0", "1": "LABEL_1"}}  # transformers' names for no names
    assert config_from_hf(generic, "c.json") == ({**depth, "num_classes": 2}, None, None)
    with pytest.raises(TorchcvtError) as error:
        config_from_hf({"depth": [1, 2, 3, 4]}, "c.json")
    assert str(error.value) == ("c.json: depth has 4 values but the model has 3 stages (len(embed_dim)): "
                                "[1, 2, 3, 4]")


def test_transformers_keys_and_names_convert_in_index_order_and_headless():
    twelve = {"id2label": {str(i): f"class {i}" for i in range(12)}}  # "10" sorts before "2" as text
    assert config_from_hf(twelve, "c.json")[2] == tuple(f"class {i}" for i in range(12))
    full = CvtForImageClassification(CvtConfig(embed_dim=[16, 32, 48], num_heads=[1, 2, 3], depth=[1, 2, 3],
                                               num_labels=3)).state_dict()
    body = {key: value for key, value in full.items() if key.startswith("cvt.")}
    headless = {key.removeprefix("cvt."): value for key, value in body.items()}  # a CvtModel's keys
    want, got = hf_to_torchcvt(body), hf_to_torchcvt(headless)
    assert list(got) == list(want) and all(got[key] is want[key] for key in want)
    assert all(key.startswith("stage") for key in got)
    assert detect_layout(full) == "hf" and detect_layout({"weights": torch.zeros(1)}) is None

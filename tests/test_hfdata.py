"""Hugging Face datasets as a data source: the same images as an ImageFolder tree, written here as a
save_to_disk folder, a parquet folder and a Hub-cache snapshot, train, evaluate and ablate to the same
results; class names come from the ClassLabel; the one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from trainkit import digits_tree, tiny_overrides, train_on_one_thread

from torchcvt.cli import main
from torchcvt.data import ImageFolder, data_roots, open_images
from torchcvt.engine import load_config, read_training_state
from torchcvt.engine.evaluate import evaluate_checkpoint
from torchcvt.hfdata import parse_source, stratified_holdout

datasets = pytest.importorskip("datasets")

REVISION = "0123456789abcdef0123456789abcdef01234567"


def _dataset_dict(tree: Path, names: dict[str, str], label_feature: str = "classlabel") -> object:
    """The tree's splits as a DatasetDict, rows in the order ImageFolder lists the files (the PNG bytes as
    stored, so decoding is identical); names maps tree split -> dataset split."""
    splits = {}
    for folder, split in names.items():
        images = ImageFolder(tree / folder)
        classes = images.class_names
        label = (datasets.ClassLabel(names=classes) if label_feature == "classlabel"
                 else datasets.Value("string"))
        rows = {"picture": [{"bytes": Path(path).read_bytes(), "path": None} for path, _ in images.samples],
                "digit": [target if label_feature == "classlabel" else classes[target]
                          for _, target in images.samples]}
        features = datasets.Features({"picture": datasets.Image(), "digit": label})
        splits[split] = datasets.Dataset.from_dict(rows, features=features)
    return datasets.DatasetDict(splits)


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf")
    tree = digits_tree(root / "tree", classes=3, train_per_class=8, val_per_class=4)
    dd = _dataset_dict(tree, {"train": "train", "val": "test"})
    dd.save_to_disk(str(root / "saved"))
    for split, part in dd.items():
        part.to_parquet(str(root / "parquet" / "data" / f"{split}-00000-of-00001.parquet"))
    return {"tree": tree, "saved": root / "saved", "parquet": root / "parquet", "dd": dd}


def _hub_cache(home: Path, repo: str, dd: datasets.DatasetDict) -> None:
    """A dataset repository as huggingface_hub caches it: refs/main and a snapshot of parquet files."""
    folder = home / "hub" / f"datasets--{repo.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(REVISION)
    for split, part in dd.items():
        part.to_parquet(str(folder / "snapshots" / REVISION / "data" / f"{split}-00000-of-00001.parquet"))


def _train(data_train: str, data_val: str, output: Path) -> tuple[dict, dict]:
    overrides = tiny_overrides(Path("unused"), output, **{"data.train": data_train, "data.val": data_val})
    summary = train_on_one_thread(overrides)
    return summary, read_training_state(output / "last.pth").state_dict


def test_classlabel_names_and_split_mapping(sources, caplog) -> None:
    images = open_images(f"{sources['saved']}#train")
    assert images.class_names == ["0", "1", "2"] and len(images) == 24
    caplog.set_level("INFO")
    # --data maps to the train split and the first validation-like split the dataset has, and says so.
    assert data_roots(sources["saved"]) == (f"{sources['saved']}#train", f"{sources['saved']}#test")
    assert "train <- split 'train', val <- split 'test'" in caplog.text


def test_same_training_as_the_tree(sources, tmp_path, one_thread) -> None:
    tree = sources["tree"]
    want, want_state = _train(str(tree / "train"), str(tree / "val"), tmp_path / "tree")
    for kind in ("saved", "parquet"):
        got, state = _train(f"{sources[kind]}#train", f"{sources[kind]}#test", tmp_path / kind)
        assert got["final_val_top1"] == want["final_val_top1"], kind
        for key, value in want_state.items():
            assert torch.equal(state[key], value), (kind, key)


def test_hub_cache_dataset_offline_trains_and_evaluates_as_the_tree(sources, tmp_path, offline_home,
                                                                     one_thread) -> None:
    _hub_cache(offline_home, "owner/digits", sources["dd"])
    tree = sources["tree"]
    want, _ = _train(str(tree / "train"), str(tree / "val"), tmp_path / "tree")
    got, _ = _train("hf:owner/digits#train", "hf:owner/digits#test", tmp_path / "hub")
    assert got["final_val_top1"] == want["final_val_top1"]
    tree_eval = evaluate_checkpoint("cvt_digits", tmp_path / "tree" / "last.pth", tree / "val", workers=0,
                                    overrides={}, output=tmp_path / "e1")
    hub_eval = evaluate_checkpoint("cvt_digits", tmp_path / "tree" / "last.pth", "hf:owner/digits",
                                   workers=0, output=tmp_path / "e2")
    assert hub_eval["top1"] == tree_eval["top1"] and hub_eval["images"] == tree_eval["images"] == 12


def test_offline_and_missing_is_one_line(offline_home, capsys, tmp_path) -> None:
    assert main(["train", "--data", "hf:owner/absent", "--output", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("torchcvt train: error: cannot get the Hugging Face dataset "
                                              "hf:owner/absent: it is not in the Hugging Face cache"), err
    assert "HF_HUB_OFFLINE or HF_DATASETS_OFFLINE is set" in err


@pytest.mark.parametrize(("source", "message"), [
    ("{saved}#nope", "has no split 'nope'; it has train, test"),
    ("{saved}#train?label=nope", "no column 'nope'; it has picture, digit"),
    ("{saved}#train[dev:2:0]", "the held-out fraction must be between 0 and 1"),
    ("{saved}#train?colour=red", "option 'colour=red' is not image=COLUMN or label=COLUMN"),
    ("{saved}", "names no split: add #SPLIT (it has train, test)"),
])
def test_bad_sources_are_one_line(sources, source, message) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        open_images(source.format(saved=sources["saved"]))


def test_labels_without_classlabel_and_named_columns(tmp_path, sources) -> None:
    dd = _dataset_dict(sources["tree"], {"train": "train"}, label_feature="string")
    dd.save_to_disk(str(tmp_path / "strings"))
    with pytest.raises(ValueError, match=r"no label \(a ClassLabel feature\) column found"):
        open_images(f"{tmp_path / 'strings'}#train")
    images = open_images(f"{tmp_path / 'strings'}#train?label=digit")
    assert images.class_names == ["0", "1", "2"]
    assert images.targets == ImageFolder(sources["tree"] / "train").targets


def test_stratified_holdout_is_seeded_and_disjoint(sources) -> None:
    targets = [0] * 50 + [1] * 30 + [2] * 20
    rest, dev = stratified_holdout(targets, 0.1, seed=3)
    assert sorted(rest + dev) == list(range(100)) and not set(rest) & set(dev)
    assert [sum(targets[i] == c for i in dev) for c in range(3)] == [5, 3, 2]
    assert stratified_holdout(targets, 0.1, seed=3) == (rest, dev)
    assert stratified_holdout(targets, 0.1, seed=4) != (rest, dev)
    base = f"{sources['saved']}#train"
    dev_set, rest_set = open_images(base + "[dev:0.25:0]"), open_images(base + "[rest:0.25:0]")
    assert len(dev_set) == 6 and len(rest_set) == 18 and sorted(dev_set.targets) == [0, 0, 1, 1, 2, 2]
    assert str(parse_source(base + "[dev:0.25:0]?label=digit")) == base + "[dev:0.25:0]?label=digit"


def test_ablate_on_a_dataset_folder_matches_the_tree(sources, tmp_path, one_thread) -> None:
    tree, saved = sources["tree"], sources["saved"]
    results = {}
    for kind, train, val in (("tree", tree / "train", tree / "val"),
                             ("hf", f"{saved}#train", f"{saved}#test")):
        root = tmp_path / kind
        data = {"data.train": str(train), "data.val": str(val), "train.epochs": 1}
        argv = ["ablate", "--study", "kv-stride", "--seeds", "1", "--output", str(root),
                *tiny_overrides(Path("unused"), tmp_path / "unused", **data)]
        assert main(argv) == 0
        rows = json.loads((root / "ablation.json").read_text())["studies"][0]["rows"]
        results[kind] = [row["top1_mean"] for row in rows]
    assert results["hf"] == results["tree"] and None not in results["tree"]


def test_config_keeps_the_source_string(sources) -> None:
    source = "hf:owner/name:cfg#train+validation[rest:0.02:0]?image=img&label=fine_label"
    cfg = load_config(None, [f"data.train={source}", f"data.val={sources['saved']}#test"])
    assert cfg.data.train == source and parse_source(source).splits == ("train", "validation")


def test_missing_extra_is_one_line(sources, tmp_path, monkeypatch, capsys) -> None:
    import shutil
    import sys

    shutil.copytree(sources["saved"], tmp_path / "copy")  # a path not opened before in this process
    monkeypatch.setitem(sys.modules, "datasets", None)
    assert main(["train", "--data", str(tmp_path / "copy"), "--output", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "a Hugging Face data source needs datasets" in err
    assert "pip install 'torchcvt[data]'" in err

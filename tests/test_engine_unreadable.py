"""Unreadable images: never scored, counted and listed; a batch with none readable is skipped; --strict."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from trainkit import digits_tree, tiny_overrides, train_on_one_thread

from torchcvt.cli import main
from torchcvt.engine import load_config, train

pytestmark = pytest.mark.usefixtures("one_thread")


def _break(folder: Path, name: str) -> Path:
    """A truncated PNG: the header reads, the pixels do not."""
    good = next(p for p in sorted(folder.glob("*.png")) if not p.name.startswith("!"))
    path = folder / name
    path.write_bytes(good.read_bytes()[:60])
    return path


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("unreadable")
    data = digits_tree(root / "data")
    train_on_one_thread(tiny_overrides(data, root / "run", **{"train.epochs": 1}))
    return data, root / "run" / "last.pth"


def test_eval_scores_only_readable_images_and_reports_the_others(
    run: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    data, checkpoint = run
    val = tmp_path / "val"
    shutil.copytree(data / "val", val)  # 3 classes x 4 images
    # Sorted first in class 0, so with --batch-size 2 the first batch holds nothing readable.
    broken = [_break(val / "0", "!a.png"), _break(val / "0", "!b.png"), _break(val / "2", "!c.png")]
    argv = ["eval", "--model", "cvt_digits", "--checkpoint", str(checkpoint), "--data", str(val),
            "--output", str(tmp_path), "--batch-size", "2"]
    assert main([*argv, "--workers", "2"]) == 0
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err and "3 unreadable image(s) not scored" in captured.out
    report = json.loads((tmp_path / "eval_val.json").read_text())
    assert report["images"] == 12 and report["unreadable"] == 3
    assert sorted(report["unreadable_images"]) == sorted(map(str, broken))
    # Scores are those of the 12 readable images alone.
    clean = tmp_path / "clean"
    shutil.copytree(data / "val", clean / "val")
    assert main(["eval", "--model", "cvt_digits", "--checkpoint", str(checkpoint),
                 "--data", str(clean / "val"), "--output", str(clean), "--workers", "0"]) == 0
    expected = json.loads((clean / "eval_val.json").read_text())
    assert expected["images"] == 12 and expected["unreadable"] == 0
    assert report["top1"] == pytest.approx(expected["top1"])
    assert report["loss"] == pytest.approx(expected["loss"])
    capsys.readouterr()
    assert main([*argv, "--workers", "0", "--strict"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "!a.png" in err and "strict evaluation stops at the first one" in err


def test_training_skips_batches_with_nothing_readable_and_strict_validation_stops(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    data = digits_tree(tmp_path / "data")
    _break(data / "train" / "1", "!t.png")  # batch size 1: a training batch with nothing readable
    _break(data / "val" / "0", "!a.png")
    _break(data / "val" / "0", "!b.png")  # eval batch size 2: the first val batch is all unreadable
    # Batches of one image: projections without BatchNorm, which needs two values per channel.
    model = {"embed_dim": [16, 24, 32], "num_heads": [1, 1, 2], "depth": [1, 1, 1],
             "qkv_projection_method": ["avg", "avg", "avg"]}
    extra = {"train.epochs": 1, "train.batch_size": 1, "data.eval_batch_size": 2, "model.overrides": model}
    summary = train(load_config(None, tiny_overrides(data, tmp_path / "run", **extra)))
    assert summary["skipped_images"] == 1 and summary["steps"] == 24  # 25 batches, one skipped
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in records if r["kind"] == "val"]
    assert [(r["epoch"], r["images"], r["unreadable"]) for r in val] == [(1, 12, 2)]
    (data / "train" / "1" / "!t.png").unlink()
    argv = ["train", "--strict", *tiny_overrides(data, tmp_path / "strict", **extra)]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("torchcvt train: error: unreadable image") and "!a.png" in err, err


def test_a_batch_left_with_one_readable_image_joins_another_and_training_goes_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from torchcvt.model import CvT

    data = digits_tree(tmp_path / "data")
    for label in range(3):  # 4 unreadable among 12 images a class: batches of 2 often keep just one
        for n in range(4):
            _break(data / "train" / str(label), f"!{n}.png")
    sizes: list[int] = []  # the batch of each training step
    forward = CvT.forward

    def spy(self: CvT, images):
        if self.training:
            sizes.append(len(images))
        return forward(self, images)

    monkeypatch.setattr(CvT, "forward", spy)
    # The default projections: BatchNorm over a 1x1 key/value grid, which one image cannot feed.
    extra = {"train.epochs": 1, "train.batch_size": 2}
    summary = train(load_config(None, tiny_overrides(data, tmp_path / "run", **extra)))
    assert 1 not in sizes and 3 in sizes, sizes  # a lone image trained with a batch next to it
    assert sum(sizes) == 24  # every readable image once
    assert summary["skipped_images"] == 12 and summary["left_out_images"] == 0


def test_training_and_predict_name_a_broken_image_alike_and_classes_without_images_are_reported(
    tmp_path: Path, capsys: pytest.CaptureFixture, caplog: pytest.LogCaptureFixture
) -> None:
    import logging

    data = digits_tree(tmp_path / "data")
    broken = [_break(data / "train" / "2", f"!{n}.png") for n in range(2)]
    for path in (data / "train" / "2").glob("[0-9]*.png"):
        path.unlink()  # class 2 keeps only unreadable images
    (data / "val" / "3").mkdir()
    (data / "train" / "3").mkdir()
    argv = ["train", *tiny_overrides(data, tmp_path / "run", **{"train.epochs": 1})]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and f"class folder {data / 'train' / '3'} holds no images" in err, err
    assert "a class with nothing to learn" in err
    # With train/3 holding an image, its empty val folder is a warning, and class 2 is unlearnable.
    shutil.copy(next((data / "train" / "1").glob("*.png")), data / "train" / "3" / "x.png")
    with caplog.at_level(logging.WARNING, logger="torchcvt"):
        train(load_config(None, tiny_overrides(data, tmp_path / "run", **{"train.epochs": 1})))
    assert f"class folder {data / 'val' / '3'} holds no images: class '3' is not scored" in caplog.text
    assert "class '2' has no readable training image (2 unreadable): the model cannot learn it" in caplog.text
    trained = next(r.getMessage() for r in caplog.records if str(broken[0]) in r.getMessage())
    checkpoint = tmp_path / "run" / "last.pth"
    capsys.readouterr()
    assert main(["predict", "--model", "cvt_digits", "--checkpoint", str(checkpoint), str(broken[0]),
                 "--workers", "0", "--quiet"]) == 1
    named = next(line for line in capsys.readouterr().err.splitlines() if str(broken[0]) in line)
    reason = named.split(f"{broken[0]}: ", 1)[1]
    assert f"skipped unreadable image {broken[0]}: {reason};" in trained, (trained, named)

"""torchcvt eval: metrics equal training's validation, the checkpoint's class list, ReaL labels, bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from trainkit import digits_tree, tiny_overrides, train_on_one_thread

import torchcvt
from torchcvt.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict]:
    root = tmp_path_factory.mktemp("eval")
    data = digits_tree(root / "data", classes=4)
    summary = train_on_one_thread(tiny_overrides(data, root / "run", **{"train.epochs": 2}))
    return data, root / "run" / "last.pth", summary


def _eval(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str, str]:
    code = main(["eval", "--workers", "0", *argv])
    out = capsys.readouterr()
    return code, out.out, out.err


@torch.no_grad()
def _figures_computed_here(checkpoint: Path, val: Path) -> tuple[float, float]:
    """Top-1 and mean cross-entropy of the checkpoint over val, without torchcvt's data or evaluate code:
    PIL decoding, the 32-pixel images as they are (cvt_digits evaluates at 32), the recorded mean and std."""
    model = torchcvt.create_model("cvt_digits", checkpoint=checkpoint).eval()
    mean, std = (torch.tensor(model.pretrained_cfg[k])[:, None, None] for k in ("mean", "std"))
    classes = sorted(p.name for p in val.iterdir())
    images, targets = [], []
    for label, name in enumerate(classes):
        for path in sorted((val / name).iterdir()):
            pixels = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255
            images.append((torch.from_numpy(pixels).permute(2, 0, 1) - mean) / std)
            targets.append(label)
    logits, targets = model(torch.stack(images)), torch.tensor(targets)
    return (logits.argmax(1) == targets).double().mean().item(), F.cross_entropy(logits, targets).item()


def test_eval_reproduces_validation_and_writes_report(
    trained: tuple, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    data, checkpoint, summary = trained
    code, out, _ = _eval(
        capsys,
        "--model",
        "cvt_digits",
        "--checkpoint",
        str(checkpoint),
        "--data",
        str(data / "val"),
        "--output",
        str(tmp_path),
    )
    assert code == 0
    report = json.loads((tmp_path / "eval_val.json").read_text())
    top1, loss = _figures_computed_here(checkpoint, data / "val")
    assert report["top1"] == pytest.approx(top1) and report["loss"] == pytest.approx(loss, rel=1e-5)
    assert report["top1"] == pytest.approx(summary["final_val_top1"])
    assert report["loss"] == pytest.approx(summary["final_val_loss"], rel=1e-5)
    assert report["images"] == 16 and report["classes"] == 4
    assert f"top-1 {100 * report['top1']:.2f}%" in out and "loss" in out
    assert (tmp_path / "eval_val_confusion.png").read_bytes()[:4] == b"\x89PNG"


def test_labels_follow_the_checkpoint_not_the_folder_listing(
    trained: tuple, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """A val tree with only classes 3 and 1 lists them as 0 and 1; the checkpoint's class list must win."""
    data, checkpoint, _ = trained
    full_dir, part = tmp_path / "full", tmp_path / "part"
    _eval(
        capsys,
        "--model",
        "cvt_digits",
        "--checkpoint",
        str(checkpoint),
        "--data",
        str(data / "val"),
        "--output",
        str(full_dir),
    )
    for name in ("3", "1"):
        shutil.copytree(data / "val" / name, part / name)
    _eval(
        capsys,
        "--model",
        "cvt_digits",
        "--checkpoint",
        str(checkpoint),
        "--data",
        str(part),
        "--output",
        str(tmp_path),
    )
    full = json.loads((full_dir / "eval_val.json").read_text())
    subset = json.loads((tmp_path / "eval_part.json").read_text())
    assert subset["per_class_top1"] == {"1": full["per_class_top1"]["1"], "3": full["per_class_top1"]["3"]}


def test_imagenet_real_labels(trained: tuple, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """ReaL scores by file name; with every class marked correct, ReaL top-1 must be 1."""
    data, checkpoint, _ = trained
    val = tmp_path / "val"
    number = 0
    for folder in sorted((data / "val").iterdir()):
        (val / folder.name).mkdir(parents=True)
        for image in sorted(folder.iterdir()):
            number += 1
            shutil.copy(image, val / folder.name / f"ILSVRC2012_val_{number:08d}.JPEG")
    same = tmp_path / "same.json"
    same.write_text(
        json.dumps([[int(f.parent.name)] for f in sorted(val.rglob("*.JPEG"), key=lambda p: p.name)])
    )
    everything = tmp_path / "all.json"
    everything.write_text(json.dumps([[0, 1, 2, 3]] * number))
    argv = ["--model", "cvt_digits", "--checkpoint", str(checkpoint), "--data", str(val),
            "--output", str(tmp_path)]
    code, out, _ = _eval(capsys, *argv, "--real-labels", str(same))
    report = json.loads((tmp_path / "eval_val.json").read_text())
    assert code == 0 and "ReaL top-1" in out
    assert report["real_top1"] == pytest.approx(report["top1"])
    _eval(capsys, *argv, "--real-labels", str(everything))
    assert json.loads((tmp_path / "eval_val.json").read_text())["real_top1"] == 1.0


@pytest.mark.parametrize("case", ["variant", "missing", "no_data", "no_real"])
def test_bad_input_is_one_line(
    case: str, trained: tuple, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    data, checkpoint, _ = trained
    argv, pattern = {
        "variant": (
            ["--model", "cvt_13", "--checkpoint", str(checkpoint), "--data", str(data / "val")],
            "holds a cvt_digits whose embed_dim is",
        ),
        "missing": (
            ["--model", "cvt_digits", "--checkpoint", str(tmp_path / "x.pth"), "--data", str(data)],
            "checkpoint .*x.pth does not exist",
        ),
        "no_data": (
            ["--model", "cvt_digits", "--checkpoint", str(checkpoint), "--data", str(tmp_path / "none")],
            "data folder .*none does not exist",
        ),
        "no_real": (
            [
                "--model",
                "cvt_digits",
                "--checkpoint",
                str(checkpoint),
                "--data",
                str(data / "val"),
                "--real-labels",
                str(tmp_path / "real.json"),
            ],
            "ReaL labels file .*real.json does not exist",
        ),
    }[case]
    code, _, err = _eval(capsys, *argv)
    import re

    assert code == 2 and err.startswith("torchcvt eval: error: ") and err.count("\n") == 1, err
    assert re.search(pattern, err), err


def test_eval_reads_every_checkpoint_format(
    trained: tuple, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """The same weights as torchcvt's safetensors (with its class list) score exactly as the training file."""
    from torchcvt.factory import convert_checkpoint

    data, checkpoint, summary = trained
    convert_checkpoint(checkpoint, tmp_path / "weights", "torchcvt")
    argv = ["--model", "cvt_digits", "--data", str(data / "val"), "--output", str(tmp_path)]
    code, _, _ = _eval(capsys, *argv, "--checkpoint", str(tmp_path / "weights"))
    report = json.loads((tmp_path / "eval_val.json").read_text())
    assert code == 0 and report["classes"] == 4
    top1, loss = _figures_computed_here(checkpoint, data / "val")
    assert report["top1"] == pytest.approx(top1) and report["loss"] == pytest.approx(loss, rel=1e-5)
    assert report["top1"] == pytest.approx(summary["final_val_top1"])
    assert report["loss"] == pytest.approx(summary["final_val_loss"], rel=1e-5)

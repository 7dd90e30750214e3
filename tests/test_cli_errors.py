"""Bad input to the non-training commands: one line on stderr, a non-zero exit, nothing lost."""

import os
from pathlib import Path

import pytest

import torchcvt
from torchcvt.checkpoints import save_checkpoint
from torchcvt.cli import main


@pytest.fixture(scope="module")
def digits_checkpoint(tmp_path_factory) -> Path:
    """A torchcvt .safetensors checkpoint of cvt_digits (it records its variant)."""
    path = tmp_path_factory.mktemp("ckpt") / "digits.safetensors"
    save_checkpoint(torchcvt.create_model("cvt_digits", num_classes=3), path, ["a", "b", "c"])
    return path


def _one_error(capsys, command: str) -> str:
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"torchcvt {command}: error: "), captured.err
    return lines[0]


def test_convert_refuses_the_source_as_destination(digits_checkpoint, tmp_path, capsys):
    original = digits_checkpoint.read_bytes()
    os.link(digits_checkpoint, tmp_path / "hard.safetensors")
    (tmp_path / "soft.safetensors").symlink_to(digits_checkpoint)
    for dst in (digits_checkpoint, tmp_path / "hard.safetensors", tmp_path / "soft.safetensors"):
        for extra in ([], ["--overwrite"]):
            assert main(["convert", str(digits_checkpoint), str(dst), "--to", "official", *extra]) == 2
            assert "is the source checkpoint" in _one_error(capsys, "convert")
    # A torchcvt folder converted into itself: the folder holds the source.
    folder = tmp_path / "folder"
    torchcvt.checkpoints.convert_checkpoint(digits_checkpoint, folder, "torchcvt")
    assert main(["convert", str(folder / "model.safetensors"), str(folder), "--to", "hf", "--overwrite"]) == 2
    assert "or holds it" in _one_error(capsys, "convert")
    assert digits_checkpoint.read_bytes() == original


def test_convert_overwrites_only_when_asked(digits_checkpoint, tmp_path, capsys):
    dst = tmp_path / "out.pth"
    dst.write_bytes(b"precious")
    assert main(["convert", str(digits_checkpoint), str(dst), "--to", "official"]) == 2
    assert f"destination {dst} already exists: pass --overwrite" in _one_error(capsys, "convert")
    assert dst.read_bytes() == b"precious"
    assert main(["convert", str(digits_checkpoint), str(dst), "--to", "official", "--overwrite"]) == 0
    assert f"wrote {dst}" in capsys.readouterr().out
    assert torchcvt.checkpoints.read_checkpoint(dst).format == "official"
    (tmp_path / "empty").mkdir()  # an empty folder is no data to lose
    assert main(["convert", str(digits_checkpoint), str(tmp_path / "empty"), "--to", "hf"]) == 0

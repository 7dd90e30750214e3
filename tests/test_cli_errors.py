"""Bad input to the non-training commands: one line on stderr, a non-zero exit, nothing lost."""

import os
import re
from pathlib import Path

import pytest
from PIL import Image

import torchcvt
from torchcvt.cli import main
from torchcvt.data import check_real_labels
from torchcvt.weights import save_checkpoint


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
            assert "is an input of this command" in _one_error(capsys, "convert")
    # A torchcvt folder converted into itself: the folder holds the source.
    folder = tmp_path / "folder"
    torchcvt.convert_checkpoint(digits_checkpoint, folder, "torchcvt")
    assert main(["convert", str(folder / "model.safetensors"), str(folder), "--to", "hf", "--overwrite"]) == 2
    assert "is or holds an input of this command" in _one_error(capsys, "convert")
    assert digits_checkpoint.read_bytes() == original


def test_convert_overwrites_only_when_asked(digits_checkpoint, tmp_path, capsys):
    dst = tmp_path / "out.pth"
    dst.write_bytes(b"precious")
    assert main(["convert", str(digits_checkpoint), str(dst), "--to", "official"]) == 2
    assert f"destination {dst} already exists: pass --overwrite" in _one_error(capsys, "convert")
    assert dst.read_bytes() == b"precious"
    assert main(["convert", str(digits_checkpoint), str(dst), "--to", "official", "--overwrite"]) == 0
    assert f"wrote {dst}" in capsys.readouterr().out
    assert torchcvt.weights.read_checkpoint(dst).format == "official"
    (tmp_path / "empty").mkdir()  # an empty folder is no data to lose
    assert main(["convert", str(digits_checkpoint), str(tmp_path / "empty"), "--to", "hf"]) == 0


@pytest.fixture
def read_only(tmp_path) -> Path:
    """A folder no file can be created in: chmod 555, or for root (whom permission bits do not stop) /sys."""
    if os.geteuid() == 0:
        return Path("/sys")
    folder = tmp_path / "read_only"
    folder.mkdir(mode=0o555)
    return folder


@pytest.fixture
def image(tmp_path) -> Path:
    path = tmp_path / "seven.png"
    Image.new("RGB", (40, 30), (200, 10, 10)).save(path)
    return path


BAD_OUTPUTS = {
    # command: (arguments before the output, option, file name, what the message says)
    "predict_json": (["predict", "--model", "cvt_digits", "{image}", "--json"], "--json", "r.json"),
    "predict_csv": (["predict", "--model", "cvt_digits", "{image}", "--csv"], "--csv", "r.csv"),
    "embed": (["embed", "--model", "cvt_digits", "{image}", "-o"], "-o", "e.npy"),
    "export": (["export", "--model", "cvt_digits", "--format", "onnx", "-o"], "-o", "m.onnx"),
    "attention": (["attention", "--model", "cvt_digits", "{image}", "-o"], "-o", "a.png"),
    "convert": (["convert", "{checkpoint}", "--to", "official"], "destination", "c.pth"),
}


@pytest.mark.parametrize("case", sorted(BAD_OUTPUTS))
def test_output_that_cannot_be_written_is_one_line_before_any_work(
    case, tmp_path, read_only, image, digits_checkpoint, capsys
):
    prefix, option, name = BAD_OUTPUTS[case]
    argv = [arg.format(image=image, checkpoint=digits_checkpoint) for arg in prefix]
    command = argv[0]
    folder = tmp_path / name
    folder.mkdir()  # an existing folder where a file must go
    assert main([*argv, str(folder)]) == 2
    assert f"{folder} is a folder" in _one_error(capsys, command)
    assert main([*argv, str(read_only / name)]) == 2
    assert f"{option}: cannot write in folder {read_only}" in _one_error(capsys, command)
    assert main([*argv, str(image / name)]) == 2  # under a file, as if it were a folder
    assert "is a file, not a folder" in _one_error(capsys, command)


def test_eval_output_checked_before_loading_anything(tmp_path, read_only, capsys):
    # The checkpoint and data do not exist: the output is the first thing checked.
    base = ["eval", "--model", "cvt_digits", "--checkpoint", str(tmp_path / "none.pth"), "--data",
            str(tmp_path / "no_data"), "--output"]
    (tmp_path / "report").write_text("a file")
    assert main([*base, str(tmp_path / "report")]) == 2
    assert f"output {tmp_path / 'report'}: {tmp_path / 'report'} is a file, not a folder" in _one_error(
        capsys, "eval")
    assert main([*base, str(read_only / "reports")]) == 2
    assert f"output: cannot write in folder {read_only}" in _one_error(capsys, "eval")


@pytest.mark.parametrize("command", ["eval", "predict", "embed", "export", "attention"])
def test_bad_device_is_one_line(command, tmp_path, image, digits_checkpoint, capsys):
    import torch

    argv = {"eval": ["eval", "--checkpoint", str(digits_checkpoint), "--data", str(tmp_path)],
            "predict": ["predict", str(image)], "embed": ["embed", str(image), "-o", str(tmp_path / "e.npy")],
            "export": ["export", "--format", "onnx", "-o", str(tmp_path / "m.onnx")],
            "attention": ["attention", str(image), "-o", str(tmp_path / "a.png")]}[command]
    argv += ["--model", "cvt_digits"]
    assert main([*argv, "--device", "foo"]) == 2
    assert "device='foo' is not a device: use auto, cpu, cuda or cuda:N" in _one_error(capsys, command)
    cuda = "cuda:99" if torch.cuda.is_available() else "cuda"
    assert main([*argv, "--device", cuda]) == 2
    message = _one_error(capsys, command)
    assert "does not exist" in message if torch.cuda.is_available() else "CUDA is not available" in message


def test_attention_reports_the_file_it_wrote(tmp_path, image, capsys):
    assert main(["attention", "--model", "cvt_digits", str(image), "-o", str(tmp_path / "out")]) == 0
    assert capsys.readouterr().out.splitlines()[-1].startswith(f"wrote {tmp_path / 'out.png'} (")
    assert (tmp_path / "out.png").is_file() and not (tmp_path / "out").exists()


def test_real_labels_must_fit_the_data(tmp_path):
    files = [f"/val/{i % 3}/ILSVRC2012_val_{i + 1:08d}.JPEG" for i in range(4)]
    path = tmp_path / "real.json"
    cases = {
        '{"model": "cvt_13"}': "one list of class indices (0 to 9) per image, got a JSON dict",
        "[[1], [2, 3], [10], []]": "one list of class indices (0 to 9) per image, got [10]",
        "[[1], [2], [3]]": "labels 3 images but the data folder holds 4",
        "{not json": "is not valid JSON",
    }
    for text, message in cases.items():
        path.write_text(text)
        with pytest.raises(ValueError, match=re.escape(message)):
            check_real_labels(path, files, 10)
    path.write_text("[[1], [2], [3], [4]]")
    check_real_labels(path, files, 10)
    with pytest.raises(ValueError, match=r"1 image\(s\) are not named ILSVRC2012_val_<n>.JPEG .* /val/x.png"):
        check_real_labels(path, [*files[:3], "/val/x.png"], 10)
    with pytest.raises(FileNotFoundError, match="ImageNet-ReaL labels file .*gone.json does not exist"):
        check_real_labels(tmp_path / "gone.json", files, 10)


def test_convert_set_gives_the_architecture_of_an_official_file(tmp_path, capsys):
    tiny = {"embed_dim": [16, 32, 48], "num_heads": [1, 2, 3], "depth": [1, 1, 2]}
    model = torchcvt.create_model("cvt_13", num_classes=5, **tiny)
    torchcvt.weights.save_official(model, tmp_path / "tiny.pth")
    argv = ["convert", str(tmp_path / "tiny.pth"), str(tmp_path / "out"), "--to", "torchcvt",
            "--model", "cvt_13"]
    assert main(argv) == 2
    assert "tiny.pth" in _one_error(capsys, "convert")  # cvt_13's shapes do not fit
    sets = [f"--set={key}={value}" for key, value in tiny.items()]
    assert main([*argv, *sets]) == 0
    assert "wrote" in capsys.readouterr().out
    assert torchcvt.weights.read_checkpoint(tmp_path / "out").config["depth"] == [1, 1, 2]


@pytest.mark.parametrize("command", ["predict", "embed"])
def test_negative_workers_is_one_line(command, tmp_path, image, capsys):
    extra = ["-o", str(tmp_path / "e.npy")] if command == "embed" else []
    assert main([command, "--model", "cvt_digits", str(image), *extra, "--workers", "-1"]) == 2
    assert "--workers must be 0 or more, got -1" in _one_error(capsys, command)


class _Writes:
    """A stderr that records each write call, as an unbuffered stream (PYTHONUNBUFFERED, torchrun's
    ranks) passes each one to the shared file on its own."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def write(self, text: str) -> int:
        self.calls.append(text)
        return len(text)

    def flush(self) -> None:
        pass


def test_error_line_is_one_write_so_ranks_sharing_stderr_never_interleave(monkeypatch):
    stderr = _Writes()
    monkeypatch.setattr("sys.stderr", stderr)
    assert main(["info", "no_such_model"]) == 2
    assert len(stderr.calls) == 1 and stderr.calls[0].startswith("torchcvt info: error: ")
    assert stderr.calls[0].endswith("\n") and stderr.calls[0].count("\n") == 1

"""A full disk, an example larger than memory, odd paths: one line each, and nothing written is damaged."""

from __future__ import annotations

import argparse
import errno
import importlib
import io
import logging
import os
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from trainkit import digits_tree, tiny_overrides, train_on_one_thread

from torchcvt.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")
NO_SPACE = "no space left on device"


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("disk")
    data = digits_tree(root / "data")
    train_on_one_thread(tiny_overrides(data, root / "run", **{"train.epochs": 1}))
    return data, root / "run"


class _FillingDisk(io.RawIOBase):
    """A file on a disk with `room` bytes left: the write past it fails with ENOSPC, as the OS's does."""

    def __init__(self, handle: io.BufferedWriter, room: int):
        super().__init__()
        self.handle, self.room = handle, room

    def writable(self) -> bool:
        return True

    def write(self, data: bytes) -> int:
        size = memoryview(data).nbytes
        if size > self.room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= size
        return self.handle.write(data)

    def flush(self) -> None:
        self.handle.flush()

    def fileno(self) -> int:
        return self.handle.fileno()

    def close(self) -> None:
        super().close()  # flushes first
        self.handle.close()


def _fill_disk(monkeypatch: pytest.MonkeyPatch, module: str, room: int = 100) -> None:
    """Files that `module` opens for writing run out of space after `room` bytes."""
    def opener(path, mode="r", *args, **kwargs):  # noqa: ANN001, ANN202 (open's own signature)
        handle = open(path, mode, *args, **kwargs)
        return _FillingDisk(handle, room) if "w" in mode else handle

    monkeypatch.setattr(importlib.import_module(module), "open", opener, raising=False)


def _one_error_line(capsys: pytest.CaptureFixture) -> str:
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    return err


def test_a_checkpoint_that_does_not_fit_stops_in_one_line_and_keeps_the_previous_one(
    trained: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    data, done = trained
    run = tmp_path / "run"
    shutil.copytree(done, run)
    before = (run / "last.pth").read_bytes()
    _fill_disk(monkeypatch, "torchcvt.files", room=10_000)  # checkpoints are written through files
    assert main(["train", *tiny_overrides(data, run, **{"train.epochs": 2})]) == 2
    err = _one_error_line(capsys)
    assert err.startswith(f"torchcvt train: error: cannot write checkpoint {run}"), err
    assert f"{NO_SPACE}; " in err and "is unchanged" in err, err
    assert (run / "last.pth").read_bytes() == before
    assert not list(run.glob(".*.tmp-*"))


@pytest.mark.parametrize("option", ["--json", "--csv"])
def test_a_report_to_a_full_device_is_one_line_and_an_existing_report_stays_whole(
    option: str, trained: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture,
    monkeypatch: pytest.MonkeyPatch, devices: dict[str, Path],
) -> None:
    data, run = trained
    argv = ["predict", "--model", "cvt_digits", "--checkpoint", str(run / "last.pth"),
            str(data / "val" / "0"), "--workers", "0", "--quiet", option]
    assert main([*argv, str(devices["full"])]) == 2
    assert _one_error_line(capsys) == f"torchcvt predict: error: cannot write {devices['full']}: {NO_SPACE}"
    assert devices["full"].is_char_device()
    report = tmp_path / "report"
    assert main([*argv, str(report)]) == 0
    written = report.read_bytes()
    _fill_disk(monkeypatch, "torchcvt.files", room=10)
    assert main([*argv, str(report)]) == 2
    assert _one_error_line(capsys) == f"torchcvt predict: error: cannot write {report}: {NO_SPACE}"
    assert report.read_bytes() == written and not list(tmp_path.glob(".*.tmp-*"))


@pytest.mark.parametrize("name", ["full", "null"])
def test_an_export_to_a_device_is_refused_and_the_device_stays(
    name: str, trained: tuple[Path, Path], capsys: pytest.CaptureFixture, devices: dict[str, Path]
) -> None:
    _, run = trained
    device = devices[name]
    argv = ["export", "--model", "cvt_digits", "--checkpoint", str(run / "last.pth"), "--format",
            "torchscript", "-o", str(device)]
    assert main(argv) == 2
    assert _one_error_line(capsys) == (f"torchcvt export: error: -o {device} is a character device, not a "
                                       "regular file: give a file name")
    assert device.is_char_device()


def test_an_export_that_does_not_fit_keeps_the_file_there(
    trained: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, run = trained
    out = tmp_path / "model.pt"
    argv = ["export", "--model", "cvt_digits", "--checkpoint", str(run / "last.pth"),
            "--format", "torchscript", "-o", str(out)]
    assert main(argv) == 0
    written = out.read_bytes()
    with monkeypatch.context() as patch:
        _fill_disk(patch, "torchcvt.files", room=1000)
        assert main(argv) == 2
    assert _one_error_line(capsys) == f"torchcvt export: error: cannot write {out}: {NO_SPACE}"
    assert out.read_bytes() == written and not list(tmp_path.glob(".*.tmp-*"))


def test_an_export_example_larger_than_memory_is_refused_before_it_is_made(
    trained: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    _, run = trained
    argv = ["export", "--model", "cvt_digits", "--checkpoint", str(run / "last.pth"),
            "--format", "torchscript", "-o", str(tmp_path / "huge.pt")]
    # 2 x 3 x 100000 x 100000 float32 values.
    assert main([*argv, "--img-size", "100000"]) == 2
    err = _one_error_line(capsys)
    assert err.startswith("torchcvt export: error: exporting at 100000x100000 needs 240 GB for the example "
                          "input alone, more than the"), err
    assert not (tmp_path / "huge.pt").exists()


def test_attention_to_a_device_writes_that_device(trained: tuple[Path, Path], capsys: pytest.CaptureFixture,
                                                  devices: dict[str, Path]) -> None:
    data, run = trained
    image = next((data / "val" / "0").glob("*.png"))
    argv = ["attention", "--model", "cvt_digits", "--checkpoint", str(run / "last.pth"), str(image)]
    assert main([*argv, "-o", str(devices["full"])]) == 2
    assert _one_error_line(capsys) == f"torchcvt attention: error: cannot write {devices['full']}: {NO_SPACE}"
    assert not devices["full"].with_suffix(".png").exists()
    assert main([*argv, "-o", str(devices["null"])]) == 0
    assert f"wrote {devices['null']} (stage" in capsys.readouterr().out
    assert devices["full"].is_char_device() and devices["null"].is_char_device()


def test_eval_on_a_file_says_it_is_a_file(trained: tuple[Path, Path], capsys: pytest.CaptureFixture) -> None:
    data, run = trained
    image = next((data / "val" / "0").glob("*.png"))
    assert main(["eval", "--model", "cvt_digits", "--checkpoint", str(run / "last.pth"), "--data", str(image),
                 "--workers", "0"]) == 2
    assert _one_error_line(capsys) == (f"torchcvt eval: error: data folder {image} is a file, not a folder: "
                                       "give the folder of class folders")


def test_an_unsafe_file_of_another_pickle_protocol_is_refused_without_a_notice(tmp_path: Path) -> None:
    from torchcvt import create_model
    from torchcvt.engine import read_training_state

    path = tmp_path / "unsafe.pth"
    torch.save({"args": argparse.Namespace(lr=0.1)}, path, pickle_protocol=4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any notice, torch's about the pickle protocol included, fails
        with pytest.raises(ValueError, match="holds pickled Python objects besides tensors"):
            create_model("cvt_digits", checkpoint=path)
        with pytest.raises(ValueError, match="holds pickled Python objects besides tensors"):
            read_training_state(path)


def test_a_run_folder_copied_to_a_new_name_resumes_without_a_changed_output(
    trained: tuple[Path, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    data, done = trained
    run = tmp_path / "copied"
    shutil.copytree(done, run)
    with caplog.at_level(logging.INFO, logger="torchcvt"):
        train_on_one_thread(tiny_overrides(data, run, **{"train.epochs": 2}))
    notice = next(r.getMessage() for r in caplog.records if "changed config" in r.getMessage())
    assert "train.epochs: 1 -> 2" in notice and "train.output" not in notice, notice

"""Issue 26's data-loss items: outputs that are devices or inputs, and a real full disk or a real kill at the
last write of a command (summary.json, embed -o, convert, metrics.jsonl, a transformers folder), each of
which must leave the previous file whole and say what happened in one line."""

from __future__ import annotations

import errno
import importlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors import safe_open
from trainkit import digits_tree, tiny_overrides, train_on_one_thread

import torchcvt
from torchcvt.ablate import data_fingerprint, open_suite, prepare, read_suite
from torchcvt.ablate.runner import is_finished
from torchcvt.cli import main
from torchcvt.files import read_json
from torchcvt.reports import load_embeddings
from torchcvt.weights import save_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")
SRC = Path(__file__).resolve().parents[1] / "src"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(SRC), "PYTHONDONTWRITEBYTECODE": "1"}
NO_SPACE = "no space left on device"


def fill(disk: Path) -> None:
    """Write a file on disk until the file system says it is full."""
    descriptor = os.open(disk / "filler", os.O_WRONLY | os.O_CREAT)
    try:
        while os.write(descriptor, bytes(65536)):
            pass
    except OSError as error:
        assert error.errno == errno.ENOSPC, error
    finally:
        os.close(descriptor)


def fill_before(monkeypatch: pytest.MonkeyPatch, disk: Path, function: str) -> None:
    """The disk fills up just before `module:attribute` is called (the last write of a command)."""
    module, attribute = function.split(":")
    owner = importlib.import_module(module)
    *path, name = attribute.split(".")
    for part in path:
        owner = getattr(owner, part)
    original = getattr(owner, name)

    def fill_the_disk_first(*args: object, **kwargs: object) -> object:
        fill(disk)
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, fill_the_disk_first)


@pytest.fixture
def disk(tmp_path: Path) -> Path:
    """A real 32 MB tmpfs, for filling up."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=32m", "tmpfs", str(mount)],
                          capture_output=True, text=True)
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {done.stderr.strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=True)


def killed_run(inject: list[str], *argv: str) -> subprocess.CompletedProcess:
    """`torchcvt ARGV` in a real process that strace SIGKILLs at a chosen system call."""
    if shutil.which("strace") is None:
        pytest.skip("strace is not installed")
    command = ["strace", "-f", "-qq", "-o", "/dev/null", *inject, sys.executable, "-m", "torchcvt", *argv]
    return subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=300)


def one_line(text: str) -> str:
    text = text.strip()
    assert "\n" not in text and "Traceback" not in text, text
    return text


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return digits_tree(tmp_path_factory.mktemp("loss") / "data")


@pytest.fixture(scope="module")
def finished(data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished one-epoch run folder."""
    run = tmp_path_factory.mktemp("finished") / "run"
    train_on_one_thread(tiny_overrides(data, run, **{"train.epochs": 1}))
    return run


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Two torchcvt checkpoints of cvt_digits told apart by their heads: 3 and 5 classes."""
    folder = tmp_path_factory.mktemp("checkpoints")
    paths = []
    for classes in (3, 5):
        path = folder / f"digits{classes}.safetensors"
        save_checkpoint(torchcvt.create_model("cvt_digits", num_classes=classes), path,
                        [f"class{i}" for i in range(classes)])
        paths.append(path)
    return paths[0], paths[1]


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("images")
    for i in range(3):
        Image.new("RGB", (32, 32), (40 * i, 90, 200)).save(folder / f"{i}.png")
    return folder


# 1. Devices and other special files are no output.


@pytest.mark.parametrize("name", ["null", "full"])
def test_convert_onto_a_device_is_refused_and_the_device_stays(
    name: str, devices: dict[str, Path], checkpoints: tuple[Path, Path], capsys: pytest.CaptureFixture
) -> None:
    device = devices[name]
    assert main(["convert", str(checkpoints[0]), str(device), "--to", "official", "--overwrite"]) == 2
    assert one_line(capsys.readouterr().err) == (
        f"torchcvt convert: error: destination {device} is a character device, not a regular file: give a "
        "file name")
    assert device.is_char_device()


def test_a_library_write_onto_a_device_is_refused(devices: dict[str, Path]) -> None:
    from torchcvt.weights import export_checkpoint

    model = torchcvt.create_model("cvt_digits", num_classes=3)
    with pytest.raises(ValueError, match=f"{devices['null']} is a character device, not a regular file"):
        export_checkpoint(model, devices["null"], "official")
    assert devices["null"].is_char_device()


def test_embed_to_a_fifo_is_refused_before_any_work(
    checkpoints: tuple[Path, Path], images: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    fifo = tmp_path / "out.npy"
    os.mkfifo(fifo)
    assert main(["embed", "--checkpoint", str(checkpoints[0]), str(images), "-o", str(fifo)]) == 2
    assert one_line(capsys.readouterr().err) == (
        f"torchcvt embed: error: -o {fifo} is a FIFO, not a regular file: give a file name")


# 3. An output that is an input of the same command.


def test_an_output_onto_an_input_is_refused_and_the_input_stays(
    checkpoints: tuple[Path, Path], images: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    checkpoint = tmp_path / "v.safetensors"
    shutil.copyfile(checkpoints[0], checkpoint)
    (tmp_path / "link.pt").symlink_to(checkpoint)
    image = images / "0.png"
    before = checkpoint.read_bytes(), image.read_bytes()
    model = ["--checkpoint", str(checkpoint)]
    commands = {
        "export": ["export", *model, "--format", "torchscript", "-o", str(checkpoint)],
        "export via a link": ["export", *model, "--format", "torchscript", "-o", str(tmp_path / "link.pt")],
        "predict --json": ["predict", *model, str(image), "--json", str(checkpoint)],
        "predict --csv": ["predict", *model, str(image), "--csv", str(image)],
        "embed": ["embed", *model, str(images), "-o", str(checkpoint)],
        "attention": ["attention", *model, str(image), "-o", str(image)],
    }
    for what, argv in commands.items():
        assert main(argv) == 2, what
        err = one_line(capsys.readouterr().err)
        assert "is an input of this command" in err and "writing it would destroy it" in err, (what, err)
    assert (checkpoint.read_bytes(), image.read_bytes()) == before


def test_an_eval_report_onto_its_checkpoint_is_refused(
    finished: Path, data: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    checkpoint = tmp_path / "eval_val.json"  # the name eval gives its report on data/val in that folder
    shutil.copyfile(finished / "best.pth", checkpoint)
    before = checkpoint.read_bytes()
    assert main(["eval", "--checkpoint", str(checkpoint), "--model", "cvt_digits", "--data",
                 str(data / "val"), "--workers", "0"]) == 2
    assert "is an input of this command" in one_line(capsys.readouterr().err)
    assert checkpoint.read_bytes() == before


# 2. summary.json: written whole; a torn one is named, never a finished run.


def test_a_full_disk_at_summary_json_is_one_line_and_keeps_the_old_summary(
    disk: Path, data: Path, finished: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = Path(shutil.copytree(finished, disk / "run"))
    before = (run / "summary.json").read_bytes()
    fill_before(monkeypatch, disk, "torchcvt.engine.summary:RunReport.finish")
    assert main(["train", *tiny_overrides(data, run, **{"train.epochs": 2})]) == 2
    err = one_line(capsys.readouterr().err)
    assert err == f"torchcvt train: error: cannot write {run / 'summary.json'}: {NO_SPACE}"
    assert (run / "summary.json").read_bytes() == before
    assert not list(run.glob(".*.tmp-*"))


def test_a_kill_at_the_summary_write_never_leaves_it_unreadable(data: Path, finished: Path, tmp_path: Path
                                                                ) -> None:
    run = Path(shutil.copytree(finished, tmp_path / "run"))
    summary = run / "summary.json"
    summary.unlink()  # a run killed before its summary: the rerun writes it
    # Killed at the first write into a file opened as summary.json, should there be one (a summary
    # written in place); a summary written beside and renamed into place has none.
    inject = ["-P", str(summary), "-e", "trace=write", "-e", "inject=write:signal=KILL"]
    done = killed_run(inject, "train", *tiny_overrides(data, run, **{"train.epochs": 1}))
    assert done.returncode in (0, -signal.SIGKILL), done.stderr
    assert read_json(summary)["epochs"] == 1


def test_a_torn_summary_is_no_finished_run_and_train_writes_it_again(
    data: Path, finished: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
    caplog: pytest.LogCaptureFixture,
) -> None:
    run = Path(shutil.copytree(finished, tmp_path / "run"))
    summary = run / "summary.json"
    summary.write_bytes(b"")
    with pytest.raises(ValueError, match=rf"run summary {summary} is damaged \(empty\): a kill or a full"):
        read_json(summary, "run summary")
    with caplog.at_level(logging.WARNING, logger="torchcvt"):
        assert not is_finished(run)
    assert f"run summary {summary} is damaged (empty)" in caplog.text
    assert "counts as not finished" in caplog.text
    summary.write_text('{"model": "cvt_di')
    assert main(["train", *tiny_overrides(data, run, **{"train.epochs": 1})]) == 0
    warning = [line for line in capsys.readouterr().err.splitlines() if "summary" in line]
    assert len(warning) == 1 and str(summary) in warning[0] and "not valid JSON" in warning[0], warning
    assert read_json(summary)["epochs"] == 1 and is_finished(run)


def test_a_torn_suite_record_is_one_line_naming_it(data: Path, tmp_path: Path, capsys: pytest.CaptureFixture
                                                   ) -> None:
    root = tmp_path / "suite"
    _, recipe = prepare(None, tiny_overrides(data, tmp_path / "unused"), None)
    open_suite(root, recipe.settings, data_fingerprint(recipe.train_dir, recipe.val_dir), ["kv-stride"], [0])
    assert read_suite(root)["studies"] == ["kv-stride"]
    (root / "suite.json").write_text('{"format": 1, "reci')
    assert main(["ablate", "--report-only", "--output", str(root)]) == 2
    assert one_line(capsys.readouterr().err).startswith(
        f"torchcvt ablate: error: {root / 'suite.json'} is not valid JSON")


# 4. embed -o: the pair is replaced together, or not at all.


@pytest.mark.parametrize("suffix", [".npy", ".safetensors"])
def test_a_full_disk_during_embed_is_one_line_and_keeps_the_old_files(
    suffix: str, disk: Path, checkpoints: tuple[Path, Path], images: Path, capsys: pytest.CaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    out = disk / f"features{suffix}"
    argv = ["embed", "--checkpoint", str(checkpoints[0]), str(images), "--workers", "0", "--quiet", "-o",
            str(out)]
    assert main(argv) == 0
    capsys.readouterr()
    before = {path: path.read_bytes() for path in disk.iterdir()}
    argv[2] = str(checkpoints[1])  # other weights: other features
    fill_before(monkeypatch, disk, "torchcvt.reports:save_embeddings")
    assert main(argv) == 2
    assert one_line(capsys.readouterr().err) == f"torchcvt embed: error: cannot write {out}: {NO_SPACE}"
    assert {path: path.read_bytes() for path in before} == before
    assert sorted(p.name for p in disk.iterdir()) == sorted([*(p.name for p in before), "filler"])
    assert len(load_embeddings(out)[1]) == 3


def test_no_space_for_the_file_list_keeps_the_old_features_too(
    checkpoints: tuple[Path, Path], images: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    out = tmp_path / "features.npy"
    argv = ["embed", "--checkpoint", str(checkpoints[0]), str(images), "--workers", "0", "--quiet", "-o",
            str(out)]
    assert main(argv) == 0
    capsys.readouterr()
    before = {path: path.read_bytes() for path in tmp_path.iterdir()}
    real_open = open

    def no_room_for_lists(path: str | Path, mode: str = "r", *args: object, **kwargs: object) -> object:
        if ".files.json" in str(path) and "w" in mode:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_open(path, mode, *args, **kwargs)

    monkeypatch.setattr("torchcvt.files.open", no_room_for_lists, raising=False)
    argv[2] = str(checkpoints[1])  # other weights: other features
    assert main(argv) == 2
    listing = out.with_suffix(".files.json")
    assert one_line(capsys.readouterr().err) == f"torchcvt embed: error: cannot write {listing}: {NO_SPACE}"
    assert {path: path.read_bytes() for path in tmp_path.iterdir()} == before


def test_a_file_list_beside_other_features_is_refused(
    checkpoints: tuple[Path, Path], images: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from torchcvt.reports import save_embeddings

    out = tmp_path / "features.npy"
    save_embeddings(out, torch.zeros(2, 4), ["a.png", "b.png"])
    # A kill between the two renames of the next write: its .npy is in place, its list is not.
    renames = []

    def killed_at_second(source: Path, target: Path) -> None:
        renames.append(target)
        if len(renames) == 2:
            raise KeyboardInterrupt
        os.rename(source, target)

    monkeypatch.setattr("torchcvt.files.os.replace", killed_at_second)
    with pytest.raises(KeyboardInterrupt):
        save_embeddings(out, torch.ones(2, 4), ["c.png", "d.png"])
    with pytest.raises(ValueError, match="features.files.json is the file list of other features than"):
        load_embeddings(out)


# 5. metrics.jsonl on resume.


def test_a_kill_at_the_first_metrics_write_of_a_resume_keeps_the_earlier_epochs(
    data: Path, finished: Path, tmp_path: Path
) -> None:
    run = Path(shutil.copytree(finished, tmp_path / "run"))
    metrics = run / "metrics.jsonl"
    inject = ["-P", str(metrics), "-e", "trace=write", "-e", "inject=write:signal=KILL"]
    done = killed_run(inject, "train", *tiny_overrides(data, run, **{"train.epochs": 2}))
    assert done.returncode == -signal.SIGKILL, done.stderr
    epochs = [json.loads(line)["epoch"] for line in metrics.read_text().splitlines() if '"val"' in line]
    assert epochs == [1]
    train_on_one_thread(tiny_overrides(data, run, **{"train.epochs": 2}))
    epochs = [json.loads(line)["epoch"] for line in metrics.read_text().splitlines() if '"val"' in line]
    assert epochs == [1, 2]


# 6. A transformers folder is one unit; outputs are 0644 under umask 022.


def _hf_folder_is_one_model(folder: Path) -> int:
    """The classes of the model in folder, checked to be those its config.json names."""
    config = json.loads((folder / "config.json").read_text())
    with safe_open(folder / "model.safetensors", framework="pt") as weights:
        rows = weights.get_slice("classifier.weight").get_shape()[0]
    named = len(config["id2label"])
    assert rows == named, f"{rows}-class weights beside a {named}-class config"
    return rows


@pytest.mark.parametrize("syscall", ["rename", "renameat2"])
def test_a_kill_while_an_hf_folder_is_replaced_leaves_one_whole_model(
    syscall: str, checkpoints: tuple[Path, Path], tmp_path: Path
) -> None:
    folder = tmp_path / "hf"
    assert main(["convert", str(checkpoints[0]), str(folder), "--to", "hf"]) == 0
    # The second rename lands inside the new folder being built (or, writing in place, in the old
    # folder); renameat2 is the swap of the whole folder.
    when = 2 if syscall == "rename" else 1
    inject = ["-e", f"trace={syscall}", "-e", f"inject={syscall}:signal=KILL:when={when}"]
    done = killed_run(inject, "convert", str(checkpoints[1]), str(folder), "--to", "hf", "--overwrite")
    killed = done.returncode == -signal.SIGKILL
    assert _hf_folder_is_one_model(folder) == (3 if killed else 5)  # the old model whole, or the new one
    assert killed or syscall == "renameat2", done.stderr  # a writer without the swap is not killed there
    assert main(["convert", str(checkpoints[1]), str(folder), "--to", "hf", "--overwrite"]) == 0
    assert _hf_folder_is_one_model(folder) == 5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]


def test_a_full_disk_during_convert_is_one_line_and_keeps_the_old_output(
    disk: Path, checkpoints: tuple[Path, Path], capsys: pytest.CaptureFixture
) -> None:
    for to, out in (("official", disk / "out.pth"), ("hf", disk / "hf")):
        assert main(["convert", str(checkpoints[0]), str(out), "--to", to]) == 0
        before = {p: p.read_bytes() for p in ([out] if out.is_file() else sorted(out.iterdir()))}
        capsys.readouterr()
        fill(disk)
        assert main(["convert", str(checkpoints[1]), str(out), "--to", to, "--overwrite"]) == 2
        err = [line for line in capsys.readouterr().err.splitlines() if "warning" not in line]
        assert err == [f"torchcvt convert: error: cannot write {out}: {NO_SPACE}"]
        assert {p: p.read_bytes() for p in before} == before
        (disk / "filler").unlink()
    assert sorted(p.name for p in disk.iterdir()) == ["hf", "out.pth"]
    assert _hf_folder_is_one_model(disk / "hf") == 3


def test_convert_outputs_are_readable_by_others_as_the_umask_allows(checkpoints: tuple[Path, Path],
                                                                     tmp_path: Path) -> None:
    previous = os.umask(0o022)
    try:
        torchcvt.convert_checkpoint(checkpoints[0], tmp_path / "a.pth", "official")
        torchcvt.convert_checkpoint(checkpoints[0], tmp_path / "hf", "hf")
    finally:
        os.umask(previous)
    files = [tmp_path / "a.pth", *sorted((tmp_path / "hf").iterdir())]
    assert {path.name: oct(path.stat().st_mode & 0o777) for path in files} == {
        path.name: "0o644" for path in files}
    assert oct((tmp_path / "hf").stat().st_mode & 0o777) == "0o755"


# 16. A read-only suite folder.


def test_a_read_only_suite_folder_is_one_line(disk: Path, data: Path, capsys: pytest.CaptureFixture) -> None:
    root = disk / "suite"
    recipe_argv = tiny_overrides(data, disk / "unused")
    _, recipe = prepare(None, recipe_argv, None)
    open_suite(root, recipe.settings, data_fingerprint(recipe.train_dir, recipe.val_dir), ["kv-stride"], [0])
    subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
    expected = f"torchcvt ablate: error: --output: cannot write in folder {root} (Read-only file system)"
    assert main(["ablate", "--report-only", "--output", str(root)]) == 2
    assert one_line(capsys.readouterr().err) == expected
    assert main(["ablate", "--study", "kv-stride", "--seeds", "1", "--output", str(root), *recipe_argv]) == 2
    assert one_line(capsys.readouterr().err) == expected


# The writer's own guarantees.


def test_an_append_on_a_full_disk_keeps_what_the_file_held(disk: Path) -> None:
    from torchcvt.files import append_text

    path = disk / "events.jsonl"
    append_text(path, "one\n")
    fill(disk)
    with pytest.raises(OSError) as raised:
        append_text(path, "x" * 100_000)
    assert (raised.value.errno, raised.value.filename) == (errno.ENOSPC, str(path))
    assert path.read_text() == "one\n"


@pytest.mark.parametrize("one_step", [True, False], ids=["renameat2", "two renames"])
def test_a_folder_is_replaced_whole_or_not_at_all(one_step: bool, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from torchcvt.files import replace_folder, write_text

    if not one_step:  # a file system without RENAME_EXCHANGE
        monkeypatch.setattr("torchcvt.files._exchange", lambda a, b: False)
    folder = tmp_path / "out"
    for text in ("first", "second"):
        with replace_folder(folder) as staging:
            write_text(staging / "a.txt", text)
    with pytest.raises(RuntimeError), replace_folder(folder) as staging:
        write_text(staging / "a.txt", "third")
        raise RuntimeError("stopped while writing")
    assert [(p.name, p.read_text()) for p in folder.iterdir()] == [("a.txt", "second")]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]

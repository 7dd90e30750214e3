"""Run safety: nothing a run wrote is lost or silently wrong after a kill, a re-run or a damaged folder,
and every bad start is one line."""

from __future__ import annotations

import json
import logging
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from trainkit import add_unreadable_image, digits_tree, tiny_overrides, train_process

from torchcvt.cli import main
from torchcvt.engine import TrainingDiverged, load_config, train

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def _notices(caplog: pytest.LogCaptureFixture) -> None:
    """The library's notices (logging INFO and up) reach caplog for the tests that look for them."""
    caplog.set_level(logging.INFO, logger="torchcvt")


def _overrides(data: Path, output: Path, **extra: object) -> list[str]:
    # Three epochs: a kill after the first leaves two to go, however slowly the killing test polls.
    return tiny_overrides(data, output, **{"train.epochs": 3, "train.checkpoint_every_steps": 3, **extra})


def _said(capsys: pytest.CaptureFixture, caplog: pytest.LogCaptureFixture) -> str:
    captured = capsys.readouterr()
    return captured.out + captured.err + caplog.text


def _cli_error(capsys: pytest.CaptureFixture, argv: list[str]) -> str:
    assert main(["train", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("torchcvt train: error: ") and "\n" not in err, err
    return err


def _val_records(run: Path) -> list[dict]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if r["kind"] == "val"]


def _all_finite(state: dict) -> bool:
    return all(torch.isfinite(t).all() for t in state.values() if t.is_floating_point())


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = digits_tree(tmp_path_factory.mktemp("runsafe") / "data")
    add_unreadable_image(root / "train" / "0")
    return root


@pytest.fixture(scope="module")
def killed(data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run folder of a 3-epoch run SIGKILLed once epoch 1 improved the best model."""
    run = tmp_path_factory.mktemp("killed") / "run"
    process = train_process(_overrides(data, run), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240
    while not (run / "best.pth").exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    _, err = process.communicate()
    assert process.returncode == -signal.SIGKILL, err.decode()
    return run


@pytest.fixture
def run(killed: Path, tmp_path: Path) -> Path:
    """A private copy of the killed run folder, to resume or damage."""
    copy = Path(shutil.copytree(killed, tmp_path / "run"))
    # The kill may have landed during a checkpoint write; the test of that case makes its own leftover, so
    # every other test starts from the same folder.
    for leftover in copy.glob(".*.tmp-*"):
        leftover.unlink()
    return copy


def test_best_model_its_score_and_skips_survive_a_kill_and_resume(data: Path, run: Path) -> None:
    summary = train(load_config(None, _overrides(data, run)))
    val = _val_records(run)
    assert [r["epoch"] for r in val] == [1, 2, 3]
    best_score = max(r["top1"] for r in val)
    best = torch.load(run / "best.pth", weights_only=True)
    # best.pth holds the first epoch that reached the best score; no later, equal or worse one replaces it.
    assert best["epoch"] == next(r["epoch"] for r in val if r["top1"] == best_score)
    assert best["best_top1"] == summary["best_val_top1"] == best_score
    assert torch.load(run / "last.pth", weights_only=True)["best_top1"] == best_score
    # The one unreadable image is counted once, though every epoch of the killed and resumed runs read it.
    assert summary["skipped_images"] == 1


def test_a_finished_run_run_again_says_so_and_changes_nothing(
    data: Path, run: Path, capsys: pytest.CaptureFixture, caplog: pytest.LogCaptureFixture
) -> None:
    first = train(load_config(None, _overrides(data, run)))
    before = {path: path.read_bytes() for path in sorted(run.rglob("*")) if path.is_file()}
    again = train(load_config(None, _overrides(data, run)))
    assert "already finished" in _said(capsys, caplog)
    assert {path: path.read_bytes() for path in sorted(run.rglob("*")) if path.is_file()} == before
    assert again == first


def test_nan_stop_names_a_checkpoint_whose_weights_are_finite(data: Path, tmp_path: Path) -> None:
    # Warm-up from 1e-6 gives one sane step; then SGD at ~1e29 with huge weight decay makes weights infinite
    # while that step's loss is still finite.
    overrides = _overrides(
        data,
        tmp_path / "run",
        **{
            "optim.opt": "sgd",
            "optim.lr": 1e30,
            "optim.weight_decay": 1e10,
            "sched.warmup_epochs": 1,
            "train.checkpoint_every_steps": 1,
        },
    )
    with pytest.raises(TrainingDiverged, match="the last good checkpoint is ") as caught:
        train(load_config(None, overrides))
    named = Path(str(caught.value).split("the last good checkpoint is ")[1].split()[0].rstrip(",;()"))
    saved = torch.load(named, weights_only=True)
    assert saved["global_step"] == 1
    assert _all_finite(saved["state_dict"])
    for path in (tmp_path / "run").glob("*.pth"):
        assert _all_finite(torch.load(path, weights_only=True)["state_dict"]), path


def test_a_torn_last_metrics_line_is_dropped_with_a_notice(
    data: Path, run: Path, capsys: pytest.CaptureFixture, caplog: pytest.LogCaptureFixture
) -> None:
    with open(run / "metrics.jsonl", "a") as handle:
        handle.write('{"kind": "train", "st')
    train(load_config(None, _overrides(data, run)))
    said = _said(capsys, caplog)
    assert str(run / "metrics.jsonl") in said and "dropped" in said
    assert [r["epoch"] for r in _val_records(run)] == [1, 2, 3]


def test_a_damaged_last_checkpoint_is_one_line_offering_the_previous_one(
    data: Path, run: Path, capsys: pytest.CaptureFixture
) -> None:
    last = run / "last.pth"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    err = _cli_error(capsys, _overrides(data, run))
    assert str(last) in err and str(run / "last.prev.pth") in err
    assert main(["train", "--resume", str(run / "last.prev.pth"), *_overrides(data, run)]) == 0
    assert torch.load(last, weights_only=True)["epoch"] == 3


def test_a_temporary_file_left_by_a_kill_during_a_write_is_removed(data: Path, run: Path) -> None:
    leftover = run / ".last.pth.tmp-99999"
    leftover.write_bytes(b"PK\x03\x04 half a checkpoint")
    train(load_config(None, _overrides(data, run)))
    assert not leftover.exists()
    assert not list(run.glob(".*.tmp*"))


def test_no_resume_moves_the_previous_run_aside_and_says_where(
    data: Path, run: Path, capsys: pytest.CaptureFixture, caplog: pytest.LogCaptureFixture
) -> None:
    history = (run / "metrics.jsonl").read_bytes()
    last = (run / "last.pth").read_bytes()
    assert main(["train", "--no-resume", *_overrides(data, run)]) == 0
    kept = [path for path in run.rglob("metrics.jsonl") if path.parent != run]
    assert len(kept) == 1 and kept[0].read_bytes() == history
    assert (kept[0].parent / "last.pth").read_bytes() == last
    assert str(kept[0].parent) in _said(capsys, caplog)
    assert [r["epoch"] for r in _val_records(run)] == [1, 2, 3]


def test_output_that_is_a_file_is_one_line(data: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    taken = tmp_path / "taken"
    taken.write_text("not a folder")
    for output in (taken, taken / "sub"):
        err = _cli_error(capsys, ["--output", str(output), *_overrides(data, tmp_path / "unused")])
        assert str(output) in err


@pytest.fixture
def read_only_folder(tmp_path: Path) -> Iterator[Path]:
    """A folder no one can write to, root included: a read-only tmpfs mount where we may mount (we run as
    root), else a mode-0555 folder for a user who is not root."""
    locked = tmp_path / "locked"
    locked.mkdir()
    if os.geteuid() != 0:
        locked.chmod(0o555)
        yield locked
        locked.chmod(0o755)
        return
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(locked)],
                             capture_output=True, text=True)
    if mounted.returncode:
        pytest.skip(f"root cannot mount a read-only tmpfs here: {mounted.stderr.strip()}")
    try:
        yield locked
    finally:
        subprocess.run(["umount", str(locked)], check=True)


def test_read_only_output_is_one_line(
    data: Path, tmp_path: Path, read_only_folder: Path, capsys: pytest.CaptureFixture
) -> None:
    with pytest.raises(OSError):  # the folder really is read-only for this user
        (read_only_folder / "probe").write_text("x")
    err = _cli_error(capsys, ["--output", str(read_only_folder), *_overrides(data, tmp_path / "unused")])
    assert f"{read_only_folder} is not writable" in err
    inside = read_only_folder / "run"
    err = _cli_error(capsys, ["--output", str(inside), *_overrides(data, tmp_path / "unused")])
    assert f"{inside} cannot be created" in err


def _official_pth(path: Path) -> Path:
    from torchcvt import create_model

    torch.save(create_model("cvt_digits", num_classes=3).state_dict(), path)
    return path


def _safetensors(path: Path) -> Path:
    from safetensors.torch import save_file

    save_file({"weight": torch.zeros(2, 2)}, str(path))
    return path


def _pickle(path: Path) -> Path:
    path.write_bytes(pickle.dumps({"epoch": 1, "classes": {"a", "b"}, "callback": print}))
    return path


@pytest.mark.parametrize(
    "make", [_official_pth, _safetensors, _pickle], ids=["official", "safetensors", "pickle"]
)
def test_resume_from_a_file_that_is_no_training_checkpoint_is_one_line(
    make, data: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    path = make(tmp_path / "weights.bin")
    err = _cli_error(capsys, ["--resume", str(path), *_overrides(data, tmp_path / "run")])
    assert str(path) in err
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_resume_from_a_folder(data: Path, run: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    err = _cli_error(capsys, ["--resume", str(empty), *_overrides(data, tmp_path / "other")])
    assert str(empty) in err and "does not exist" not in err
    # A run folder stands for its last.pth.
    assert main(["train", "--resume", str(run), *_overrides(data, run)]) == 0
    assert f"resuming from {run / 'last.pth'}" in capsys.readouterr().out


def test_a_one_class_dataset_is_an_error(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    data = digits_tree(tmp_path / "data", classes=1)
    err = _cli_error(capsys, _overrides(data, tmp_path / "run"))
    assert "1 class" in err and str(data / "train") in err


@pytest.mark.parametrize("delay", [1.0, 3.0])
def test_ctrl_c_during_start_up_is_one_line_and_exit_130(data: Path, tmp_path: Path, delay: float) -> None:
    # Enough epochs that the run is still going whenever the signal comes (start-up takes seconds).
    overrides = _overrides(data, tmp_path / "run", **{"train.epochs": 500})
    process = train_process(overrides, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        time.sleep(delay)
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=120)
    finally:
        process.kill()
    lines = err.decode().strip().splitlines()
    assert process.returncode == 130, err.decode()
    # Only the skipped-image warnings of the data and the one line of the interruption.
    assert lines[-1] == "torchcvt train: interrupted", err.decode()
    assert all(line.startswith("torchcvt train: warning: skipped") for line in lines[:-1]), err.decode()


def test_skipped_images_are_counted_once_across_two_processes(tmp_path: Path) -> None:
    data = digits_tree(tmp_path / "data")
    for label in ("0", "1"):
        add_unreadable_image(data / "train" / label)
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
        # 26 images, 13 a process: one batch each, so every image is read in both epochs.
        "-m", "torchcvt", "train", *_overrides(data, tmp_path / "run", **{"train.batch_size": 13}),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["skipped_images"] == 2
    assert sorted(torch.load(tmp_path / "run" / "last.pth", weights_only=True)["skipped_images"]) == sorted(
        str(data / "train" / label / "broken.png") for label in ("0", "1")
    )

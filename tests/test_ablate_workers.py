"""Ablation workers at the edges: SLURM arrays with a step, launchers that do not train, a worker killed
under its launched training, other workers' studies in the report, and data replaced under a suite."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from trainkit import digits_tree, tiny_overrides

from torchcvt import ablate
from torchcvt.ablate import data_fingerprint, default_shard, open_suite, prepare
from torchcvt.cli import main
from torchcvt.engine.runlock import RunLock, lock_holder

SRC = Path(__file__).resolve().parents[1] / "src"
SLURM = ("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT", "SLURM_ARRAY_TASK_MIN", "SLURM_ARRAY_TASK_MAX",
         "SLURM_ARRAY_TASK_STEP")
KV_STRIDE_RUNS = ("pos000-tokccc-kv111-projccc", "pos000-tokccc-kv222-projccc")


def _recipe(data: Path, **extra: object) -> list[str]:
    return tiny_overrides(data, data / "unused", **extra)


def _slurm(monkeypatch: pytest.MonkeyPatch, **values: str) -> None:
    for name in SLURM:
        monkeypatch.delenv(name, raising=False)
    for name, value in values.items():
        monkeypatch.setenv(f"SLURM_ARRAY_TASK_{name}", value)


def _alive(pid: int) -> bool:
    """Whether any thread of pid still runs.

    A zombie, dead but not yet reaped by whoever adopted it, does not. Its leader turns zombie while its
    other threads may still be exiting, and those hold its open files (the run lock) until they are gone,
    so every thread is read, not the leader alone.
    """
    try:
        threads = list(Path(f"/proc/{pid}/task").iterdir())
    except FileNotFoundError:
        return False
    for thread in threads:
        try:
            if (thread / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
                return True
        except FileNotFoundError:
            continue
    return False


def _one_line_error(capsys: pytest.CaptureFixture, *argv: str) -> str:
    assert main(["ablate", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("torchcvt ablate: error: "), err
    return err


def test_slurm_arrays_with_a_step(monkeypatch: pytest.MonkeyPatch) -> None:
    # --array=0-28:2: ids 0, 2, ..., 28 are shards 0..14 of 15.
    _slurm(monkeypatch, ID="28", MIN="0", MAX="28", STEP="2", COUNT="15")
    assert default_shard() == (14, 15)
    _slurm(monkeypatch, ID="7", MIN="3", MAX="11", STEP="4", COUNT="3")
    assert default_shard() == (1, 3)
    _slurm(monkeypatch, ID="4", COUNT="5")  # an old SLURM without MIN/MAX/STEP
    assert default_shard() == (4, 5)
    for values, words in [
        (dict(ID="3", MIN="0", MAX="28", STEP="2", COUNT="15"), "not one of the array's 15 task ids"),
        (dict(ID="30", MIN="0", MAX="28", STEP="2", COUNT="15"), "not one of the array's 15 task ids"),
        (dict(ID="4", MIN="1", MAX="9", STEP="1", COUNT="3"), "not one range with one step"),
        (dict(ID="0", MIN="0", COUNT="0"), "must be at least 1"),
        (dict(ID="x" * 500, COUNT="2"), "SLURM_ARRAY_TASK_ID='xxx"),
    ]:
        _slurm(monkeypatch, **values)
        with pytest.raises(ValueError, match=re.escape(words)) as raised:
            default_shard()
        assert len(str(raised.value)) < 300 and "give --shard" in str(raised.value)


def test_slurm_errors_are_one_line(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    _slurm(monkeypatch, ID="0", COUNT="0")
    assert "SLURM array task 0" in _one_line_error(capsys, "--dry-run")
    _slurm(monkeypatch, ID="1.5", COUNT="4")
    assert "SLURM_ARRAY_TASK_ID='1.5' is not an integer" in _one_line_error(capsys, "--dry-run")


def test_a_launcher_that_exits_0_without_training(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    _slurm(monkeypatch)
    data = digits_tree(tmp_path / "data")
    root = tmp_path / "suite"
    err = _one_line_error(capsys, "--study", "kv-stride", "--seeds", "1", "--output", str(root),
                          "--launcher", "echo", *_recipe(data))
    assert "exited with code 0 but left no valid summary.json" in err and len(err) < 600
    events = [json.loads(line)["event"] for line in (root / "events.jsonl").read_text().splitlines()]
    assert "done" not in events


def test_a_killed_launcher_worker_stops_its_training_and_a_rerun_moves_on(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    _slurm(monkeypatch)
    data = digits_tree(tmp_path / "data")
    root = tmp_path / "suite"
    args = ["--study", "kv-stride", "--seeds", "1", "--output", str(root),
            *_recipe(data, **{"train.epochs": 400})]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(SRC)}
    command = [sys.executable, "-m", "torchcvt", "ablate", *args, "--launcher", sys.executable]
    worker = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first = root / "runs" / KV_STRIDE_RUNS[0] / "seed-0"
    lock = first / ".train.lock"
    deadline = time.monotonic() + 120
    # The lock file names its holder once the launched training holds it.
    while not (lock.is_file() and lock.read_text()) and worker.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    holder = lock_holder(first)
    assert holder is not None, "the launched training never started"
    child = int(holder.split()[1])
    try:
        worker.send_signal(signal.SIGKILL)
        worker.wait()
        deadline = time.monotonic() + 30
        while _alive(child) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(child), "the training outlived its killed worker"
    finally:
        if _alive(child):
            os.kill(child, signal.SIGKILL)
    assert lock_holder(first) is None
    # A training still running in both folders (one started by hand, say): a rerun skips them and starts
    # no launcher (`false` would fail the rerun).
    locks = []
    for name in KV_STRIDE_RUNS:
        folder = root / "runs" / name / "seed-0"
        folder.mkdir(parents=True, exist_ok=True)
        locks.append(RunLock(folder))
        locks[-1].acquire()
    try:
        assert main(["ablate", *args, "--launcher", "false"]) == 0
    finally:
        for held in locks:
            held.release()
    assert "trained 0 run(s), 0 already finished, 2 held by other workers" in capsys.readouterr().out


def test_the_report_covers_studies_another_worker_added(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture) -> None:
    _slurm(monkeypatch)
    data = digits_tree(tmp_path / "data")
    root = tmp_path / "suite"

    def other_worker_joins(plan, root, *args, **kwargs):  # noqa: ANN001, ANN202 - run_suite's signature
        suite = json.loads((root / "suite.json").read_text())
        recipe = ablate.recipe_from_settings(suite["recipe"], 0)
        ablate.open_suite(root, recipe.settings, suite["data"], ["projection"], [0])
        return ablate.runner.WorkerTally()

    monkeypatch.setattr(ablate, "run_suite", other_worker_joins)
    argv = ["ablate", "--study", "kv-stride", "--seeds", "1", "--output", str(root), *_recipe(data)]
    assert main(argv) == 0
    capsys.readouterr()
    studies = [study["study"] for study in json.loads((root / "ablation.json").read_text())["studies"]]
    assert studies == ["kv-stride", "projection"]


def test_images_replaced_under_a_suite_with_the_same_names(tmp_path: Path) -> None:
    data = digits_tree(tmp_path / "data")
    root = tmp_path / "suite"
    _, recipe = prepare(None, _recipe(data), None)
    open_suite(root, recipe.settings, data_fingerprint(recipe.train_dir, recipe.val_dir), ["kv-stride"], [0])
    image = sorted((data / "train" / "2").iterdir())[3]
    content = bytearray(image.read_bytes())
    content[-20] ^= 0xFF  # same name, same size, other bytes
    image.write_bytes(bytes(content))
    with pytest.raises(ValueError, match=r"another recipe or data: data.train.sample_sha256: "):
        open_suite(root, recipe.settings, data_fingerprint(recipe.train_dir, recipe.val_dir), [], [0])
    other = sorted((data / "val" / "1").iterdir())[0]
    other.write_bytes(other.read_bytes() + b"\0")  # a size changed
    with pytest.raises(ValueError, match=r"data.val.files_sha256: "):
        open_suite(root, recipe.settings, data_fingerprint(recipe.train_dir, recipe.val_dir), [], [0])


@pytest.mark.parametrize(("record", "words"), [
    ([1, 2], "must hold a JSON object (a suite record), got a JSON list"),
    ({"recipe": {}, "data": {}, "studies": []}, "key 'seeds' must hold a JSON array, got nothing"),
    ({"recipe": [], "data": {}, "studies": [], "seeds": [0]},
     "key 'recipe' must hold a JSON object, got a JSON list"),
    ({"recipe": {}, "data": {}, "studies": [], "seeds": ["a"] * 1000},
     "key 'seeds' must hold one or more integers"),
])
def test_a_malformed_suite_json_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture, record: object,
                                            words: str) -> None:
    (tmp_path / "suite.json").write_text(json.dumps(record))
    err = _one_line_error(capsys, "--report-only", "--output", str(tmp_path))
    assert f"{tmp_path / 'suite.json'}" in err and words in err and len(err) < 300
    (tmp_path / "suite.json").write_bytes(b"\xff\xfe{")
    assert "is not valid JSON" in _one_line_error(capsys, "--report-only", "--output", str(tmp_path))

"""One training per run folder: a second is refused naming the first; a killed run leaves no stale lock."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from trainkit import digits_tree, tiny_overrides, train_process


def _wait_for_training(process: subprocess.Popen, run: Path) -> None:
    deadline = time.monotonic() + 240
    metrics = run / "metrics.jsonl"
    while process.poll() is None and time.monotonic() < deadline:
        if metrics.exists() and metrics.read_text().count("\n") >= 2:
            return
        time.sleep(0.05)
    raise AssertionError(f"the first training did not start: {process.stderr.read().decode()[-2000:]}")


def test_a_second_training_on_a_folder_in_use_is_refused_naming_the_holder(tmp_path: Path) -> None:
    data = digits_tree(tmp_path / "data")
    run = tmp_path / "run"
    overrides = tiny_overrides(data, run, **{"train.epochs": 500, "train.log_every_steps": 1})
    first = train_process(overrides, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        _wait_for_training(first, run)
        second = train_process(overrides, "--no-resume", stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            _, err = second.communicate(timeout=60)
        finally:
            second.kill()
        lines = err.decode().strip().splitlines()
        assert second.returncode == 2 and len(lines) == 1, err.decode()[-2000:]
        assert lines[0].startswith(f"torchcvt train: error: run folder {run} is in use by another training")
        assert f"pid {first.pid} on {socket.gethostname()}" in lines[0], lines[0]
        # The first run goes on with its files where they were: nothing was moved aside.
        assert first.poll() is None
        assert not (run / "previous-1").exists()
        before = (run / "metrics.jsonl").read_text().count("\n")
        time.sleep(1.0)
        assert (run / "metrics.jsonl").read_text().count("\n") > before
        records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        steps = [r["step"] for r in records if r["kind"] == "train"]
        assert steps == sorted(steps)
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    # The kernel dropped the killed run's lock: the folder is free at once.
    from torchcvt.engine.runlock import RunLock

    lock = RunLock(run)
    lock.acquire()
    lock.release()


@pytest.mark.slow
def test_every_torchrun_rank_stops_when_the_folder_is_held(tmp_path: Path) -> None:
    data = digits_tree(tmp_path / "data")
    run = tmp_path / "run"
    run.mkdir()
    from torchcvt.engine.runlock import RunLock

    lock = RunLock(run)
    lock.acquire()  # held by this test process
    try:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                   "-m", "torchcvt", "train", *tiny_overrides(data, run)]
        result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    finally:
        lock.release()
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("torchcvt train: error:")]
    assert len(errors) == 2, result.stderr[-3000:]  # each rank, with rank 0's message
    assert all(f"is in use by another training (pid {os.getpid()} on" in line for line in errors), errors
    assert not (run / "metrics.jsonl").exists()

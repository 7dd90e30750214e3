"""What a run tells its user: step lines (or none with --quiet), a line at least every so often, validation
progress, mixed precision, top-5 only where it says something, a finished run, the run folder it picks,
data-loader workers sized to the machine, and a failed start that leaves nothing behind."""

import logging
import os
from pathlib import Path

import pytest
from trainkit import digits_tree, tiny_overrides

import torchcvt.workers
from torchcvt.cli import main
from torchcvt.engine import load_config, reporting, train
from torchcvt.engine.build import with_run_folder
from torchcvt.engine.runtime import Runtime

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return digits_tree(tmp_path_factory.mktemp("logs") / "digits", classes=3, train_per_class=4,
                       val_per_class=2)


def _train(data: Path, output: Path, caplog, **extra) -> list[str]:
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="torchcvt"):
        train(load_config(None, tiny_overrides(data, output, **extra)))
    return [record.getMessage() for record in caplog.records]


def test_a_log_file_shows_progress_every_so_often_and_says_what_runs(data, tmp_path, caplog, monkeypatch):
    # Every step is "so often" here, far below log_every_steps: lines come by the clock, not the count.
    monkeypatch.setattr(reporting, "LOG_INTERVAL_SECONDS", 0.0)
    lines = _train(data, tmp_path / "run", caplog, **{"train.quiet": False, "train.log_every_steps": 1000,
                                                      "train.amp": "bf16", "train.epochs": 1})
    steps = [line for line in lines if " step " in line and line.startswith("epoch 1/1")]
    assert [line.split(" step ")[1].split()[0] for line in steps] == ["1/3", "2/3", "3/3"]
    assert any(line.startswith("epoch 1/1 validating: batch ") for line in lines)
    assert "mixed precision: training in bf16 autocast, validation in bf16 autocast" in lines
    # Three classes: top-5 is always 100%, so it is not shown.
    (val,) = [line for line in lines if line.startswith("epoch 1/1: val ")]
    assert "top-1" in val and "top-5" not in val

    # Rerunning the finished run says so, without announcing a resume at an epoch past the last.
    again = _train(data, tmp_path / "run", caplog, **{"train.epochs": 1})
    assert any("is already finished (1 epochs); nothing to do" in line for line in again)
    assert not any(line.startswith("resuming from") for line in again)


def test_quiet_prints_no_step_lines(data, tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(reporting, "LOG_INTERVAL_SECONDS", 0.0)
    lines = _train(data, tmp_path / "run", caplog, **{"train.quiet": True, "train.log_every_steps": 1})
    assert not [line for line in lines if " step " in line or "validating" in line]
    assert [line.split(":")[0] for line in lines if ": val top-1" in line] == ["epoch 1/2", "epoch 2/2"]
    assert not any(line.startswith("mixed precision") for line in lines)  # float32: nothing to announce


def test_curves_say_what_the_training_loss_includes(tmp_path, saved_figures):
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text('{"kind": "train", "step": 1, "epoch": 0.5, "loss": 1.2, "lr": 0.1}\n'
                       '{"kind": "val", "step": 2, "epoch": 1, "loss": 0.9, "top1": 0.5, "top5": 1.0}\n')
    label = reporting.train_loss_label(0.1, mixup=False)
    reporting.plot_curves(metrics, tmp_path / "curves.png", 3, label)
    loss, accuracy, _ = saved_figures[0].axes
    assert [text.get_text() for text in loss.get_legend().get_texts()] == [
        "train (with label smoothing 0.1)", "val (plain cross-entropy)"]
    assert [text.get_text() for text in accuracy.get_legend().get_texts()] == ["top-1"]  # 3 classes
    assert reporting.train_loss_label(0.0, mixup=False) == "train"
    mixed = "train (with label smoothing 0.1, mixup/CutMix targets)"
    assert reporting.train_loss_label(0.1, mixup=True) == mixed


def test_a_run_without_output_gets_a_fresh_folder_named_from_data_and_model(data, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("time.strftime", lambda form: "20260102-030405")
    cfg = load_config(None, [item for item in tiny_overrides(data, tmp_path) if "train.output" not in item])
    assert cfg.train.output is None
    runtime = Runtime(0, 1, None)
    first = with_run_folder(cfg, runtime).train.output
    assert first == os.path.join("runs", "digits-cvt_digits-20260102-030405")
    os.makedirs(first)
    assert with_run_folder(cfg, runtime).train.output == first + "-2"  # taken: the next free name
    given = load_config(None, tiny_overrides(data, tmp_path / "mine"))
    assert with_run_folder(given, runtime).train.output == str(tmp_path / "mine")


@pytest.mark.parametrize(("asked", "used", "notice"), [(None, 2, False), (1, 1, False), (2, 2, False),
                                                        (8, 2, True)])
def test_workers_are_sized_to_the_machine(monkeypatch, caplog, asked, used, notice):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    with caplog.at_level(logging.INFO, logger="torchcvt"):
        assert torchcvt.workers.sized_workers(asked) == used
    said = "data.workers=8 but this machine lets the run use 2 CPU(s): loading with 2 worker process(es)"
    assert (said in caplog.text) == notice


def test_a_failed_start_leaves_no_folder_holding_only_its_lock(tmp_path):
    missing = tmp_path / "no-such-data"
    (tmp_path / "existing").mkdir()
    for output in (tmp_path / "new" / "run", tmp_path / "existing"):
        existed = output.exists()
        with pytest.raises(ValueError, match="no-such-data"):
            train(load_config(None, tiny_overrides(missing, output)))
        assert not (output / ".train.lock").exists()
        assert output.exists() == existed
    assert not (tmp_path / "new").exists()  # the parent the start created goes too


def test_version(capsys):
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0
    assert capsys.readouterr().out.strip() == f"torchcvt {torchcvt.__version__}"

"""The training config: typed, checked at load time (before any data or model), one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from torchcvt.cli import main
from torchcvt.engine import TrainConfig, dry_run, load_config, train

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def _train_error(capsys: pytest.CaptureFixture, argv: list[str]) -> str:
    assert main(["train", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("torchcvt train: error: ") and "\n" not in err, err
    return err


@pytest.mark.parametrize("path", [None, *sorted(CONFIGS.glob("*.yaml"))], ids=lambda p: p and p.stem)
def test_configs_round_trip_through_plain_dicts_and_yaml(path: Path | None) -> None:
    import yaml

    # Fine-tuning recipes need starting weights (any path: the file is read when training starts).
    weights = ["model.checkpoint=w.pth"] if path and "require_weights: true" in path.read_text() else []
    cfg = load_config(path, weights)
    plain = cfg.to_dict()
    # What --dry-run prints and checkpoints keep: plain YAML/JSON types only, read back to the same config.
    assert TrainConfig.from_mapping(yaml.safe_load(yaml.safe_dump(plain))) == cfg
    assert set(plain) == {"model", "data", "aug", "optim", "sched", "train"}
    # Every key of the dump is one the command line accepts.
    flat = [f"{section}.{key}={json.dumps(value)}" for section, values in plain.items()
            for key, value in values.items()]
    assert load_config(path, flat) == cfg


def test_config_is_frozen_and_typed() -> None:
    import dataclasses

    cfg = load_config(None, ["aug.scale=[0.5, 1]", "sched.warmup_epochs=1"])
    assert cfg.aug.scale == (0.5, 1.0) and isinstance(cfg.aug.scale[1], float)
    assert cfg.sched.warmup_epochs == 1.0 and isinstance(cfg.sched.warmup_epochs, float)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.train.epochs = 3  # type: ignore[misc]
    # Any way of making a config checks it: a copy with new values, or sections built in Python.
    with pytest.raises(ValueError, match="train.batch_size must be at least 1, got 0"):
        cfg.override({"train.batch_size": 0})
    with pytest.raises(ValueError, match="optim.betas\\[1\\] must be below 1.0, got 1"):
        dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, betas=(0.9, 1)))
    assert cfg.override({"model.overrides.depth": [1, 1, 1]}).model.overrides == {"depth": [1, 1, 1]}


def test_train_and_dry_run_take_a_plain_mapping_too(tmp_path: Path) -> None:
    plan = dry_run({"model": {"name": "cvt_21"}, "train": {"batch_size": 32}}, world_size=2)
    assert (plan["model"], plan["global_batch"]) == ("cvt_21", 64)
    with pytest.raises(ValueError, match="unknown config key 'train.epoch' in the given config; did you"):
        train({"train": {"epoch": 3, "output": str(tmp_path / "run")}})
    assert not (tmp_path / "run").exists()


def test_exponents_are_floats_at_any_depth(tmp_path: Path) -> None:
    cfg = load_config(None, ["sched.warmup_lr=1e-6", "model.overrides.layer_norm_eps=1e-6", "optim.lr=3e-3"])
    assert cfg.sched.warmup_lr == 1e-6 and cfg.optim.lr == 3e-3
    assert cfg.model.overrides["layer_norm_eps"] == 1e-6
    file = tmp_path / "c.yaml"
    file.write_text("model:\n  overrides: {layer_norm_eps: 1e-6}\nsched:\n  min_lr: 5e-7\n")
    cfg = load_config(file)
    assert cfg.sched.min_lr == 5e-7 and cfg.model.overrides["layer_norm_eps"] == 1e-6
    # An int where a float is meant is a float.
    weight_decay = load_config(None, ["optim.weight_decay=0"]).optim.weight_decay
    assert weight_decay == 0.0 and isinstance(weight_decay, float)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.epochs=2.9", "train.epochs must be an integer, got 2.9"),
        ("train.epochs=null", "train.epochs must be an integer, got None"),
        ('sched.cooldown_epochs="1"', "sched.cooldown_epochs must be an integer, got '1'"),
        ('sched.warmup_epochs="1"', "sched.warmup_epochs must be a number, got '1'"),
        ("train.batch_size=true", "train.batch_size must be an integer, got True"),
        ("aug.mixup=null", "aug.mixup must be a number, got None"),
        ("aug.scale=0.5", "aug.scale must be a list of two numbers, got 0.5"),
        ("aug.scale=[0.9,0.1]", r"aug.scale must be \[low, high\] with low <= high"),
        ("optim.betas=0.9", "optim.betas must be a list of two numbers, got 0.9"),
        ("aug.label_smoothing=2", "aug.label_smoothing must be below 1.0, got 2"),
        ("model.overrides=5", "model.overrides must be a mapping of model config fields, got 5"),
        ("model.overrides.depth=[1]", "model.overrides .*depth"),
        ("train.amp=fp8", "train.amp must be one of none, bf16, fp16, got 'fp8'"),
        ("train=5", "config key 'train' in the command line is a section, not a value"),
        ("train.device=foo", "train.device='foo' is not a device"),
        ("optim.lr=[1", "override 'optim.lr=\\[1' is not valid YAML: .* at line 1, column 3"),
        ("sched.warmup_epochs=30", "sched.warmup_epochs=30.0 must be less than train.epochs"),
        ("optim.lr=-1", "optim.lr must be above 0.0, got -1"),
        ("optim.lr=.inf", "optim.lr must be a number or null, got inf"),
    ],
)
def test_bad_values_are_one_line_errors_at_load(
    override: str, message: str, capsys: pytest.CaptureFixture, tmp_path: Path
) -> None:
    import re

    with pytest.raises(ValueError, match=message):
        load_config(None, [override])
    # The same through the command line: one line, nothing written (the error comes before any work).
    err = _train_error(capsys, [f"train.output={tmp_path / 'run'}", override])
    assert re.search(message, err), err
    assert not (tmp_path / "run").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda_is_one_line(capsys: pytest.CaptureFixture) -> None:
    err = _train_error(capsys, ["train.device=cuda"])
    assert "train.device='cuda' but CUDA is not available" in err


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("train:\n  epochs: 3\ntrain:\n  batch_size: 8\n", "duplicate key 'train' at line 3, column 1"),
        ("train:\n  epochs: 3\n  epochs: 4\n", "duplicate key 'epochs' at line 3, column 3"),
        ("train:\n\tepochs: 3\n", "is not valid YAML: .*at line 2"),
        ("train:\n  epochs: 3\n batch_size: 4\n", "is not valid YAML: .*at line 3"),
        ("train: 5\n", "config key 'train' in .*c.yaml is a section"),
        ("model:\n  overrides: 5\n", "config key 'model.overrides' in .*c.yaml must be a mapping, got 5"),
        ("- 1\n- 2\n", "must hold a mapping of sections, not list"),
    ],
)
def test_bad_config_files_are_one_line_errors(
    text: str, message: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    import re

    file = tmp_path / "c.yaml"
    file.write_text(text)
    err = _train_error(capsys, ["--config", str(file)])
    assert re.search(message, err), err


def test_config_given_twice_is_an_error(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    first, second = tmp_path / "a.yaml", tmp_path / "b.yaml"
    first.write_text("train:\n  epochs: 3\n")
    second.write_text("train:\n  batch_size: 8\n")
    err = _train_error(capsys, ["--config", str(first), "--config", str(second)])
    assert "--config given 2 times" in err


def test_an_internal_bug_shows_its_traceback(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    import torchcvt.engine

    def broken(cfg: TrainConfig) -> dict:
        return {}["no such section"]

    monkeypatch.setattr(torchcvt.engine, "train", broken)
    assert main(["train", "train.epochs=3"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "KeyError: 'no such section'" in err
    assert "internal error: this is a bug in torchcvt" in err


@pytest.mark.parametrize("device", ["foo", "cuda"])
def test_eval_device_is_checked_first(device: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA")
    argv = ["eval", "--model", "cvt_digits", "--checkpoint", str(tmp_path / "x.pth"), "--data", str(tmp_path),
            "--device", device]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"torchcvt eval: error: device={device!r}") and "\n" not in err, err

"""Configs as weapons and as mistakes: bounded sizes checked before anything is allocated, YAML bombs and
YAML 1.1 number forms, files that are not files, and one-line messages that never print a value whole."""

from __future__ import annotations

import json
import os
import re
import socket
import stat
from pathlib import Path

import pytest
import torch
from torch.utils.data.distributed import DistributedSampler
from trainkit import digits_tree, tiny_overrides

from torchcvt.cli import main
from torchcvt.config import variant_config
from torchcvt.data import SeededSampler
from torchcvt.engine import load_config, train
from torchcvt.engine.state import read_training_state
from torchcvt.reports import FileResult, Prediction, format_table
from torchcvt.typed import read_yaml


def _bomb(levels: int = 6, width: int = 10) -> str:
    """A 'billion laughs' YAML value: width**levels strings from a few hundred bytes."""
    lines = [f"l0: &l0 [{', '.join(['lol'] * width)}]"]
    lines += [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * width)}]" for i in range(1, levels)]
    return "{" + ", ".join(lines) + "}"


def _one_line(capsys: pytest.CaptureFixture, argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err and len(err) < 500, err[:2000]
    return err


def test_yaml_alias_bombs_are_refused_before_they_expand(tmp_path: Path,
                                                         capsys: pytest.CaptureFixture) -> None:
    config = tmp_path / "bomb.yaml"
    config.write_text(f"model:\n  overrides: {{depth: {_bomb()}}}\n")
    err = _one_line(capsys, ["train", "--config", str(config), "--dry-run"])
    assert f"config file {config} is not valid YAML: more than 100000 values with aliases expanded" in err
    err = _one_line(capsys, ["train", "--dry-run", f"model.overrides.depth={_bomb()}"])
    assert "is not valid YAML: more than 100000 values with aliases expanded" in err
    with pytest.raises(ValueError, match="recursive alias"):
        read_yaml("a: &a [1, *a]", "test")


@pytest.mark.parametrize(("key", "value"), [
    ("aug.re_count", 1_000_000_000), ("aug.repeated_aug", 1_000_000_000), ("train.epochs", 10**9),
    ("train.batch_size", 10**9), ("data.workers", 100_000), ("train.seed", 2**32),
])
def test_counts_have_upper_bounds_naming_the_key(key: str, value: int) -> None:
    with pytest.raises(ValueError, match=rf"^{key} must be at most \d+, got {value}$"):
        load_config(None, [f"{key}={value}"])


@pytest.mark.parametrize(("fields", "words"), [
    ({"embed_dim": [1_000_000, 2_000_000, 4_000_000]}, "embed_dim must be at most 16384 in each stage"),
    ({"depth": [1, 1, 100_000_000]}, "depth must be at most 256 in each stage"),
    ({"embed_dim": [16384] * 3, "num_heads": [1] * 3, "depth": [256] * 3}, "billion weights; at most 10"),
    ({"img_size": 10**9}, "img_size must be at most 16384"),
])
def test_model_sizes_are_bounded_before_allocation(fields: dict, words: str) -> None:
    with pytest.raises(ValueError, match=words):
        variant_config("cvt_13", **fields)


def test_messages_never_print_a_value_whole(capsys: pytest.CaptureFixture) -> None:
    long = json.dumps(list(range(5_000)))
    err = _one_line(capsys, ["train", "--dry-run", f"train.epochs={long}"])
    assert "train.epochs must be an integer, got [0, 1, 2" in err
    err = _one_line(capsys, ["train", "--dry-run", f"model.overrides={{embed_dim: {long}}}"])
    assert "embed_dim" in err
    err = _one_line(capsys, ["train", "--dry-run", f"{'x' * 5_000}=1"])
    assert "unknown config key 'xxx" in err


def test_ablate_seeds_are_bounded(capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    err = _one_line(capsys, ["ablate", "--seeds", "1000000000", "--dry-run", "--output", str(tmp_path)])
    assert "--seeds must be 1 to 100, got 1000000000" in err
    assert not (tmp_path / "suite.json").exists()


def test_a_large_config_file_is_refused_unread(tmp_path: Path) -> None:
    config = tmp_path / "big.yaml"
    config.write_text("# padding\n" * 200_000)  # 2 MB of comments: a valid, empty config
    with pytest.raises(ValueError, match=rf"^config file {config} is larger than 1 MiB: not a config file$"):
        load_config(config)


def test_merge_keys_and_yaml_1_2_numbers(tmp_path: Path) -> None:
    assert read_yaml("base: &b {x: 1, y: 2}\nc: {<<: *b, y: 3}", "test") == {
        "base": {"x": 1, "y": 2}, "c": {"x": 1, "y": 3}}
    config = tmp_path / "merged.yaml"
    config.write_text("model:\n  name: cvt_digits\n  overrides:\n"
                      "    <<: {depth: [1, 1, 1], num_heads: [1, 1, 2]}\n    embed_dim: [16, 24, 32]\n"
                      "sched:\n  cooldown_epochs: 0\n  warmup_epochs: 1\ntrain:\n  epochs: 010\n")
    cfg = load_config(config)
    assert cfg.model.overrides == {"depth": [1, 1, 1], "num_heads": [1, 1, 2], "embed_dim": [16, 24, 32]}
    assert cfg.train.epochs == 10  # not octal 8
    with pytest.raises(ValueError, match=r"^train.epochs must be an integer, got '1:30'$"):
        load_config(None, ["train.epochs=1:30"])  # not base-60 90
    assert load_config(None, ["optim.lr=1e-3", "train.epochs=1_000"]).train.epochs == 1000


def _special_paths(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    fifo = tmp_path / "fifo.yaml"
    os.mkfifo(fifo)
    loop = tmp_path / "loop.yaml"
    loop.symlink_to(loop)
    null = tmp_path / "null"  # our own /dev/null: the shared one may have been replaced by a file
    os.mknod(null, 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    listening = socket.socket(socket.AF_UNIX)
    listening.bind(str(tmp_path / "sock"))
    listening.close()
    return {"folder": (tmp_path, "is a folder, not a file"),
            "fifo": (fifo, "is a FIFO (named pipe), not a file"),
            "null": (null, "is a device, not a file"),
            "zero": (Path("/dev/zero"), "is a device, not a file"),
            "loop": (loop, "is a symbolic link loop"),
            "socket": (tmp_path / "sock", "is a socket, not a file"),
            "missing": (tmp_path / "none.yaml", "does not exist")}


def test_config_and_resume_paths_that_are_not_files_say_what_they_are(tmp_path: Path) -> None:
    for path, words in _special_paths(tmp_path).values():
        with pytest.raises(ValueError, match=re.escape(f"config file {path} {words}")):
            load_config(path)
        if path != tmp_path:  # a folder is a run folder to --resume (its last.pth)
            with pytest.raises(ValueError, match=re.escape(f"checkpoint {path} {words}")):
                read_training_state(path)
    latin = tmp_path / "latin.yaml"
    latin.write_bytes("train:\n  output: caf\xe9\n".encode("latin-1"))
    with pytest.raises(ValueError, match=rf"^config file {latin} is not UTF-8 text \(byte 20 is not\)$"):
        load_config(latin)


def test_large_seeds_augment_within_int64() -> None:
    assert load_config(None, ["train.seed=4294967295"]).train.seed == 2**32 - 1
    ordered = DistributedSampler(range(4), num_replicas=1, rank=0, shuffle=False)
    sampler = SeededSampler(ordered, seed=2**32 - 1)
    sampler.set_epoch(7)
    seeds = [seed for _, seed in sampler]
    assert len(set(seeds)) == 4 and torch.tensor(seeds).dtype == torch.int64


def test_global_batch_errors_name_train_global_batch(tmp_path: Path) -> None:
    data = digits_tree(tmp_path / "data", classes=2, train_per_class=4, val_per_class=1)
    overrides = tiny_overrides(data, tmp_path / "run", **{"train.global_batch": 17})
    with pytest.raises(ValueError, match=r"^train.global_batch=17 \(17 per process\) is larger than the 8"):
        train(load_config(None, overrides))


def test_conflicting_and_empty_arguments(capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    err = _one_line(capsys, ["train", "--no-resume", "--resume", str(tmp_path / "last.pth"), "--dry-run"])
    assert "--no-resume and --resume both given" in err
    err = _one_line(capsys, ["train", "--pretrained", "", "--dry-run"])
    assert '--pretrained "" names no weights' in err
    for launcher, words in [("", '--launcher "" names no command'), ("'", "is not a command line")]:
        err = _one_line(capsys, ["ablate", "--launcher", launcher, "--output", str(tmp_path / "suite")])
        assert words in err


def test_predict_table_keeps_one_line_per_prediction() -> None:
    results = [FileResult("a\nb.png", [Prediction(0, "tabby\ncat", 0.75), Prediction(1, "dog\tx", 0.25)])]
    table = format_table(results).splitlines()
    assert len(table) == 3
    assert table[1].startswith("a\\nb.png") and table[1].endswith("tabby\\ncat (0)")
    assert table[2].endswith("dog\\tx (1)")

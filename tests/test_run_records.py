"""Typed run records: a run folder written by the code before them (tests/data/run-v1) still loads, resumes
and exports; EMA weights are reachable from every command and create_model(use_ema=True)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from trainkit import digits_tree, tiny_overrides

import torchcvt
from torchcvt.cli import main
from torchcvt.config import CvtConfig
from torchcvt.engine import load_config, read_training_state, train
from torchcvt.model import CvT
from torchcvt.runrecord import CHECKPOINT_KIND, RunSummary, TrainingCheckpoint

OLD_RUN = Path(__file__).parent / "data" / "run-v1"
OLD_MODEL = {"embed_dim": [8, 8, 16], "num_heads": [1, 1, 2], "depth": [1, 1, 1]}


def _raw(path: Path = OLD_RUN / "last.pth") -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def _model_from_raw(weights: str) -> CvT:
    """The model an old file holds, built from its own fields by torch and CvT alone (no torchcvt reader)."""
    raw = _raw()
    model = CvT(CvtConfig(**raw["config"])).eval()
    model.load_state_dict(raw[weights])
    return model


def _images(seed: int = 0) -> torch.Tensor:
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def test_the_fixture_is_the_old_format() -> None:
    raw = _raw()
    assert raw["format_version"] == 1 and "record" not in raw
    assert raw["ema"] is not None and raw["train_config"]["train"]["ema"] is True
    # EMA weights that differ from the plain ones, or no test below could tell them apart.
    assert any(not torch.equal(raw["ema"][key], value) for key, value in raw["state_dict"].items()
               if value.is_floating_point())


def test_an_old_checkpoint_loads_with_its_plain_and_its_ema_weights() -> None:
    x = _images()
    with torch.no_grad():
        plain, ema = _model_from_raw("state_dict")(x), _model_from_raw("ema")(x)
        assert (plain - ema).abs().max() > 1e-4
        model = torchcvt.create_model(None, checkpoint=OLD_RUN / "last.pth").eval()
        torch.testing.assert_close(model(x), plain, rtol=0, atol=0)
        averaged = torchcvt.create_model(None, checkpoint=OLD_RUN / "last.pth", use_ema=True).eval()
        torch.testing.assert_close(averaged(x), ema, rtol=0, atol=0)
    assert model.pretrained_cfg["label_names"] == ("0", "1", "2")
    record = read_training_state(OLD_RUN / "last.pth")
    assert isinstance(record, TrainingCheckpoint) and (record.epoch, record.global_step) == (1, 3)


def test_an_old_run_resumes_and_writes_the_new_records(tmp_path, one_thread) -> None:
    data = digits_tree(tmp_path / "data", classes=3, train_per_class=4, val_per_class=2)
    run = tmp_path / "run"
    shutil.copytree(OLD_RUN, run)
    settings = {"model.overrides": OLD_MODEL, "train.epochs": 2, "train.ema": True, "train.ema_decay": 0.5,
                "train.batch_size": 4}
    overrides = tiny_overrides(data, run, **settings)
    summary = train(load_config(None, overrides))
    assert (summary["epochs"], summary["steps"]) == (2, 6)  # 3 steps of the old run, 3 more
    raw = _raw(run / "last.pth")
    assert (raw["record"], raw["format_version"], raw["epoch"]) == (CHECKPOINT_KIND, 2, 2)
    written = RunSummary.read(run / "summary.json")
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    last_val = [record for record in metrics if record["kind"] == "val"][-1]
    assert (written.ema_final_val_top1, written.ema_final_val_top5) == (last_val["ema_top1"],
                                                                        last_val["ema_top5"])
    assert written.final_val_top1 == last_val["top1"]


def test_an_old_checkpoint_exports(tmp_path, capsys) -> None:
    x = _images(1)
    with torch.no_grad():
        plain, ema = _model_from_raw("state_dict")(x), _model_from_raw("ema")(x)
    for flag, expected in (([], plain), (["--ema"], ema)):
        script = tmp_path / f"model{len(flag)}.pt"
        assert main(["export", "--checkpoint", str(OLD_RUN / "last.pth"), "--format", "torchscript",
                     "-o", str(script), *flag]) == 0
        with torch.no_grad():
            torch.testing.assert_close(torch.jit.load(script)(x), expected, rtol=1e-5, atol=1e-5)
        converted = tmp_path / f"model{len(flag)}.safetensors"
        assert main(["convert", str(OLD_RUN / "last.pth"), str(converted), "--to", "torchcvt", *flag]) == 0
        with torch.no_grad():
            model = torchcvt.create_model(None, checkpoint=converted).eval()
            torch.testing.assert_close(model(x), expected, rtol=0, atol=0)
    capsys.readouterr()


def test_ema_on_predict_eval_and_embed_uses_the_ema_weights(tmp_path, capsys) -> None:
    """Each command with --ema gives what it gives for the EMA weights alone (converted above and checked
    against the file's own tensors), and not what it gives for the plain ones."""
    data = digits_tree(tmp_path / "data", classes=3, train_per_class=1, val_per_class=2)
    old = str(OLD_RUN / "last.pth")
    ema_only = tmp_path / "ema.safetensors"
    assert main(["convert", old, str(ema_only), "--to", "torchcvt", "--ema"]) == 0

    def outputs(checkpoint: str, *flag: str) -> tuple:
        tag = f"{Path(checkpoint).stem}{''.join(flag)}"
        assert main(["predict", "--checkpoint", checkpoint, *flag, "--workers", "0", "--quiet", "--json",
                     str(tmp_path / f"{tag}.json"), str(data / "val")]) == 0
        predictions = [r["predictions"] for r in json.loads((tmp_path / f"{tag}.json").read_text())]
        assert main(["embed", "--checkpoint", checkpoint, *flag, "--workers", "0", "--quiet", "-o",
                     str(tmp_path / f"{tag}.npy"), str(data / "val")]) == 0
        import numpy as np

        features = np.load(tmp_path / f"{tag}.npy")
        assert main(["eval", "--checkpoint", checkpoint, *flag, "--workers", "0", "--data", str(data / "val"),
                     "--output", str(tmp_path / tag)]) == 0
        report = json.loads(next((tmp_path / tag).glob("eval_*.json")).read_text())
        assert report["weights"] == ("ema" if flag else "plain")
        loss = report["loss"]
        return predictions, features, loss

    selected, alone, plain = outputs(old, "--ema"), outputs(str(ema_only)), outputs(old)
    assert selected[0] == alone[0] and selected[2] == alone[2]
    assert (selected[1] == alone[1]).all()
    assert selected[0] != plain[0] and selected[2] != plain[2]
    capsys.readouterr()


def test_ema_asked_of_weights_without_it_is_one_line(tmp_path, capsys) -> None:
    plain = tmp_path / "plain.safetensors"
    assert main(["convert", str(OLD_RUN / "last.pth"), str(plain), "--to", "torchcvt"]) == 0
    with pytest.raises(ValueError, match=r"checkpoint .*plain.safetensors holds no EMA weights"):
        torchcvt.create_model(None, checkpoint=plain, use_ema=True)
    with pytest.raises(ValueError, match="use_ema=True selects a checkpoint's EMA weights: pass checkpoint="):
        torchcvt.create_model("cvt_digits", use_ema=True)
    capsys.readouterr()
    for argv in (["export", "--checkpoint", str(plain), "--format", "torchscript", "-o",
                  str(tmp_path / "x.pt")],
                 ["convert", str(plain), str(tmp_path / "y.safetensors"), "--to", "torchcvt"],
                 ["eval", "--checkpoint", str(plain), "--data", str(tmp_path)]):
        assert main([*argv, "--ema"]) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and err.endswith("use its weights without --ema (use_ema)"), err
    assert main(["predict", "--model", "cvt_digits", "--pretrained", "--ema", str(tmp_path)]) == 2
    assert "--ema selects a checkpoint's EMA weights: give --checkpoint" in capsys.readouterr().err


def test_a_damaged_summary_is_one_line(tmp_path) -> None:
    path = tmp_path / "summary.json"
    path.write_text('{"model": "cvt_digits", "best_val_top1": 0.')
    with pytest.raises(ValueError, match=r"run summary .*summary.json is damaged"):
        RunSummary.read(path)
    old = RunSummary.read(OLD_RUN / "summary.json")  # written before summaries had a format
    assert old.ema_final_val_top1 is None and old.final_val_top1 == pytest.approx(1 / 3)

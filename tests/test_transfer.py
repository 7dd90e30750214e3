"""`torchcvt transfer`: the Table 4 dry run offline, the offline proof end to end at a tiny budget (the
selection phase never reads the test split, the final runs train at the chosen rate and are scored once on
the test split), the rate choice, and the report's paper figures."""

from __future__ import annotations

import json

import pytest

from torchcvt import hfdata
from torchcvt.cli import main
from torchcvt.engine import read_training_state
from torchcvt.transfer import TABLE, table_plan, write_report
from torchcvt.transfer.plan import _test_once, chosen_lr, final_name, selection_name

pytest.importorskip("datasets")

TINY = '{"embed_dim": [16, 24, 32], "num_heads": [1, 1, 2], "depth": [1, 1, 1]}'
# The paper's Table 4 (CvT-13 row) and ViT's steps (Table 4 of ViT; vit_jax/configs/common.py).
PAPER_CVT13 = {"cifar10": 98.83, "cifar100": 91.11, "pets": 93.25, "flowers102": 99.50}
VIT_STEPS = {"cifar10": 10_000, "cifar100": 10_000, "pets": 500, "flowers102": 500}


def test_table4_dry_run_is_offline_and_ends_with_the_runs_as_json(offline_home, capsys, tmp_path) -> None:
    assert main(["transfer", "--table4", "--dry-run", "--output", str(tmp_path / "suite")]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    runs = json.loads(out[-1])["runs"]
    # 3 weights x 4 data sets x (4 rates + 1 final run).
    assert len(runs) == 60 and not (tmp_path / "suite").exists()
    for run in runs:
        protocol = (run["global_batch"], run["optimizer"], run["nesterov"], run["head_init"])
        assert protocol == (512, "sgd", False, "zero")
        assert run["steps"] == VIT_STEPS[run["dataset"]] and run["image_size"] == [384, 384]
        if run["phase"] == "selection":
            assert run["lr"] in (0.001, 0.003, 0.01, 0.03)
        else:
            assert run["lr"] == "chosen on the development split"
    cifar = [run for run in runs if run["dataset"] == "cifar10" and run["weights"].startswith("cvt_13")]
    assert [(r["phase"], r["train_images"], r["dev_images"], r["test_images"]) for r in cifar] == [
        *[("selection", 49_000, 1_000, None)] * 4, ("final", 50_000, 1_000, 10_000)]
    pets = next(run for run in runs if run["dataset"] == "pets")
    assert (pets["train_images"], pets["dev_images"]) == (3_680 - 368, 368)


def test_rate_choice() -> None:
    assert chosen_lr({0.01: 80.0, 0.03: 90.0, 0.1: 90.0}) == 0.03  # the smaller on a tie
    assert chosen_lr({0.01: 80.0, 0.03: None}) is None  # not decided while a rate runs
    assert chosen_lr({0.01: 80.0, 0.03: "diverged"}) == 0.01
    assert chosen_lr({0.01: "diverged"}) is None


def _summary(folder, top1: float) -> dict:
    """A summary.json as the engine writes it (every RunSummary field) with this final top-1."""
    return {"model": "cvt_13", "best_val_top1": top1, "best_val_top5": 1.0, "final_val_top1": top1,
            "final_val_top5": 1.0, "final_val_loss": 0.5, "epochs": 1, "steps": 10, "wall_seconds": 1.0,
            "images_per_second": 10.0, "world_size": 1, "skipped_images": 0, "left_out_images": 0,
            **{key: str(folder / name) for key, name in (("checkpoint", "best.pth"),
               ("last_checkpoint", "last.pth"), ("curves", "curves.png"), ("metrics", "metrics.jsonl"),
               ("summary", "summary.json"))}}


def test_report_puts_the_papers_figure_beside_each_row(tmp_path) -> None:
    plan = table_plan(["cvt_13_384.ms_in22k_ft_in1k"], list(TABLE), (0.01, 0.03), [0, 1], [])
    root = tmp_path / "suite"
    for pair in plan.pairs:  # finished runs as the engine and the final evaluation leave them
        for lr, top1 in ((0.01, 0.9), (0.03, 0.95)):
            folder = root / "runs" / selection_name(pair, lr)
            folder.mkdir(parents=True)
            (folder / "summary.json").write_text(json.dumps(_summary(folder, top1)))
        for seed, top1 in ((0, 0.97), (1, 0.99)):
            folder = root / "runs" / final_name(pair, seed)
            folder.mkdir(parents=True)
            (folder / "test.json").write_text(json.dumps({"top1": top1}))
    write_report(root, plan)
    lines = (root / "report.md").read_text().splitlines()
    for name, figure in PAPER_CVT13.items():
        row = next(line for line in lines if line.startswith(f"| CvT-13 | {TABLE[name].title} "))
        assert row.endswith(f"| 90.00 | 95.00 | 0.03 | 98.00 ± 1.41 (97.00, 99.00) | {figure:.2f} |"), row
    data = json.loads((root / "transfer.json").read_text())
    assert {row["dataset"]: row["paper_top1"] for row in data["rows"]} == PAPER_CVT13
    assert (root / "transfer.png").stat().st_size > 0


def test_proof_selects_on_dev_only_and_trains_the_final_run_at_the_chosen_rate(tmp_path, monkeypatch,
                                                                                one_thread) -> None:
    opened: list[str] = []
    original_init, original_eval = hfdata.HFImages.__init__, _test_once.__call__

    def recording_init(self, source, *args, **kwargs):
        opened.append(str(source))
        original_init(self, source, *args, **kwargs)

    def recording_eval(self, folder):
        opened.append("evaluation starts")
        original_eval(self, folder)
        opened.append("evaluation ends")

    monkeypatch.setattr(hfdata.HFImages, "__init__", recording_init)
    monkeypatch.setattr(_test_once, "__call__", recording_eval)
    root = tmp_path / "suite"
    argv = ["transfer", "--output", str(root), "--grid", "0.03", "0.1", "--steps", "3",
            "--pretrain-epochs", "1", f"model.overrides={TINY}", "train.quiet=true"]
    assert main(argv) == 0
    # The test split is opened only inside the final runs' one evaluation, never by a training run.
    inside = False
    for entry in opened:
        inside = {"evaluation starts": True, "evaluation ends": False}.get(entry, inside)
        assert "#test" not in entry or inside, opened
    assert opened.count("evaluation starts") == 1
    runs = root / "runs" / "digits-0-4" / "digits5-9"
    for folder in runs.iterdir():
        config = read_training_state(folder / "last.pth").train_config
        assert "#test" not in config["data"]["val"] and "[dev:0.1:0]" in config["data"]["val"]
        assert ("[rest:0.1:0]" in config["data"]["train"]) == folder.name.startswith("select")
    data = json.loads((root / "transfer.json").read_text())
    row = data["rows"][0]
    scores = row["dev_top1"]
    assert set(scores) == {"0.03", "0.1"} and row["chosen_lr"] == chosen_lr({0.03: scores["0.03"],
                                                                             0.1: scores["0.1"]})
    final = read_training_state(runs / "final-seed0" / "last.pth").train_config
    assert final["optim"]["lr"] == row["chosen_lr"] and final["train"]["steps"] == 3
    test = json.loads((runs / "final-seed0" / "test.json").read_text())
    assert test["images"] == 181 and row["test_top1"]["0"] == pytest.approx(100 * test["top1"])
    assert "| cvt_digits pre-trained on digits 0-4 | digits 5-9 (10%) |" in (root / "report.md").read_text()
    # A rerun finds everything finished and trains nothing.
    assert main(argv) == 0
    events = [json.loads(line) for line in (root / "events.jsonl").read_text().splitlines()]
    assert [event["event"] for event in events].count("start") == 4  # pre-training, 2 rates, final


def test_unknown_dataset_is_one_line(capsys) -> None:
    assert main(["transfer", "--dataset", "imagenet", "--dry-run"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err
    assert "--dataset 'imagenet' is neither one of cifar10, cifar100, pets, flowers102" in err

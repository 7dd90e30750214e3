"""The paper's transfer experiment (Table 4) as one resumable, shardable suite, by ViT's protocol.

`table_plan` (released weights x the table's data sets) or `proof_plan` (the offline proof) make the plan,
`run_suite` trains one worker's share on the shared suite machinery (torchcvt.suite) and `write_report`
rebuilds report.md, transfer.json and transfer.png from whatever has finished.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..suite import Job, WorkerTally, events, is_claimed, open_suite, override, run_jobs, shard_runs
from .datasets import TABLE, TABLE4_WEIGHTS, TransferData, find_dataset
from .plan import GRID, Pair, StartingWeights, TransferPlan, final_jobs, final_name, selection_jobs
from .proof import PROOF_BATCH, PROOF_GRID, PROOF_LABEL, PROOF_STEPS, PROOF_VALUES, budget, pretrain_job
from .proof import proof_data as _proof_data
from .report import collect, write_report

logger = logging.getLogger("torchcvt.transfer")

__all__ = ["GRID", "TABLE", "TABLE4_WEIGHTS", "TransferData", "TransferPlan", "collect", "dry_run_rows",
           "format_dry_run", "open_transfer_suite", "proof_plan", "run_suite", "table_plan", "write_report"]

# How long a worker waits between looks at selection runs other workers are still training.
WAIT_SECONDS = 30


def table_plan(tags: Sequence[str], names: Sequence[str], grid: Sequence[float], seeds: Sequence[int],
               overrides: Sequence[str], config: str | None = None, steps: int | None = None,
               dev_fraction: float = 0.1) -> TransferPlan:
    """Released weights x data sets (the table's names, or hf: ids and folders with --config)."""
    weights = [StartingWeights.released(tag) for tag in tags]
    data = [find_dataset(name, dev_fraction, config) for name in names]
    base = (*overrides, *(budget(steps, 512) if steps else ()))
    return TransferPlan(tuple(Pair(w, d) for w in weights for d in data), tuple(grid), tuple(seeds), base,
                        config)


def proof_plan(root: Path, grid: Sequence[float] | None, seeds: Sequence[int], overrides: Sequence[str],
               steps: int | None = None, pretrain_epochs: int | None = None) -> tuple[TransferPlan, Job]:
    """The offline proof's plan and its pre-training run (both written under root)."""
    pretrain = pretrain_job(root, list(overrides), pretrain_epochs)
    data = _proof_data(root / "data")
    weights = StartingWeights.file(pretrain.folder / "last.pth", "digits-0-4", PROOF_LABEL, "cvt_digits")
    values = [override(key, value) for key, value in PROOF_VALUES.items()]
    base = (*values, *budget(steps or PROOF_STEPS, PROOF_BATCH), *overrides)
    plan = TransferPlan((Pair(weights, data),), tuple(grid or PROOF_GRID), tuple(seeds), base, workers=0)
    return plan, pretrain


def _recipe_hash(path: str | None) -> str | None:
    return None if path is None else hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def open_transfer_suite(root: Path, plan: TransferPlan) -> dict[str, Any]:
    """suite.json: the recipe (overrides, grid, recipe files) and data sources one suite folder keeps."""
    identity = {
        "recipe": {"overrides": list(plan.base), "grid": list(plan.grid),
                   "selection_seed": plan.selection_seed(),
                   "recipes": {pair.data.name: _recipe_hash(plan.recipe(pair)) for pair in plan.pairs}},
        "data": {pair.data.name: {"source": pair.data.source, "train": list(pair.data.train_splits),
                                  "test": pair.data.test_split, "dev_fraction": pair.data.dev_fraction}
                 for pair in plan.pairs},
    }
    lists = {"weights": [pair.weights.name for pair in plan.pairs],
             "datasets": [pair.data.name for pair in plan.pairs], "seeds": list(plan.seeds)}
    return open_suite(root, identity, lists, what="transfer suite")


def run_suite(plan: TransferPlan, root: Path, shard: tuple[int, int] = (0, 1), launcher: str | None = None,
              pretrain: Job | None = None) -> WorkerTally:
    """This worker's share: the pre-training (the proof's), the selection runs, then, once every rate of a
    pair is decided (training any selection run no worker holds, waiting for those others train), the
    final runs at the chosen rates with their one test evaluation. The report is rebuilt after each run."""
    def report() -> None:
        write_report(root, plan)

    progress = WorkerTally()
    if pretrain is not None:
        _until_finished([pretrain], root, launcher, progress, report)
    selection = selection_jobs(plan, root)
    progress.add(run_jobs(selection, root, shard, launcher, report))
    _until_finished(selection, root, launcher, progress, report)
    finals, waiting = final_jobs(plan, root)
    for pair in waiting:
        logger.warning(f"{pair.slug}: every learning rate diverged; no final run")
    mine = set(shard_runs([final_name(pair, seed) for pair in plan.pairs for seed in plan.seeds], *shard))
    progress.add(run_jobs([job for job in finals if job.name in mine], root, (0, 1), launcher, report))
    report()
    return progress


def _until_finished(jobs: Sequence[Job], root: Path, launcher: str | None, progress: WorkerTally,
                    report: Any) -> None:
    """Train whichever of the jobs no worker holds, and wait while other workers train the rest."""
    while True:
        # A diverged run is not retried.
        failed = {event["run"] for event in events(root) if event["event"] == "failed"}
        pending = [job for job in jobs if not job.finished and job.name not in failed]
        helped = run_jobs(pending, root, (0, 1), launcher, report)
        progress.trained += helped.trained
        progress.failed += helped.failed
        held = [job.name for job in pending if not job.finished and is_claimed(root, job.name)]
        if not held:
            return
        logger.info(f"waiting for {len(held)} run(s) other workers train: {', '.join(held[:3])}"
                    + (" ..." if len(held) > 3 else ""))
        time.sleep(WAIT_SECONDS)


def dry_run_rows(plan: TransferPlan, root: Path) -> list[dict[str, Any]]:
    """Every run the suite would train, with what it trains (resolved as `torchcvt train` resolves it)."""
    from ..config import get_variant
    from ..engine.optim import is_nesterov
    from ..engine.resolve import resolve_config

    rows = []
    for pair in plan.pairs:
        data = pair.data
        phases = [("selection", lr, plan.selection_seed()) for lr in plan.grid]
        phases += [("final", None, seed) for seed in plan.seeds]
        for phase, lr, seed in phases:
            values = plan.run_values(pair, "select" if lr else "final", lr or plan.grid[0], seed, root / "x")
            cfg = resolve_config(plan.recipe(pair), list(values)).config
            train = data.train_images if phase == "final" or data.train_images is None else (
                data.train_images - data.dev_images)
            rows.append({
                "weights": pair.weights.name, "dataset": data.name, "phase": phase, "seed": seed,
                "lr": lr if lr is not None else "chosen on the development split",
                "steps": cfg.train.steps, "global_batch": cfg.train.global_batch,
                "optimizer": cfg.optim.opt, "nesterov": is_nesterov(cfg.optim.opt),
                "head_init": cfg.model.head_init,
                "image_size": list(get_variant(cfg.model.name).input_size[1:]),
                "train_images": train, "dev_images": data.dev_images,
                "test_images": data.test_images if phase == "final" else None,
            })
    return rows


def format_dry_run(rows: list[dict[str, Any]]) -> str:
    """The runs as a table, one line each."""
    lines = [f"{len(rows)} runs", f"{'weights':<34}{'dataset':<12}{'phase':<10}{'lr':>8}{'steps':>7}"
             f"{'batch':>6}  {'optimizer':<17}{'head':<6}{'size':<9}{'train':>6}{'dev':>7}{'test':>7}"]
    for row in rows:
        lr = f"{row['lr']:g}" if isinstance(row["lr"], float) else "chosen"
        size = "x".join(map(str, row["image_size"]))
        optimizer = row["optimizer"] + (" (nesterov)" if row["nesterov"] else "")
        counts = [row[key] if row[key] is not None else "-"
                  for key in ("train_images", "dev_images", "test_images")]
        lines.append(f"{row['weights'][:33]:<34}{row['dataset']:<12}{row['phase']:<10}{lr:>8}{row['steps']:>7}"
                     f"{row['global_batch']:>6}  {optimizer:<17}{row['head_init']:<6}{size:<9}"
                     f"{counts[0]:>6}{counts[1]:>7}{counts[2]:>7}")
    return "\n".join(lines)


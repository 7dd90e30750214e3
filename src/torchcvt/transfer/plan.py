"""The transfer suite's runs, by ViT's protocol: for each weights x data set, a selection run per learning
rate (trained on the training split less a held-out development split, scored on the development split
only), then final runs at the chosen rate (the whole training split, the last weights scored once on the
test split: test.json). Every run is an ordinary `torchcvt train` given as KEY=VALUE strings."""

from __future__ import annotations

import json
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..suite import Job, events, override, read_summary
from .datasets import TABLE4_WEIGHTS, TransferData

GRID = (0.001, 0.003, 0.01, 0.03)  # ViT's sweep (Appendix B.1.1)


@dataclass(frozen=True)
class StartingWeights:
    """Starting weights: a released tag, or a checkpoint file (the offline proof's)."""

    name: str
    label: str  # the paper's model name (CvT-13) or what the weights are
    architecture: str
    values: tuple[str, ...]  # KEY=VALUE strings that start a run from them

    @classmethod
    def released(cls, tag: str) -> StartingWeights:
        from ..engine.starting import tag_architecture

        architecture = tag_architecture(tag, "--pretrained")
        return cls(tag, TABLE4_WEIGHTS.get(tag, tag), architecture,
                   (override("model.pretrained", tag), override("model.name", architecture)))

    @classmethod
    def file(cls, path: Path, name: str, label: str, architecture: str) -> StartingWeights:
        return cls(name, label, architecture,
                   (override("model.checkpoint", str(path)), override("model.name", architecture)))


@dataclass(frozen=True)
class Pair:
    weights: StartingWeights
    data: TransferData

    @property
    def slug(self) -> str:
        return f"{self.weights.name.replace('/', '_')}/{self.data.name}"


@dataclass(frozen=True)
class TransferPlan:
    pairs: tuple[Pair, ...]
    grid: tuple[float, ...]
    seeds: tuple[int, ...]
    base: tuple[str, ...]  # KEY=VALUE strings every run starts from (the user's overrides)
    config: str | None = None  # --config: one recipe for every data set instead of each one's own
    workers: int = 2  # data-loader workers of the one test evaluation of each final run

    def recipe(self, pair: Pair) -> str | None:
        return self.config or pair.data.recipe_file()

    def selection_seed(self) -> int:
        return self.seeds[0]

    def run_values(self, pair: Pair, phase: str, lr: float, seed: int, folder: Path) -> tuple[str, ...]:
        """A run's KEY=VALUE strings: the final run trains on the whole training split and monitors the
        (seen) development part; a selection run trains without it and is scored on it. Neither reads the
        test split."""
        data = pair.data
        train = data.split(None if phase == "final" else "rest", self.selection_seed())
        return (*self.base, *pair.weights.values, override("data.train", train),
                override("data.val", data.split("dev", self.selection_seed())), override("optim.lr", lr),
                override("train.seed", seed), override("train.output", str(folder)))


def selection_name(pair: Pair, lr: float) -> str:
    return f"{pair.slug}/select-lr{lr:g}"


def final_name(pair: Pair, seed: int) -> str:
    return f"{pair.slug}/final-seed{seed}"


def selection_jobs(plan: TransferPlan, root: Path) -> list[Job]:
    jobs = []
    for pair in plan.pairs:
        for lr in plan.grid:
            name = selection_name(pair, lr)
            folder = root / "runs" / name
            jobs.append(Job(name, folder, plan.recipe(pair),
                            plan.run_values(pair, "select", lr, plan.selection_seed(), folder),
                            note=f"selection, lr {lr:g}, scored on the development split"))
    return jobs


def dev_scores(root: Path, pair: Pair, grid: Sequence[float]) -> dict[float, float | str | None]:
    """Each rate's development top-1 (%) of the last weights; 'diverged' for a run that failed; None while
    it has not finished."""
    failed = {event["run"] for event in events(root) if event["event"] == "failed"}
    scores: dict[float, float | str | None] = {}
    for lr in grid:
        name = selection_name(pair, lr)
        summary = read_summary(root / "runs" / name)
        scores[lr] = (100.0 * summary.final_val_top1 if summary is not None
                      else "diverged" if name in failed else None)
    return scores


def chosen_lr(scores: dict[float, float | str | None]) -> float | None:
    """The rate of the best development top-1 (the smaller rate on a tie); None until every rate is
    decided (finished or diverged), or when all diverged."""
    if any(score is None for score in scores.values()):
        return None
    finished = {lr: score for lr, score in scores.items() if isinstance(score, float)}
    if not finished:
        return None
    best = max(finished.values())
    return min(lr for lr, score in finished.items() if score == best)


def final_jobs(plan: TransferPlan, root: Path) -> tuple[list[Job], list[Pair]]:
    """The final runs of every pair whose rate is chosen, and the pairs still waiting for their selection."""
    jobs, waiting = [], []
    for pair in plan.pairs:
        lr = chosen_lr(dev_scores(root, pair, plan.grid))
        if lr is None:
            waiting.append(pair)
            continue
        for seed in plan.seeds:
            name = final_name(pair, seed)
            folder = root / "runs" / name
            jobs.append(Job(name, folder, plan.recipe(pair), plan.run_values(pair, "final", lr, seed, folder),
                            note=f"final, chosen lr {lr:g}, then the test split once",
                            finish=_test_once(pair, plan.workers), done_file="test.json"))
    return jobs, waiting


class _test_once:
    """A final run's last step: its last weights scored once on the test split, written as test.json."""

    def __init__(self, pair: Pair, workers: int):
        self.pair, self.workers = pair, workers

    def __call__(self, folder: Path) -> None:
        from ..engine.evaluate import evaluate_checkpoint
        from ..files import write_json

        split = self.pair.data.split(test=True)
        report = evaluate_checkpoint(self.pair.weights.architecture, folder / "last.pth", split,
                                     output=folder / "test-eval", workers=self.workers)
        write_json(folder / "test.json", {"split": split, "top1": report["top1"], "images": report["images"],
                                          "weights": "last.pth"})


def test_scores(root: Path, pair: Pair, seeds: Sequence[int]) -> dict[int, float | None]:
    scores = {}
    for seed in seeds:
        path = root / "runs" / final_name(pair, seed) / "test.json"
        scores[seed] = 100.0 * json.loads(path.read_text())["top1"] if path.is_file() else None
    return scores


def spread(values: Sequence[float]) -> float | None:
    return statistics.stdev(values) if len(values) > 1 else None

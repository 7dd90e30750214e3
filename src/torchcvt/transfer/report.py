"""The transfer suite's report from whatever has finished: report.md, transfer.json and transfer.png."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from ..files import write_figure
from ..suite import write_suite_report
from .plan import TransferPlan, chosen_lr, dev_scores, spread, test_scores

RULE = ("ViT's protocol (Appendix B.1.1): each learning rate trains on the training split less a seeded, "
        "class-stratified development split and is scored there (top-1 of the last weights); the best rate "
        "(the smaller on a tie) trains on the whole training split, and its last weights are scored once on "
        "the test split. No checkpoint is chosen on the test split. Test top-1 is the mean ± standard "
        "deviation over the seeds (each seed's value in brackets).")


def collect(root: Path, plan: TransferPlan) -> dict[str, Any]:
    """Everything the report shows, one row per weights x data set."""
    rows = []
    for pair in plan.pairs:
        scores = dev_scores(root, pair, plan.grid)
        tests = test_scores(root, pair, plan.seeds)
        values = [value for value in tests.values() if value is not None]
        rows.append({
            "weights": pair.weights.name, "model": pair.weights.label, "dataset": pair.data.name,
            "title": pair.data.title, "dev_fraction": pair.data.dev_fraction,
            "dev_top1": {f"{lr:g}": score for lr, score in scores.items()},
            "chosen_lr": chosen_lr(scores),
            "test_top1": {str(seed): value for seed, value in tests.items()},
            "test_top1_mean": statistics.mean(values) if values else None,
            "test_top1_std": spread(values),
            "paper_top1": pair.data.paper.get(pair.weights.label),
        })
    return {"grid": list(plan.grid), "seeds": list(plan.seeds), "selection_seed": plan.selection_seed(),
            "overrides": list(plan.base), "rule": RULE, "rows": rows}


def _cell(value: Any, digits: int = 2) -> str:
    return "-" if value is None else value if isinstance(value, str) else f"{value:.{digits}f}"


def _test_cell(row: dict[str, Any]) -> str:
    values = [value for value in row["test_top1"].values() if value is not None]
    if not values:
        return "not finished"
    spread = f" ± {row['test_top1_std']:.2f}" if row["test_top1_std"] is not None else ""
    each = ", ".join(_cell(value) for value in row["test_top1"].values())
    return f"{row['test_top1_mean']:.2f}{spread} ({each})"


def markdown(data: dict[str, Any]) -> str:
    grid = [f"{lr:g}" for lr in data["grid"]]
    lines = ["# CvT transfer suite (Table 4)", "", data["rule"], "",
             f"Seeds {', '.join(map(str, data['seeds']))}; rates chosen with seed {data['selection_seed']}."
             + (f" Overrides for every run: `{' '.join(data['overrides'])}`." if data["overrides"] else ""),
             "", "| weights | data set (dev held out) | " + " | ".join(f"dev top-1, lr {lr}" for lr in grid)
             + " | chosen lr | test top-1 (%) | paper (Table 4) |",
             "|---|---|" + "---|" * len(grid) + "---|---|---|"]
    for row in data["rows"]:
        dev = " | ".join(_cell(row["dev_top1"][lr]) for lr in grid)
        chosen = _cell(row["chosen_lr"], 0) if row["chosen_lr"] is None else f"{row['chosen_lr']:g}"
        lines.append(f"| {row['model']} | {row['title']} ({row['dev_fraction']:.0%}) | {dev} | {chosen} | "
                     f"{_test_cell(row)} | {_cell(row['paper_top1'])} |")
    return "\n".join(lines) + "\n"


def plot(data: dict[str, Any], path: Path) -> None:
    """Development top-1 against the learning rate per weights x data set, the chosen rate's test top-1
    and the paper's figure beside it."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = data["rows"]
    figure = Figure(figsize=(3.6 * max(1, len(rows)), 3.4))
    FigureCanvasAgg(figure)
    for axes, row in zip(figure.subplots(1, max(1, len(rows)), squeeze=False)[0], rows, strict=False):
        points = [(float(lr), score) for lr, score in row["dev_top1"].items() if isinstance(score, float)]
        if points:
            axes.plot(*zip(*points, strict=True), "o-", label="dev top-1")
        if row["test_top1_mean"] is not None:
            axes.errorbar([row["chosen_lr"]], [row["test_top1_mean"]], yerr=row["test_top1_std"] or 0.0,
                          fmt="s", color="C1", capsize=4, label="test top-1 (chosen lr)")
        if row["paper_top1"] is not None:
            axes.axhline(row["paper_top1"], color="C2", linestyle="--", label="paper (Table 4)")
        if points or row["test_top1_mean"] is not None:  # a log axis needs a positive rate on it
            axes.set_xscale("log")
        axes.set(title=f"{row['model']} on {row['title']}", xlabel="learning rate", ylabel="top-1 (%)")
        axes.grid(alpha=0.3)
        if axes.get_legend_handles_labels()[0]:
            axes.legend(fontsize="small")
    figure.tight_layout()
    write_figure(path, figure)


def write_report(root: Path, plan: TransferPlan) -> dict[str, Path]:
    """Rebuild report.md, transfer.json and transfer.png in root from the runs finished so far."""
    return write_suite_report(root, "transfer", collect(root, plan), markdown, plot)

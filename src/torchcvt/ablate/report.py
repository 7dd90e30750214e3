"""The suite's report from whatever has finished: report.md, ablation.json and ablation.png."""

from __future__ import annotations

import os
import socket
import statistics
from collections import Counter
from pathlib import Path
from typing import Any

from ..files import write_figure
from ..runrecord import RunSummary
from ..suite import read_summary, write_suite_report
from .plan import Plan, PlannedRow, Run
from .runner import run_folder

# Fewer seeds than this: the standard deviation itself is too uncertain to rank differences near it.
FEW_SEEDS = 5
RULE = ("Top-1 is the validation top-1 (%) after the last epoch, mean ± standard deviation over the seeds "
        "(each seed's value in brackets). A difference to the study's default row that is not larger than "
        "the seed-to-seed spread (the larger of the two rows' standard deviations) is reported as \"no "
        "measurable difference\"; with one seed the spread is unknown and nothing is ranked.")


def _summary(root: Path, run: Run) -> RunSummary | None:
    """The run's summary; None (not finished) when it has none or one that cannot be read."""
    return read_summary(run_folder(root, run))


def _std(values: list[float]) -> float | None:
    return statistics.stdev(values) if len(values) > 1 else None


def _row_record(root: Path, plan: Plan, planned: PlannedRow) -> dict[str, Any]:
    top1, speed = {}, []
    for seed in plan.seeds:
        summary = _summary(root, Run(planned.model, seed, planned.row.knobs))
        top1[seed] = None if summary is None else 100.0 * summary.final_val_top1
        if summary is not None:
            speed.append(summary.images_per_second)
    values = [value for value in top1.values() if value is not None]
    return {
        "study": planned.study.name,
        "table": planned.study.table,
        "row": planned.row.letter,
        "label": planned.row.label,
        "default": planned.is_default,
        "overrides": planned.overrides,
        "runs": [Run(planned.model, seed, {}).name for seed in plan.seeds],
        "params_m": planned.params / 1e6,
        "gflops": planned.flops / 1e9,
        "images_per_second": statistics.mean(speed) if speed else None,
        "top1_mean": statistics.mean(values) if values else None,
        "top1_std": _std(values),
        "top1_seeds": {str(seed): value for seed, value in top1.items()},
        "seeds_finished": len(values),
        "paper_top1": planned.row.paper_top1,
        "paper_params_m": planned.row.paper_params_m,
        "paper_gflops": planned.row.paper_gflops,
    }


def _compare(row: dict[str, Any], default: dict[str, Any]) -> None:
    """Add the difference to the default row and what it means, to row."""
    row["diff_to_default"] = row["spread"] = None
    if row["default"]:
        row["verdict"] = "default row"
    elif row["top1_mean"] is None or default["top1_mean"] is None:
        row["verdict"] = "not finished"
    else:
        row["diff_to_default"] = diff = row["top1_mean"] - default["top1_mean"]
        if row["top1_std"] is None or default["top1_std"] is None:
            row["verdict"] = f"{diff:+.2f} (one seed: spread unknown, not ranked)"
        else:
            row["spread"] = spread = max(row["top1_std"], default["top1_std"])
            row["verdict"] = (f"{diff:+.2f}: no measurable difference (within the spread of {spread:.2f})"
                              if abs(diff) <= spread else f"{diff:+.2f} (beyond the spread of {spread:.2f})")
    paper, paper_default = row["paper_top1"], default["paper_top1"]
    row["paper_diff_to_default"] = (None if row["default"] or paper is None or paper_default is None
                                    else round(paper - paper_default, 2))


def collect(root: Path, plan: Plan) -> dict[str, Any]:
    """Everything the report shows, as one JSON-ready mapping."""
    studies = []
    for study in dict.fromkeys(planned.study for planned in plan.rows):
        rows = [_row_record(root, plan, planned) for planned in plan.rows if planned.study is study]
        default = next(row for row in rows if row["default"])
        for row in rows:
            _compare(row, default)
        studies.append({"study": study.name, "table": study.table, "title": study.title, "rows": rows})
    return {
        "model": plan.recipe.model_name,
        "model_overrides": plan.recipe.model_overrides,
        "img_size": list(plan.img_size),
        "num_classes": plan.num_classes,
        "seeds": list(plan.seeds),
        "recipe": plan.recipe.settings,
        "written_on": {"host": socket.gethostname(), "cpu": cpu_name(), "cpus": os.cpu_count()},
        "studies": studies,
    }


def cpu_name() -> str:
    """The processor's model name as lscpu shows it (from /proc/cpuinfo), or the platform's."""
    import platform

    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cell(value: float | None, digits: int, sign: bool = False) -> str:
    return "-" if value is None else f"{value:{'+' if sign else ''}.{digits}f}"


def _top1_cell(row: dict[str, Any], seeds: int) -> str:
    values = [value for value in row["top1_seeds"].values() if value is not None]
    if not values:
        return f"not finished (0 of {seeds} seeds)"
    each = ", ".join(_cell(value, 1) for value in row["top1_seeds"].values())
    spread = f" ± {row['top1_std']:.2f}" if row["top1_std"] is not None else ""
    partial = f"; {len(values)} of {seeds} seeds finished" if len(values) < seeds else ""
    return f"{row['top1_mean']:.2f}{spread} ({each}{partial})"


def caution(seeds: int) -> str:
    """What a report of few seeds warns about its own verdicts."""
    return (f"**Caution: {seeds} seeds are few.** With fewer than {FEW_SEEDS} seeds the standard deviation "
            "is itself uncertain, so a verdict for a difference close to the spread may flip when the suite "
            f"is rerun (other seeds, another machine's summation order); give `--seeds {FEW_SEEDS}` or more "
            "before leaning on one.")


def markdown(data: dict[str, Any]) -> str:
    seeds = len(data["seeds"])
    height, width = data["img_size"]
    lines = [
        "# CvT ablation suite",
        "",
        f"Model {data['model']} ({data['num_classes']} classes) at {height}x{width}, seeds "
        f"{', '.join(map(str, data['seeds']))}; every row trains the same recipe (suite.json), only the "
        "row's settings differ. Parameters and GFLOPs (one multiply-add = one FLOP) are counted for this "
        "model; images/s is the training throughput measured where each run trained. The paper's figures "
        "are ImageNet-1k's for CvT-13 at 224.",
        "",
        RULE,
        "",
    ]
    if 1 < seeds < FEW_SEEDS:
        lines += [caution(seeds), ""]
    for study in data["studies"]:
        lines += [f"## Table {study['table']}: {study['title']} (`{study['study']}`)", "",
                  "| row | setting | params (M) | GFLOPs | images/s | top-1 (%) | vs default | paper top-1 | "
                  "paper vs default |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for row in study["rows"]:
            name = f"**{row['row']}** (default)" if row["default"] else row["row"]
            paper_diff = _cell(row["paper_diff_to_default"], 1, sign=True)
            lines.append(
                f"| {name} | {row['label']} | {row['params_m']:.3f} | {row['gflops']:.4g} | "
                f"{_cell(row['images_per_second'], 0)} | {_top1_cell(row, seeds)} | {row['verdict']} | "
                f"{_cell(row['paper_top1'], 1)} | {paper_diff} |"
            )
        lines.append("")
    host = data["written_on"]
    lines.append(f"Written on {host['host']} ({host['cpu']}, {host['cpus']} CPUs).")
    return "\n".join(lines) + "\n"


def plot(data: dict[str, Any], path: Path) -> None:
    """Top-1 against FLOPs (in GFLOPs, or MFLOPs for small models), one panel per study, error bars from the
    seeds; a legend tells the default row and the error bars apart."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.ticker import MaxNLocator, ScalarFormatter

    studies = data["studies"]
    every = [row["gflops"] for study in studies for row in study["rows"]]
    scale, unit = (1.0, "GFLOPs") if max(every) >= 1 else (1e3, "MFLOPs")
    figure = Figure(figsize=(4.2 * len(studies), 4.3))
    FigureCanvasAgg(figure)
    for axes, study in zip(figure.subplots(1, len(studies), squeeze=False)[0], studies, strict=True):
        rows = [row for row in study["rows"] if row["top1_mean"] is not None]
        flops = [scale * row["gflops"] for row in study["rows"]]
        # Rows of equal FLOPs (every row of Table 5) are spread sideways a little to stay readable.
        width = max(flops) - min(flops)
        step = 0.015 * width if width else 0.002 * flops[0]
        ties = Counter(row["gflops"] for row in rows)
        seen: Counter[float] = Counter()
        for row in rows:
            x = scale * row["gflops"] + step * (seen[row["gflops"]] - (ties[row["gflops"]] - 1) / 2)
            seen[row["gflops"]] += 1
            axes.errorbar(x, row["top1_mean"], yerr=row["top1_std"] or 0.0, capsize=4,
                          fmt="s" if row["default"] else "o", color="C1" if row["default"] else "C0")
            axes.annotate(row["row"], (x, row["top1_mean"]), textcoords="offset points", xytext=(6, 4))
        axes.set(title=f"Table {study['table']}: {study['study']}", xlabel=unit, ylabel="top-1 (%)")
        if width:
            axes.xaxis.set_major_locator(MaxNLocator(nbins=4))
            axes.xaxis.set_major_formatter(ScalarFormatter(useOffset=False))
        else:
            axes.set(xticks=[flops[0]], xticklabels=[f"{flops[0]:.4g}"],
                     xlim=(0.99 * flops[0], 1.01 * flops[0]),
                     xlabel=f"{unit} (every row {flops[0]:.4g}, spread sideways)")
        axes.grid(alpha=0.3)
        if not rows:
            axes.text(0.5, 0.5, "not finished", ha="center", va="center", transform=axes.transAxes)
    spread = "error bars: ± 1 s.d. over the seeds" if len(data["seeds"]) > 1 else "one seed: no error bars"
    handles = [Line2D([], [], marker="s", color="C1", linestyle="", label="default row"),
               Line2D([], [], marker="o", color="C0", linestyle="", label="other rows"),
               Line2D([], [], color="0.4", marker="|", markersize=12, linestyle="", label=spread)]
    figure.legend(handles=handles, loc="lower center", ncol=3, frameon=False)
    figure.tight_layout(rect=(0, 0.08, 1, 1))
    write_figure(path, figure)


def write_report(root: Path, plan: Plan) -> dict[str, Path]:
    """Rebuild report.md, ablation.json and ablation.png in root from the runs finished so far."""
    return write_suite_report(root, "ablation", collect(root, plan), markdown, plot)

"""A suite's plan: every study row applied to the recipe's model, counted, and the distinct runs it needs."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..config import CvtConfig, get_variant, variant_config
from ..errors import TorchcvtError
from ..flops import count_flops, count_params
from .recipe import Recipe
from .studies import Row, Study

_PROJECTION_CODES = {"dw_bn": "c", "linear": "l", "avg": "a"}
# Seeds per row a suite may ask for: the paper's spread needs a handful; each seed is a full set of runs.
MAX_SEEDS = 100


@dataclass(frozen=True)
class PlannedRow:
    """A study row on the recipe's model: the run folder it shares with identical models, and its counts."""

    study: Study
    row: Row
    model: str
    params: int
    flops: int

    @property
    def is_default(self) -> bool:
        return self.row.letter == self.study.default

    @property
    def overrides(self) -> dict[str, list[Any]]:
        return {name: list(values) for name, values in self.row.knobs.items()}


@dataclass(frozen=True)
class Run:
    """One training run of the suite: a distinct model and a seed."""

    model: str
    seed: int
    knobs: dict[str, tuple[Any, ...]]

    @property
    def name(self) -> str:
        return f"{self.model}/seed-{self.seed}"


@dataclass(frozen=True)
class Plan:
    recipe: Recipe
    rows: tuple[PlannedRow, ...]
    seeds: tuple[int, ...]
    img_size: tuple[int, int]
    num_classes: int

    def runs(self) -> list[Run]:
        """The distinct runs, seed by seed (so an unfinished suite has whole seeds first), rows in order."""
        models: dict[str, dict[str, tuple[Any, ...]]] = {}
        for planned in self.rows:
            models.setdefault(planned.model, planned.row.knobs)
        return [Run(model, seed, knobs) for seed in self.seeds for model, knobs in models.items()]


def model_name(config: CvtConfig) -> str:
    """A folder name for a model that says its studied settings, e.g. pos000-tokccc-kv222-projccc."""
    positions = "".join("1" if on else "0" for on in config.position_embedding)
    tokens = "".join(kind[0] for kind in config.token_embedding)
    strides = "".join(map(str, config.stride_kv))
    projections = "".join(_PROJECTION_CODES[method] for method in config.qkv_projection_method)
    return f"pos{positions}-tok{tokens}-kv{strides}-proj{projections}"


def row_config(recipe: Recipe, study: Study, row: Row, num_classes: int) -> CvtConfig:
    """The recipe's model with a row's settings; a one-line error when the model cannot take them."""
    try:
        settings = {**recipe.model_overrides, **row.knobs}
        return variant_config(recipe.model_name, num_classes=num_classes, **settings)
    except ValueError as error:
        settings = ", ".join(f"{name}={list(values)}" for name, values in row.knobs.items())
        base = recipe.model_name + (" with the recipe's model.overrides" if recipe.model_overrides else "")
        raise TorchcvtError(f"study {study.name!r} row {row.letter} ({settings}) cannot be applied to "
                         f"{base}: {error}") from None


def build_plan(recipe: Recipe, studies: Sequence[Study], seeds: Sequence[int], num_classes: int) -> Plan:
    """Every row of the studies on the recipe's model, counted at the model's input size."""
    img_size = tuple(get_variant(recipe.model_name).input_size[1:])
    rows = []
    for study in studies:
        for row in study.rows:
            config = row_config(recipe, study, row, num_classes)
            rows.append(PlannedRow(study, row, model_name(config), count_params(config),
                                   count_flops(config, img_size)))
    return Plan(recipe, tuple(rows), tuple(seeds), img_size, num_classes)


def dry_run_rows(plan: Plan) -> list[dict[str, Any]]:
    """Each row's settings and counts beside the paper's figures (null where the paper gives none)."""
    return [
        {
            "study": planned.study.name,
            "row": planned.row.letter,
            "overrides": planned.overrides,
            "params_m": round(planned.params / 1e6, 4),
            "gflops": round(planned.flops / 1e9, 4),
            "paper_params_m": planned.row.paper_params_m,
            "paper_gflops": planned.row.paper_gflops,
            "paper_top1": planned.row.paper_top1,
        }
        for planned in plan.rows
    ]


def format_dry_run(plan: Plan) -> str:
    """The plan as a table per study: settings, our counts and the paper's figures, and the runs it needs."""

    def paper(value: float | None) -> str:  # as the paper prints them: 81.0, 20.0, 6.55
        if value is None:
            return "-"
        return f"{value:.1f}" if value == round(value, 1) else f"{value:g}"

    def ours(value: float) -> str:  # small models keep their differences visible
        return f"{value:.2f}" if value >= 10 else f"{value:.4f}" if value >= 0.01 else f"{value:.6f}"

    height, width = plan.img_size
    lines = [f"{plan.recipe.model_name} at {height}x{width}, {plan.num_classes} classes; "
             f"{len(plan.runs())} runs ({len({p.model for p in plan.rows})} distinct models x "
             f"{len(plan.seeds)} seeds); paper: CvT-13 at 224 on ImageNet-1k (Tables 5-8)"]
    for study in dict.fromkeys(planned.study for planned in plan.rows):
        lines += ["", f"Table {study.table}: {study.title} [{study.name}]",
                  f"  {'row':<4}{'setting':<42}{'params M':>9}{'paper':>7}{'GFLOPs':>10}{'paper':>7}"
                  f"{'paper top-1':>12}  run folder"]
        for planned in (p for p in plan.rows if p.study is study):
            row = planned.row
            letter = row.letter + ("*" if planned.is_default else "")
            lines.append(f"  {letter:<4}{row.label:<42}{ours(planned.params / 1e6):>9}"
                         f"{paper(row.paper_params_m):>7}{ours(planned.flops / 1e9):>10}"
                         f"{paper(row.paper_gflops):>7}{paper(row.paper_top1):>12}  {planned.model}")
    lines.append("\n* the study's default row: the default CvT, trained once per seed, shared by every table")
    return "\n".join(lines)

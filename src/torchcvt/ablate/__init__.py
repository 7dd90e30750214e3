"""The CvT paper's ablation studies (Tables 5-8) as a suite of ordinary training runs on any data set.

`prepare` reads the recipe, `build_plan` applies every study row to its model and counts it, `run_suite`
trains one worker's share of the runs and `write_report` rebuilds report.md, ablation.json and ablation.png
from whatever has finished.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from ..suite import RunFailed, default_shard
from ..typed import parse_assignment
from .plan import MAX_SEEDS, Plan, PlannedRow, Run, build_plan, dry_run_rows, format_dry_run, row_config
from .recipe import SuiteRecipe, read_recipe, recipe_from_settings
from .report import collect, write_report
from .runner import data_fingerprint, open_suite, read_suite, run_suite
from .studies import STUDIES, Row, Study, select_studies
from .task import EMBEDDED_BUDGET, write_task

if TYPE_CHECKING:
    from ..engine import TrainConfig
    from ..engine.recipes import Recipe

logger = logging.getLogger("torchcvt.ablate")

__all__ = [
    "EMBEDDED_BUDGET", "MAX_SEEDS", "STUDIES", "Plan", "PlannedRow", "Row", "Run", "RunFailed", "Study",
    "SuiteRecipe",
    "build_plan", "collect", "data_fingerprint", "default_shard", "dry_run_rows", "embedded_recipe",
    "format_dry_run", "open_suite", "prepare", "read_recipe",
    "read_suite", "recipe_from_settings", "row_config", "run_suite", "select_studies", "suite_plan",
    "write_report", "write_task",
]


def prepare(
    config: str | None, overrides: Sequence[str], data: str | Path | None
) -> tuple[TrainConfig, SuiteRecipe]:
    """The config every run of the suite starts from and its recipe, resolved as `torchcvt train` resolves
    them (engine.resolve), except that with neither a config file nor data the suite runs on the embedded
    task (written once) with the digits recipe and its budget."""
    from ..engine.resolve import resolve_config

    resolved = resolve_config(config, overrides, data=data, default_recipe=embedded_recipe)
    if resolved.recipe is not None:
        logger.info(resolved.recipe_line())
    return resolved.config, read_recipe(resolved.config)


def embedded_recipe() -> Recipe:
    """The digits recipe with the embedded budget, on the embedded task (written here once)."""
    from ..engine import DIGITS_RECIPE, TrainConfig
    from ..engine.recipes import Recipe
    from ..engine.resolve import data_values

    task = write_task()
    budget = dict(parse_assignment(text) for text in EMBEDDED_BUDGET)
    values = TrainConfig.from_mapping(DIGITS_RECIPE).override({**budget, **data_values(task)}).to_dict()
    return Recipe("embedded", values, None, "light", f"the embedded digits task ({task})")


def suite_plan(root: Path, studies: Sequence[Study] = ()) -> Plan:
    """The plan of the suite recorded in root (all its studies and seeds, or only the given studies)."""
    suite = read_suite(root)
    names = [study.name for study in studies] or suite["studies"]
    recipe = recipe_from_settings(suite["recipe"], min(suite["seeds"]))
    return build_plan(recipe, select_studies(names), suite["seeds"], suite["data"]["train"]["classes"])

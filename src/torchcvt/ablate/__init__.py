"""The CvT paper's ablation studies (Tables 5-8) as a suite of ordinary training runs on any data set.

`prepare` reads the recipe, `build_plan` applies every study row to its model and counts it, `run_suite`
trains one worker's share of the runs and `write_report` rebuilds report.md, ablation.json and ablation.png
from whatever has finished.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from ..suite import RunFailed, default_shard
from .plan import Plan, PlannedRow, Run, build_plan, dry_run_rows, format_dry_run, row_config
from .recipe import Recipe, data_overrides, read_recipe, recipe_from_settings, section_overrides
from .report import collect, write_report
from .runner import data_fingerprint, open_suite, read_suite, run_suite
from .studies import STUDIES, Row, Study, select_studies
from .task import EMBEDDED_BUDGET, write_task

logger = logging.getLogger("torchcvt.ablate")

__all__ = [
    "EMBEDDED_BUDGET", "STUDIES", "Plan", "PlannedRow", "Recipe", "Row", "Run", "RunFailed", "Study",
    "build_plan", "collect", "data_fingerprint", "default_shard", "dry_run_rows", "format_dry_run",
    "open_suite", "prepare", "read_recipe",
    "read_suite", "recipe_from_settings", "row_config", "run_suite", "select_studies", "suite_plan",
    "write_report", "write_task",
]


def prepare(
    config: str | None, overrides: Sequence[str], data: str | Path | None
) -> tuple[list[str], Recipe]:
    """The KEY=VALUE strings every run starts from and the recipe they give, as `torchcvt train` decides:
    with neither a config file nor data (--data or a data.train override), the embedded task (written
    once) and its recipe; with data and no config file, the recipe chosen for the data (engine.recipes).
    """
    from ..engine import DIGITS_RECIPE, load_config
    from ..engine.recipes import choose_recipe, given_weights
    from ..typed import parse_assignment

    given = dict(parse_assignment(text) for text in [*data_overrides(data), *overrides])
    if config is None and "data.train" not in given:
        embedded = [*section_overrides(DIGITS_RECIPE), *EMBEDDED_BUDGET]
        base = [*embedded, *data_overrides(write_task()), *overrides]
    elif config is None:
        chosen = choose_recipe(given["data.train"], *given_weights(given))
        logger.info(f"recipe: {chosen.why} (give --config FILE to choose another)")
        base = [*section_overrides(chosen.values), *data_overrides(data), *overrides]
    else:
        base = [*data_overrides(data), *overrides]
    return base, read_recipe(load_config(config, base))


def suite_plan(root: Path, studies: Sequence[Study] = ()) -> Plan:
    """The plan of the suite recorded in root (all its studies and seeds, or only the given studies)."""
    suite = read_suite(root)
    names = [study.name for study in studies] or suite["studies"]
    recipe = recipe_from_settings(suite["recipe"], min(suite["seeds"]))
    return build_plan(recipe, select_studies(names), suite["seeds"], suite["data"]["train"]["classes"])

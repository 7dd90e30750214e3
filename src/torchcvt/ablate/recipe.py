"""The suite's view of a training config: the one place that reads the engine's config contents.

Everything else in the ablation package sees a SuiteRecipe; each run's config is the suite's resolved config
with the run's own settings (run_values) applied by TrainConfig.override.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..suite import override
from ..typed import flatten

# Keys that say how or where a run goes, not what it trains: they may differ between the workers and
# invocations of one suite. Data folders are compared by their content (see data_fingerprint) instead.
RUN_LOCAL_KEYS = (
    "data.train", "data.val", "data.digits_root", "data.workers", "data.pin_memory",
    "data.persistent_workers", "data.strict", "data.eval_batch_size", "train.output", "train.seed",
    "train.quiet", "train.log_every_steps", "train.resume", "train.auto_resume", "train.device",
    "train.checkpoint_every_steps",
)
MODEL_OVERRIDES = "model.overrides."


@dataclass(frozen=True)
class SuiteRecipe:
    """What the suite needs from a training config: the model, the data folders, the first seed and the
    recipe's settings (dotted keys, see typed.flatten) that every run of the suite must share."""

    model_name: str
    model_overrides: dict[str, Any]
    train_dir: str | None
    val_dir: str | None
    seed: int
    settings: dict[str, Any]


def read_recipe(cfg: Any) -> SuiteRecipe:
    """The SuiteRecipe of a resolved TrainConfig."""
    settings = {key: value for key, value in flatten(cfg).items() if key not in RUN_LOCAL_KEYS}
    # JSON round trip, so a recipe read back from suite.json compares equal.
    recipe = recipe_from_settings(json.loads(json.dumps(settings, default=str)), cfg.train.seed)
    return SuiteRecipe(recipe.model_name, recipe.model_overrides, cfg.data.train, cfg.data.val, recipe.seed,
                  recipe.settings)


def section_overrides(sections: dict[str, Any]) -> list[str]:
    """KEY=VALUE strings that set what a recipe's sections (as a YAML file holds them) set."""
    return [override(f"{name}.{key}", value)
            for name, section in sections.items() for key, value in section.items()]


def run_values(knobs: dict[str, Sequence[Any]], seed: int, output: Path) -> dict[str, Any]:
    """The dotted settings that make one row x seed of a suite out of its config."""
    return {
        **{f"{MODEL_OVERRIDES}{name}": list(values) for name, values in knobs.items()},
        "train.seed": seed,
        "train.output": str(output),
    }


def recipe_from_settings(settings: dict[str, Any], seed: int) -> SuiteRecipe:
    """The SuiteRecipe recorded in a suite's suite.json (its settings, flat), for rebuilding the report."""
    settings = flatten(settings)  # suites before typed.flatten kept model.overrides as one mapping
    overrides = {key[len(MODEL_OVERRIDES):]: value for key, value in settings.items()
                 if key.startswith(MODEL_OVERRIDES)}
    return SuiteRecipe(model_name=settings["model.name"], model_overrides=overrides, train_dir=None,
                       val_dir=None, seed=seed, settings=settings)

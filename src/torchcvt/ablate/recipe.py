"""The suite's view of a training config: the one place that reads the engine's config contents.

Everything else in the ablation package sees a Recipe and hands runs to the engine as KEY=VALUE strings,
so a change in the engine's config type touches only `_config_tree` and `read_recipe`.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..suite import override

# Keys that say how or where a run goes, not what it trains: they may differ between the workers and
# invocations of one suite. Data folders are compared by their content (see data_fingerprint) instead.
RUN_LOCAL_KEYS = (
    "data.train", "data.val", "data.digits_root", "data.workers", "data.pin_memory",
    "data.persistent_workers", "data.strict", "data.eval_batch_size", "train.output", "train.seed",
    "train.quiet", "train.log_every_steps", "train.resume", "train.auto_resume", "train.device",
    "train.checkpoint_every_steps",
)


@dataclass(frozen=True)
class Recipe:
    """What the suite needs from a training config: the model, the data folders, the first seed and the
    recipe's settings (flattened to dotted keys) that every run of the suite must share."""

    model_name: str
    model_overrides: dict[str, Any]
    train_dir: str | None
    val_dir: str | None
    seed: int
    settings: dict[str, Any]


def _config_tree(cfg: Any) -> dict[str, Any]:
    """The config as nested dicts of sections (a typed config's dataclasses are converted)."""
    return dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) else cfg


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and dotted != "model.overrides":
            flat.update(_flatten(value, dotted + "."))
        else:
            flat[dotted] = value
    return flat


def read_recipe(cfg: Any) -> Recipe:
    """The Recipe of a config returned by the engine's load_config."""
    tree = _config_tree(cfg)
    model, data = tree["model"], tree["data"]
    settings = {key: value for key, value in _flatten(tree).items() if key not in RUN_LOCAL_KEYS}
    # JSON round trip: tuples become lists, so a recipe read back from suite.json compares equal.
    settings = json.loads(json.dumps(settings, default=str))
    return Recipe(
        model_name=model["name"],
        model_overrides=dict(model["overrides"] or {}),
        train_dir=data["train"],
        val_dir=data["val"],
        seed=int(tree["train"]["seed"]),
        settings=settings,
    )


def data_overrides(data: str | Path | None) -> list[str]:
    """KEY=VALUE strings pointing a run at --data: an ImageFolder root holding train/ and val/, or a
    Hugging Face dataset's train and validation splits (data.data_roots)."""
    if data is None:
        return []
    from ..data import data_roots

    train, val = data_roots(data)
    return [override("data.train", train), override("data.val", val)]


def section_overrides(sections: dict[str, Any]) -> list[str]:
    """KEY=VALUE strings that set what a recipe's sections (as a YAML file holds them) set."""
    return [override(f"{name}.{key}", value)
            for name, section in sections.items() for key, value in section.items()]


def run_overrides(knobs: dict[str, Sequence[Any]], seed: int, output: Path) -> list[str]:
    """KEY=VALUE strings that make one row x seed of a suite out of its recipe."""
    return [
        *(override(f"model.overrides.{name}", list(values)) for name, values in knobs.items()),
        override("train.seed", seed),
        override("train.output", str(output)),
    ]


def recipe_from_settings(settings: dict[str, Any], seed: int) -> Recipe:
    """The Recipe recorded in a suite's suite.json (its settings), for rebuilding the report."""
    return Recipe(model_name=settings["model.name"], model_overrides=dict(settings["model.overrides"] or {}),
                  train_dir=None, val_dir=None, seed=seed, settings=settings)

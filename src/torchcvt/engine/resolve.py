"""The one way a command makes a run's TrainConfig: `train`, `ablate` and `transfer` all call
resolve_config, so the same command line resolves the same config on every run (and a rerun resumes)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..data import data_roots
from ..typed import parse_assignment
from .recipes import Recipe, choose_recipe, given_weights
from .starting import adopted_architecture, tag_architecture
from .train_config import TrainConfig, load_config


@dataclass(frozen=True)
class ResolvedConfig:
    """A run's config and the recipe it started from (None: a config file, or the digits default)."""

    config: TrainConfig
    recipe: Recipe | None = None

    def recipe_line(self) -> str | None:
        """'recipe: ...' with the values the run trains with (overrides applied), or None without a recipe."""
        if self.recipe is None:
            return None
        return f"recipe: {self.recipe.describe(self.config)} (give --config FILE to choose another)"


def data_values(data: str | Path) -> dict[str, str]:
    """The dotted settings of --data: ROOT/train and ROOT/val of a tree, or a Hugging Face dataset's train
    and validation splits (data.data_roots)."""
    train, val = data_roots(data)
    return {"data.train": train, "data.val": val}


def resolve_config(
    config_file: str | Path | None = None,
    overrides: Sequence[str] = (),
    values: Mapping[str, Any] | None = None,
    *,
    data: str | Path | None = None,
    pretrained: str | None = None,
    recipe: Recipe | None = None,
    default_recipe: Callable[[], Recipe] | None = None,
) -> ResolvedConfig:
    """A run's TrainConfig from everything a command line gives, each later source overriding the earlier:

    1. the TrainConfig defaults;
    2. config_file (a YAML experiment); else `recipe` when given (a command's own); else, with `data`
       (--data), the recipe engine.recipes chooses for the data and starting weights (train.epochs,
       when set, is its length); else, with no data.train given, default_recipe() when given (ablate's
       embedded task) or the digits recipe; else (data.train=DIR) the TrainConfig defaults;
    3. overrides, KEY=VALUE strings (`optim.lr=0.03`);
    4. values, typed dotted settings from command options (`{"train.output": "runs/x"}`), then
       data (a folder holding train/ and val/, or a Hugging Face dataset: data_values) and pretrained
       (a released-weights tag, which also sets model.name to its variant);
    5. the architecture the starting weights (model.checkpoint) record, for every model config field the
       sources above leave unset: the config says what is trained, so a rerun compares like with like.

    Per-run variants of the result are made with `config.override({...})`.
    """
    settings = dict(values or {})
    if data is not None:
        settings.update(data_values(data))
    if pretrained is not None:
        settings.update({"model.pretrained": pretrained,
                         "model.name": tag_architecture(pretrained, "--pretrained")})
    if config_file is not None:
        recipe = None
    elif recipe is None:
        given = dict(parse_assignment(text) for text in overrides) | settings
        if data is not None:
            recipe = choose_recipe(given["data.train"], *given_weights(given), given.get("train.epochs"))
        elif default_recipe is not None and "data.train" not in given:
            recipe = default_recipe()
    sections = recipe.values if recipe is not None else None
    cfg = load_config(config_file, overrides, settings, sections)
    m = cfg.model
    if m.checkpoint is not None:
        adopted = adopted_architecture(m.checkpoint, m.name, m.overrides)
        if adopted:
            cfg = cfg.override({f"model.overrides.{key}": value for key, value in adopted.items()},
                               f"the architecture {m.checkpoint} records")
    return ResolvedConfig(cfg, recipe)


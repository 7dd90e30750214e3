"""Training and evaluation: the CvT paper's recipe from timm pieces, one code path for 1 to N processes.

`train(config) -> summary` runs a whole experiment; `evaluate_checkpoint(...)` scores a checkpoint on
an ImageFolder tree. Under torchrun every process runs the same code; rank 0 alone logs and saves.
"""

from .build import Components, build_components
from .config import (
    DEFAULTS,
    DIGITS_RECIPE,
    check_recipe,
    load_config,
    parse_override,
    set_dotted,
    validate_config,
)
from .dryrun import dry_run
from .evaluate import evaluate, evaluate_checkpoint
from .loop import Trainer, TrainingDiverged, train
from .optim import freeze_stages, param_groups
from .reporting import plot_curves
from .runtime import Runtime, init_runtime
from .state import FORMAT_VERSION, read_training_state, save_training_state

__all__ = [
    "DEFAULTS",
    "DIGITS_RECIPE",
    "FORMAT_VERSION",
    "Components",
    "Runtime",
    "Trainer",
    "TrainingDiverged",
    "build_components",
    "check_recipe",
    "dry_run",
    "evaluate",
    "evaluate_checkpoint",
    "freeze_stages",
    "init_runtime",
    "load_config",
    "param_groups",
    "parse_override",
    "plot_curves",
    "read_training_state",
    "save_training_state",
    "set_dotted",
    "train",
    "validate_config",
]

"""Training and evaluation: the CvT paper's recipe from timm pieces, one code path for 1 to N processes.

`train(config) -> summary` runs a whole experiment; `evaluate_checkpoint(...)` scores a checkpoint on
an ImageFolder tree. Under torchrun every process runs the same code; rank 0 alone logs and saves.
"""

from .build import Components, build_components
from .dryrun import dry_run
from .evaluate import evaluate, evaluate_checkpoint
from .loop import Trainer, TrainingDiverged, train
from .optim import freeze_stages, param_groups
from .reporting import plot_curves
from .resolve import ResolvedConfig, resolve_config
from .runtime import Runtime, init_runtime
from .state import FORMAT_VERSION, read_training_state, save_training_state
from .train_config import DIGITS_RECIPE, TrainConfig, as_train_config, load_config

__all__ = [
    "DIGITS_RECIPE",
    "FORMAT_VERSION",
    "Components",
    "ResolvedConfig",
    "Runtime",
    "TrainConfig",
    "Trainer",
    "TrainingDiverged",
    "as_train_config",
    "build_components",
    "dry_run",
    "evaluate",
    "evaluate_checkpoint",
    "freeze_stages",
    "init_runtime",
    "load_config",
    "param_groups",
    "plot_curves",
    "read_training_state",
    "resolve_config",
    "save_training_state",
    "train",
]

"""The training configuration: typed sections with the paper's CvT-13 recipe as defaults, read from YAML
files and dotted KEY=VALUE overrides, every value checked when the config is made."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from ..config import variant_config
from ..errors import TorchcvtError, shown
from ..typed import (
    build,
    check_fields,
    from_mapping,
    merge,
    option,
    parse_assignment,
    read_config_file,
    set_path,
    to_dict,
)

Precision = Literal["none", "bf16", "fp16"]

# Upper bounds of the counts a config gives, checked with every other value before anything is allocated:
# far beyond any real run (ImageNet runs 300 epochs of batches of at most tens of thousands of images).
MAX_EPOCHS = 100_000
MAX_STEPS = 100_000_000
MAX_BATCH = 1 << 16
MAX_SEED = 2**32 - 1  # numpy's seeds are 32-bit


def _device(key: str, value: str) -> None:
    from ..checks import resolve_device

    resolve_device(value, key)


@dataclass(frozen=True)
class ModelSettings:
    """The network: a registered variant, its config overrides and the weights to start from."""

    name: str = "cvt_13"
    pretrained: str | None = None  # released weights by tag (cvt_13.ms_in1k), from the Hub cache
    checkpoint: str | None = None  # a weights file to start from: anything create_model(checkpoint=...) loads
    require_weights: bool = False  # a fine-tuning recipe: a run without pretrained or checkpoint is an error
    # The classifier of the starting weights: auto keeps it only when the checkpoint's class list is the
    # data's (count, and names where it records them); new always starts a fresh one; keep always keeps it.
    head: Literal["auto", "new", "keep"] = "auto"
    # How a head the run makes starts: trunc_normal weight and PyTorch's bias (the official code), or all
    # zeros (weight and bias, as ViT's fine-tuning code: vit_jax/models_vit.py, the head's zeros init).
    head_init: Literal["trunc_normal", "zero"] = "trunc_normal"
    overrides: dict[str, Any] = option({}, of="model config fields")  # e.g. {drop_path_rate: [0, 0, 0.1]}
    freeze_stages: int = option(0, low=0, high=16)  # stages 0..N-1 keep their weights (and BN statistics)
    sync_bn: bool = False


@dataclass(frozen=True)
class DataSettings:
    """Where the images are and how they are loaded. Sizes are per process."""

    train: str | None = None  # ImageFolder tree; none given and no config file: the embedded digits
    val: str | None = None
    digits_root: str | None = None  # where the digits tree is written; default ~/.cache/torchcvt/digits
    workers: int | None = option(None, low=0, high=256)  # loader processes; None: 4, or the CPUs if fewer
    pin_memory: bool = True
    persistent_workers: bool = True
    strict: bool = False  # stop at the first unreadable image instead of skipping it
    eval_batch_size: int | None = option(None, low=1, high=MAX_BATCH)


@dataclass(frozen=True)
class AugSettings:
    """Training augmentation, mixup/CutMix and label smoothing."""

    enabled: bool = True
    pipeline: Literal["timm", "torchvision"] = "timm"  # torchvision: crop, flip, normalize (CvT-21-224)
    scale: tuple[float, float] = option((0.08, 1.0), low=0.0, high=1.0, above=True)
    ratio: tuple[float, float] = option((0.75, 1.3333333333), low=0.0, above=True)
    hflip: float = option(0.5, low=0.0, high=1.0)
    color_jitter: float | None = option(0.4, low=0.0)
    auto_augment: str | None = "rand-m9-mstd0.5-inc1"
    interpolation: Literal["bicubic", "bilinear", "nearest", "random"] = "bicubic"
    re_prob: float = option(0.25, low=0.0, high=1.0)
    re_mode: Literal["const", "rand", "pixel"] = "pixel"
    re_count: int = option(1, low=1, high=16)
    mixup: float = option(0.8, low=0.0)
    cutmix: float = option(1.0, low=0.0)
    mixup_prob: float = option(1.0, low=0.0, high=1.0)
    mixup_switch_prob: float = option(0.5, low=0.0, high=1.0)
    mixup_mode: Literal["batch", "pair", "elem"] = "batch"
    label_smoothing: float = option(0.1, low=0.0, high=1.0, below=True)
    # Repeats per image, timm's RepeatAugSampler (3 for CvT-21); 0: off
    repeated_aug: int = option(0, low=0, high=16)


@dataclass(frozen=True)
class OptimSettings:
    """The optimiser and its learning rate (absolute, or scaled from base_lr by the global batch)."""

    opt: str = "adamw"  # timm's names, except sgd: plain momentum; sgd_nesterov: Nesterov (engine.optim)
    lr: float | None = option(None, low=0.0, above=True)  # None: base_lr * global batch / base_batch_size
    base_lr: float = option(2.5e-4, low=0.0, above=True)
    base_batch_size: int = option(256, low=1, high=MAX_BATCH)
    weight_decay: float = option(0.05, low=0.0)
    betas: tuple[float, float] = option((0.9, 0.999), low=0.0, high=1.0, below=True, ordered=False)  # Adam
    eps: float = option(1e-8, low=0.0, above=True)
    momentum: float = option(0.9, low=0.0, high=1.0)  # SGD
    # e.g. 0.75: each block nearer the input learns 0.75x slower
    layer_decay: float | None = option(None, low=0.0, high=1.0, above=True)
    clip_grad: float | None = option(None, low=0.0, above=True)


@dataclass(frozen=True)
class SchedSettings:
    """The learning-rate schedule: warm-up, cosine decay, cool-down at min_lr."""

    # step: the LR moves every optimizer step; epoch: once per epoch (the official code)
    interval: Literal["epoch", "step"] = "step"
    name: Literal["cosine"] = "cosine"
    warmup_epochs: float = option(5, low=0.0)
    warmup_lr: float = option(1e-6, low=0.0)
    min_lr: float = option(1e-5, low=0.0)
    # The last epochs run at min_lr; they count within train.epochs
    cooldown_epochs: int = option(10, low=0, high=MAX_EPOCHS)
    # The warm-up of a run counted in steps (train.steps)
    warmup_steps: int | None = option(None, low=0, high=MAX_STEPS)


@dataclass(frozen=True)
class TrainSettings:
    """The run: length, batch, precision, averaging, seed, device, checkpoints and logging."""

    epochs: int = option(300, low=1, high=MAX_EPOCHS)  # not used when train.steps is set
    # The run's length in optimizer steps (the paper's transfer protocol) instead of epochs: the schedule
    # runs over these steps and the run stops after the last, mid-epoch if need be.
    steps: int | None = option(None, low=1, high=MAX_STEPS)
    batch_size: int = option(256, low=1, high=MAX_BATCH)  # images per step on each process
    # Images per step over all processes, whatever their number: each process takes global_batch / N
    # (train.batch_size is then not used).
    global_batch: int | None = option(None, low=1, high=MAX_BATCH)
    output: str | None = None  # None: a fresh folder runs/DATA-MODEL-TIMESTAMP (see with_run_folder)
    amp: Precision = "none"  # bf16, or fp16 (with loss scaling)
    val_amp: Precision | None = None  # validation precision; None: as train.amp
    ema: bool = False
    ema_decay: float = option(0.99996, low=0.0, high=1.0, above=True, below=True)
    seed: int = option(0, low=0, high=MAX_SEED)
    deterministic: bool = False
    device: str = option("auto", check=_device)
    # Also rewrite last.pth every N steps (mid-epoch resume)
    checkpoint_every_steps: int = option(0, low=0, high=MAX_STEPS)
    log_every_steps: int = option(50, low=1, high=MAX_STEPS)
    quiet: bool = False
    resume: str | None = None  # a checkpoint path; by default last.pth in the output folder when present
    auto_resume: bool = True


@dataclass(frozen=True)
class TrainConfig:
    """One training run. Every value is checked when the config is made (a ValueError naming the key),
    before any data or model is touched."""

    model: ModelSettings = ModelSettings()
    data: DataSettings = DataSettings()
    aug: AugSettings = AugSettings()
    optim: OptimSettings = OptimSettings()
    sched: SchedSettings = SchedSettings()
    train: TrainSettings = TrainSettings()

    def __post_init__(self) -> None:
        for section in dataclasses.fields(self):
            object.__setattr__(self, section.name, check_fields(getattr(self, section.name), section.name))
        m, s, t = self.model, self.sched, self.train
        try:
            variant_config(m.name, **m.overrides)
        except (TypeError, ValueError) as error:
            raise TorchcvtError(
                f"model.name={shown(m.name)} with model.overrides {shown(m.overrides)}: {error}") from None
        _check_weights(m)
        if t.steps is not None:
            _check_steps(s, t)
            _check_recipe(self.aug)
            return
        if s.warmup_steps is not None:
            raise TorchcvtError(
                f"sched.warmup_steps={s.warmup_steps} needs a run counted in steps (train.steps); "
                "an epoch-counted run warms up over sched.warmup_epochs"
            )
        decay_epochs = t.epochs - s.cooldown_epochs
        if decay_epochs < 1:
            raise TorchcvtError(
                f"train.epochs={t.epochs} must exceed sched.cooldown_epochs={s.cooldown_epochs}")
        if s.warmup_epochs >= decay_epochs:
            raise TorchcvtError(
                f"sched.warmup_epochs={s.warmup_epochs} must be less than train.epochs - "
                f"sched.cooldown_epochs = {decay_epochs}, or the learning rate never decays"
            )
        _check_recipe(self.aug)

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], origin: str | None = None) -> TrainConfig:
        """From nested sections as in a YAML file (or to_dict); keys not given keep the defaults."""
        return from_mapping(cls, data, origin)

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dicts and lists, as a YAML file would hold them."""
        return to_dict(self)

    def override(self, values: Mapping[str, Any], origin: str = "the command line") -> TrainConfig:
        """A copy with dotted keys set ({'train.epochs': 10, 'model.overrides.depth': [1, 1, 1]})."""
        tree = self.to_dict()
        for key, value in values.items():
            set_path(TrainConfig, tree, key, value, origin)
        return build(TrainConfig, tree)


def as_train_config(cfg: TrainConfig | Mapping[str, Any]) -> TrainConfig:
    """cfg itself, or a TrainConfig made from a plain mapping of sections."""
    return cfg if isinstance(cfg, TrainConfig) else TrainConfig.from_mapping(cfg, "the given config")


def _check_weights(m: ModelSettings) -> None:
    """One-line errors for starting weights given twice, by a tag where a file is expected, or not at all."""
    from .starting import released_tags, tag_architecture

    if m.pretrained is not None and m.checkpoint is not None:
        raise TorchcvtError(
            f"model.pretrained={m.pretrained} and model.checkpoint={m.checkpoint} both name starting "
            "weights; give one"
        )
    if m.pretrained is not None:
        architecture = tag_architecture(m.pretrained)
        if architecture != m.name:
            raise TorchcvtError(
                f"model.pretrained={m.pretrained} holds {architecture} weights but model.name is {m.name}: "
                f"set model.name={architecture} (--pretrained sets both)"
            )
    if m.checkpoint is not None and not Path(m.checkpoint).exists() and m.checkpoint in released_tags():
        raise TorchcvtError(
            f"model.checkpoint={m.checkpoint} is a released-weights tag, not a file: use "
            f"model.pretrained={m.checkpoint} (--pretrained {m.checkpoint} on the command line)"
        )
    if m.require_weights and m.pretrained is None and m.checkpoint is None:
        raise TorchcvtError(
            "this recipe fine-tunes (model.require_weights) but no starting weights are given: add "
            "--pretrained TAG (e.g. cvt_13_384.ms_in22k_ft_in1k) or model.checkpoint=PATH"
        )


def _check_steps(s: SchedSettings, t: TrainSettings) -> None:
    """A run counted in steps: its warm-up in steps, its LR moved every step, no epoch-counted cool-down."""
    if s.warmup_steps is None:
        raise TorchcvtError(
            f"train.steps={t.steps} counts the run in steps: give its warm-up as sched.warmup_steps "
            "(sched.warmup_epochs counts epochs)"
        )
    if s.warmup_steps >= t.steps:
        raise TorchcvtError(
            f"sched.warmup_steps={s.warmup_steps} must be less than train.steps={t.steps}, or the "
            "learning rate never decays"
        )
    if s.interval != "step":
        raise TorchcvtError(f"train.steps={t.steps} needs sched.interval=step, got {s.interval!r}")
    if s.cooldown_epochs:
        raise TorchcvtError(
            f"sched.cooldown_epochs={s.cooldown_epochs} counts epochs, which a run of train.steps="
            f"{t.steps} does not: set it to 0"
        )


def per_process_batch(t: TrainSettings, world_size: int) -> int:
    """Images per step on each of world_size processes: global_batch / world_size, or train.batch_size."""
    if t.global_batch is None:
        return t.batch_size
    if t.global_batch % world_size:
        raise TorchcvtError(
            f"train.global_batch={t.global_batch} does not divide among {world_size} processes: run on a "
            "number of processes that divides it, or change train.global_batch"
        )
    return t.global_batch // world_size


def _check_recipe(aug: AugSettings) -> None:
    """One-line errors for settings the torchvision augmentation pipeline would silently drop."""
    if aug.pipeline != "torchvision":
        return
    # The plain pipeline crops, flips and normalizes; a timm-only setting would be silently dropped.
    for key in ("auto_augment", "color_jitter", "re_prob"):
        value = getattr(aug, key)
        if value:
            raise TorchcvtError(
                f"aug.{key}={value!r} needs aug.pipeline=timm (the torchvision pipeline only crops, "
                "flips and normalizes)"
            )
    modes = ("bilinear", "bicubic", "nearest")
    if aug.interpolation not in modes:
        raise TorchcvtError(
            f"aug.interpolation must be one of {', '.join(modes)} with aug.pipeline=torchvision, "
            f"got {aug.interpolation!r}"
        )


# Used when neither a config file nor a data folder is given: a small CvT on scikit-learn's digits.
DIGITS_RECIPE: dict[str, Any] = {
    "model": {"name": "cvt_digits"},
    "data": {"workers": 0, "persistent_workers": False, "pin_memory": False},
    "aug": {
        "scale": [0.75, 1.0],
        "ratio": [0.85, 1.18],
        "hflip": 0.0,
        "color_jitter": None,
        "auto_augment": None,
        "re_prob": 0.0,
        "mixup": 0.0,
        "cutmix": 0.0,
        "label_smoothing": 0.1,
    },
    "optim": {"lr": 3e-3, "weight_decay": 0.05},
    "sched": {"warmup_epochs": 2, "min_lr": 1e-5, "cooldown_epochs": 0},
    "train": {"epochs": 30, "batch_size": 64, "log_every_steps": 10},
}


def load_config(
    path: str | Path | None = None,
    overrides: Sequence[str] = (),
    values: Mapping[str, Any] | None = None,
    recipe: Mapping[str, Any] | None = None,
) -> TrainConfig:
    """The defaults, the YAML file, then KEY=VALUE overrides and typed dotted `values`; every value checked.

    recipe (sections, as a file holds them) stands in for a file; with neither a file, a recipe nor
    data.train, the digits recipe does.
    """
    tree = TrainConfig().to_dict()
    settings = [parse_assignment(text) for text in overrides] + list((values or {}).items())
    if path is not None:
        path = Path(path)
        loaded = read_config_file(path) or {}
        if not isinstance(loaded, dict):
            raise TorchcvtError(
                f"config file {path} must hold a mapping of sections, not {type(loaded).__name__}"
            )
        merge(TrainConfig, tree, loaded, str(path))
    elif recipe is not None:
        merge(TrainConfig, tree, recipe, "the chosen recipe")
    elif not any(key == "data.train" for key, _ in settings):
        merge(TrainConfig, tree, DIGITS_RECIPE, "the digits recipe")
    for key, value in settings:
        set_path(TrainConfig, tree, key, value)
    return build(TrainConfig, tree)

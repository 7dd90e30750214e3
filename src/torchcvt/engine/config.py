"""The training configuration: defaults (the paper's CvT-13 recipe), YAML files and KEY=VALUE overrides."""

from __future__ import annotations

import copy
import difflib
import math
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import yaml

from ..config import variant_config

# Every key a config may set, with the paper's CvT-13 recipe as the default. Sizes are per process.
DEFAULTS: dict[str, Any] = {
    "model": {
        "name": "cvt_13",
        "checkpoint": None,  # weights to fine-tune from: anything create_model(checkpoint=...) loads
        "overrides": {},  # CvtConfig fields, e.g. {drop_path_rate: [0.0, 0.0, 0.1]}
        "freeze_stages": 0,  # stages 0..N-1 keep their weights (and BN statistics)
        "sync_bn": False,
    },
    "data": {
        "train": None,  # ImageFolder tree; none given and no config file: the embedded digits
        "val": None,
        "digits_root": None,  # where the digits tree is written; default ~/.cache/torchcvt/digits
        "workers": 4,
        "pin_memory": True,
        "persistent_workers": True,
        "strict": False,  # stop at the first unreadable image instead of skipping it
        "eval_batch_size": None,
    },
    "aug": {
        "enabled": True,
        "pipeline": "timm",  # timm: create_transform; torchvision: crop, flip, normalize (CvT-21-224)
        "scale": [0.08, 1.0],
        "ratio": [0.75, 1.3333333333],
        "hflip": 0.5,
        "color_jitter": 0.4,
        "auto_augment": "rand-m9-mstd0.5-inc1",
        "interpolation": "bicubic",
        "re_prob": 0.25,
        "re_mode": "pixel",
        "re_count": 1,
        "mixup": 0.8,
        "cutmix": 1.0,
        "mixup_prob": 1.0,
        "mixup_switch_prob": 0.5,
        "mixup_mode": "batch",
        "label_smoothing": 0.1,
        "repeated_aug": 0,  # repeats per image with timm's RepeatAugSampler (3 for CvT-21); 0: off
    },
    "optim": {
        "opt": "adamw",
        "lr": None,  # absolute LR; None: base_lr * global batch / base_batch_size
        "base_lr": 2.5e-4,
        "base_batch_size": 256,
        "weight_decay": 0.05,
        "betas": [0.9, 0.999],  # Adam family
        "eps": 1e-8,
        "momentum": 0.9,  # SGD
        "layer_decay": None,  # e.g. 0.75: each block nearer the input learns 0.75x slower
        "clip_grad": None,
    },
    "sched": {
        "interval": "step",  # step: the LR moves every optimizer step; epoch: once per epoch (official)
        "name": "cosine",
        "warmup_epochs": 5,
        "warmup_lr": 1e-6,
        "min_lr": 1e-5,
        "cooldown_epochs": 10,  # the last epochs run at min_lr; they count within train.epochs
    },
    "train": {
        "epochs": 300,
        "batch_size": 256,
        "output": "runs/cvt",
        "amp": "none",  # none, bf16, or fp16 (with loss scaling)
        "val_amp": None,  # validation precision: none, bf16 or fp16; None: as train.amp
        "ema": False,
        "ema_decay": 0.99996,
        "seed": 0,
        "deterministic": False,
        "device": "auto",
        "checkpoint_every_steps": 0,  # also rewrite last.pth every N optimizer steps (mid-epoch resume)
        "log_every_steps": 50,
        "quiet": False,
        "resume": None,  # a checkpoint path; by default last.pth in the output folder when present
        "auto_resume": True,
    },
}

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
    "train": {"epochs": 30, "batch_size": 64, "output": "runs/digits", "log_every_steps": 10},
}

# Keys whose values are free-form mappings (validated elsewhere), so any sub-key may be set.
FREE_FORM = ("model.overrides",)


def _flat_keys(tree: dict[str, Any], prefix: str = "") -> list[str]:
    keys = []
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        keys.append(dotted)
        if isinstance(value, dict) and dotted not in FREE_FORM:
            keys += _flat_keys(value, dotted + ".")
    return keys


def _unknown_key(key: str, origin: str) -> ValueError:
    close = difflib.get_close_matches(key, _flat_keys(DEFAULTS), n=1, cutoff=0.5)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return ValueError(f"unknown config key {key!r} in {origin}{hint}")


def _merge(base: dict[str, Any], update: dict[str, Any], origin: str, prefix: str = "") -> None:
    for key, value in update.items():
        dotted = f"{prefix}{key}"
        if key not in base:
            raise _unknown_key(dotted, origin)
        if isinstance(base[key], dict) and dotted not in FREE_FORM:
            if not isinstance(value, dict):
                raise ValueError(f"config key {dotted!r} in {origin} is a section; got {value!r}")
            _merge(base[key], value, origin, dotted + ".")
        elif dotted in FREE_FORM:
            if value is not None and not isinstance(value, dict):
                raise ValueError(f"config key {dotted!r} in {origin} must be a mapping, got {value!r}")
            base[key] = {**base[key], **(value or {})}
        else:
            base[key] = value


def set_dotted(cfg: dict[str, Any], key: str, value: Any, origin: str = "the command line") -> None:
    """Set cfg['a']['b'] from 'a.b'; an unknown key is an error naming the closest known one."""
    for free in FREE_FORM:
        if key.startswith(free + "."):
            _lookup(cfg, free)[key[len(free) + 1 :]] = value
            return
    node = cfg
    parts = key.split(".")
    for part in parts[:-1]:
        if not isinstance(node.get(part), dict):
            raise _unknown_key(key, origin)
        node = node[part]
    if parts[-1] not in node:
        raise _unknown_key(key, origin)
    if isinstance(node[parts[-1]], dict) and key not in FREE_FORM:
        example = next(iter(node[parts[-1]]))
        raise ValueError(
            f"config key {key!r} in {origin} is a section, not a value; set one of its keys "
            f"(e.g. {key}.{example}=...)"
        )
    node[parts[-1]] = value


def _lookup(cfg: dict[str, Any], dotted: str) -> Any:
    node = cfg
    for part in dotted.split("."):
        node = node[part]
    return node


class _StrictLoader(yaml.SafeLoader):
    """YAML with 1e-6 read as a float (as YAML 1.2 does) and a repeated key an error."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep)


# YAML 1.1 wants a dot and a signed exponent in a float, so it reads 1e-6 and 5e3 as strings.
_StrictLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$"), list("-+0123456789.")
)


def read_yaml(text: str, origin: str) -> Any:
    """Parse YAML text strictly; a syntax error or a repeated key is a one-line ValueError naming origin."""
    try:
        return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise ValueError(f"{origin} is not valid YAML: {problem}{where}") from None


def parse_override(text: str) -> tuple[str, Any]:
    """'optim.lr=1e-3' -> ('optim.lr', 0.001); values are read as YAML."""
    if "=" not in text:
        raise ValueError(f"override {text!r} is not KEY=VALUE (e.g. train.epochs=10)")
    key, raw = text.split("=", 1)
    value = read_yaml(raw, f"the value of override {text!r}") if raw.strip() else None
    return key.strip(), value


def load_config(
    path: str | Path | None = None, overrides: Sequence[str] = (), values: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Defaults, the YAML file, then KEY=VALUE overrides and typed dotted `values`; every value checked.

    With neither a file nor data.train, the digits recipe stands in for the file.
    """
    cfg = copy.deepcopy(DEFAULTS)
    settings = [parse_override(text) for text in overrides] + list((values or {}).items())
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file {path} does not exist")
        loaded = read_yaml(path.read_text(), f"config file {path}") or {}
        if not isinstance(loaded, dict):
            raise ValueError(
                f"config file {path} must hold a mapping of sections, not {type(loaded).__name__}"
            )
        _merge(cfg, loaded, str(path))
    elif not any(key == "data.train" for key, _ in settings):
        _merge(cfg, copy.deepcopy(DIGITS_RECIPE), "the digits recipe")
    for key, value in settings:
        set_dotted(cfg, key, value)
    return validate_config(cfg)


# ----------------------------------------------------------------------------- value checks

Check = Callable[[str, Any], Any]


def _number(kind: str, value: Any) -> bool:
    if isinstance(value, bool):
        return False
    return isinstance(value, int) if kind == "int" else isinstance(value, (int, float))


def integer(low: int | None = None, optional: bool = False) -> Check:
    """An int (not a bool, float or string), at least low."""

    def check(key: str, value: Any) -> Any:
        if value is None and optional:
            return None
        if not _number("int", value):
            raise ValueError(f"{key} must be an integer{' or null' if optional else ''}, got {value!r}")
        if low is not None and value < low:
            raise ValueError(f"{key} must be at least {low}, got {value}")
        return value

    return check


def real(low: float | None = None, high: float | None = None, *, above: bool = False, below: bool = False,
         optional: bool = False) -> Check:
    """A finite number as a float, within [low, high] (`above`/`below`: the bound itself excluded)."""

    def check(key: str, value: Any) -> Any:
        if value is None and optional:
            return None
        if not _number("float", value) or not math.isfinite(value):
            raise ValueError(f"{key} must be a number{' or null' if optional else ''}, got {value!r}")
        if low is not None and (value < low or (above and value == low)):
            raise ValueError(f"{key} must be {'above' if above else 'at least'} {low}, got {value}")
        if high is not None and (value > high or (below and value == high)):
            raise ValueError(f"{key} must be {'below' if below else 'at most'} {high}, got {value}")
        return float(value)

    return check


def flag() -> Check:
    """true or false."""

    def check(key: str, value: Any) -> Any:
        if not isinstance(value, bool):
            raise ValueError(f"{key} must be true or false, got {value!r}")
        return value

    return check


def text(choices: Sequence[str] | None = None, optional: bool = False) -> Check:
    """A string (a path, a name), one of choices when given."""

    def check(key: str, value: Any) -> Any:
        if value is None and optional:
            return None
        if not isinstance(value, str) or (choices is None and not value):
            null = " or null" if optional else ""
            raise ValueError(f"{key} must be a non-empty string{null}, got {value!r}")
        if choices is not None and value not in choices:
            null = " or null" if optional else ""
            raise ValueError(f"{key} must be one of {', '.join(choices)}{null}, got {value!r}")
        return value

    return check


def pair(item: Check, ordered: bool = True) -> Check:
    """A list of two numbers, each passing item (and low <= high when ordered)."""

    def check(key: str, value: Any) -> Any:
        if not isinstance(value, (list, tuple)) or len(value) != 2:
            raise ValueError(f"{key} must be a list of two numbers, got {value!r}")
        low, high = (item(f"{key}[{i}]", v) for i, v in enumerate(value))
        if ordered and low > high:
            raise ValueError(f"{key} must be [low, high] with low <= high, got {list(value)!r}")
        return [low, high]

    return check


def mapping() -> Check:
    """A mapping with string keys (checked further by whoever reads it)."""

    def check(key: str, value: Any) -> Any:
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise ValueError(f"{key} must be a mapping of model config fields, got {value!r}")
        return value

    return check


def device() -> Check:
    """auto, cpu, cuda, cuda:N or another device torch knows and this machine has."""

    def check(key: str, value: Any) -> Any:
        from ..checks import resolve_device

        text()(key, value)
        resolve_device(value, key)
        return value

    return check


# One check per key: every value is typed and in range when load_config returns.
SCHEMA: dict[str, Check] = {
    "model.name": text(),
    "model.checkpoint": text(optional=True),
    "model.overrides": mapping(),
    "model.freeze_stages": integer(0),
    "model.sync_bn": flag(),
    "data.train": text(optional=True),
    "data.val": text(optional=True),
    "data.digits_root": text(optional=True),
    "data.workers": integer(0),
    "data.pin_memory": flag(),
    "data.persistent_workers": flag(),
    "data.strict": flag(),
    "data.eval_batch_size": integer(1, optional=True),
    "aug.enabled": flag(),
    "aug.scale": pair(real(0.0, 1.0, above=True)),
    "aug.ratio": pair(real(0.0, above=True)),
    "aug.hflip": real(0.0, 1.0),
    "aug.color_jitter": real(0.0, optional=True),
    "aug.auto_augment": text(optional=True),
    "aug.interpolation": text(("bicubic", "bilinear", "nearest", "random")),
    "aug.re_prob": real(0.0, 1.0),
    "aug.re_mode": text(("const", "rand", "pixel")),
    "aug.re_count": integer(1),
    "aug.mixup": real(0.0),
    "aug.cutmix": real(0.0),
    "aug.mixup_prob": real(0.0, 1.0),
    "aug.mixup_switch_prob": real(0.0, 1.0),
    "aug.mixup_mode": text(("batch", "pair", "elem")),
    "aug.label_smoothing": real(0.0, 1.0, below=True),
    "aug.repeated_aug": integer(0),
    "aug.pipeline": text(("timm", "torchvision")),
    "optim.opt": text(),
    "optim.lr": real(0.0, above=True, optional=True),
    "optim.base_lr": real(0.0, above=True),
    "optim.base_batch_size": integer(1),
    "optim.weight_decay": real(0.0),
    "optim.betas": pair(real(0.0, 1.0, below=True), ordered=False),
    "optim.eps": real(0.0, above=True),
    "optim.momentum": real(0.0, 1.0),
    "optim.layer_decay": real(0.0, 1.0, above=True, optional=True),
    "optim.clip_grad": real(0.0, above=True, optional=True),
    "sched.name": text(("cosine",)),
    "sched.warmup_epochs": real(0.0),
    "sched.warmup_lr": real(0.0),
    "sched.min_lr": real(0.0),
    "sched.cooldown_epochs": integer(0),
    "sched.interval": text(("epoch", "step")),
    "train.epochs": integer(1),
    "train.batch_size": integer(1),
    "train.output": text(),
    "train.amp": text(("none", "bf16", "fp16")),
    "train.val_amp": text(("none", "bf16", "fp16"), optional=True),
    "train.ema": flag(),
    "train.ema_decay": real(0.0, 1.0, above=True, below=True),
    "train.seed": integer(0),
    "train.deterministic": flag(),
    "train.device": device(),
    "train.checkpoint_every_steps": integer(0),
    "train.log_every_steps": integer(1),
    "train.quiet": flag(),
    "train.resume": text(optional=True),
    "train.auto_resume": flag(),
}


def validate_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """Check (and normalise: ints as floats where a float is meant) every value of cfg in place; returns cfg.

    A ValueError names the first wrong key and its value; nothing heavy (data, model) runs before this.
    """
    for key, check in SCHEMA.items():
        section, name = key.split(".")
        cfg[section][name] = check(key, cfg[section][name])
    m, s, t = cfg["model"], cfg["sched"], cfg["train"]
    try:
        variant_config(m["name"], **m["overrides"])
    except (TypeError, ValueError) as error:
        raise ValueError(f"model.name={m['name']!r} with model.overrides {m['overrides']}: {error}") from None
    decay_epochs = t["epochs"] - s["cooldown_epochs"]
    if decay_epochs < 1:
        raise ValueError(
            f"train.epochs={t['epochs']} must exceed sched.cooldown_epochs={s['cooldown_epochs']}"
        )
    if s["warmup_epochs"] >= decay_epochs:
        raise ValueError(
            f"sched.warmup_epochs={s['warmup_epochs']} must be less than train.epochs - "
            f"sched.cooldown_epochs = {decay_epochs}, or the learning rate never decays"
        )
    check_recipe(cfg)
    return cfg


def _one_of(key: str, value: Any, choices: Sequence[str], note: str = "") -> None:
    if value not in choices:
        raise ValueError(f"{key} must be one of {', '.join(choices)}{note}, got {value!r}")


def check_recipe(cfg: dict[str, Any]) -> None:
    """One-line errors for settings the torchvision augmentation pipeline would silently drop."""
    a = cfg["aug"]
    if a["pipeline"] == "torchvision":
        # The plain pipeline crops, flips and normalizes; a timm-only setting would be silently dropped.
        for key in ("auto_augment", "color_jitter", "re_prob"):
            if a[key]:
                raise ValueError(
                    f"aug.{key}={a[key]!r} needs aug.pipeline=timm (the torchvision pipeline only crops, "
                    "flips and normalizes)"
                )
        modes = ("bilinear", "bicubic", "nearest")
        _one_of("aug.interpolation", a["interpolation"], modes, " with aug.pipeline=torchvision")

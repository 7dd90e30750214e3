"""The training configuration: defaults (the paper's CvT-13 recipe), YAML files and KEY=VALUE overrides."""

from __future__ import annotations

import copy
import difflib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

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
    if parts[-1] not in node or (isinstance(node[parts[-1]], dict) and key not in FREE_FORM):
        raise _unknown_key(key, origin)
    node[parts[-1]] = value


def _lookup(cfg: dict[str, Any], dotted: str) -> Any:
    node = cfg
    for part in dotted.split("."):
        node = node[part]
    return node


def parse_override(text: str) -> tuple[str, Any]:
    """'optim.lr=1e-3' -> ('optim.lr', 0.001); values are read as YAML."""
    if "=" not in text:
        raise ValueError(f"override {text!r} is not KEY=VALUE (e.g. train.epochs=10)")
    key, raw = text.split("=", 1)
    value = yaml.safe_load(raw) if raw.strip() else None
    if isinstance(value, str):
        try:
            value = float(value)  # YAML 1.1 reads 1e-3 (no dot) as a string
        except ValueError:
            pass
    return key.strip(), value


def load_config(
    path: str | Path | None = None, overrides: Sequence[str] = (), values: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Defaults, the YAML file, then KEY=VALUE overrides and typed dotted `values`.

    With neither a file nor data.train, the digits recipe stands in for the file.
    """
    cfg = copy.deepcopy(DEFAULTS)
    settings = [parse_override(text) for text in overrides] + list((values or {}).items())
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file {path} does not exist")
        loaded = yaml.safe_load(path.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ValueError(
                f"config file {path} must hold a mapping of sections, not {type(loaded).__name__}"
            )
        _merge(cfg, loaded, str(path))
    elif not any(key == "data.train" for key, _ in settings):
        _merge(cfg, copy.deepcopy(DIGITS_RECIPE), "the digits recipe")
    for key, value in settings:
        set_dotted(cfg, key, value)
    return cfg

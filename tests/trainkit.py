"""Shared test helpers: small real ImageFolder trees, tiny run configs, weights that every tensor moves, and
the plain path forced."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils._python_dispatch import TorchDispatchMode

TINY_MODEL = {"embed_dim": [16, 24, 32], "num_heads": [1, 1, 2], "depth": [1, 1, 1]}


def digits_tree(
    root: Path,
    classes: int = 3,
    train_per_class: int = 8,
    val_per_class: int = 4,
    labels: list[int] | None = None,
) -> Path:
    """root/{train,val}/<digit>/<n>.png from scikit-learn's digits (digits 0..classes-1, or `labels`), 32x32
    grey PNGs."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    for label in range(classes) if labels is None else labels:
        indices = np.flatnonzero(digits.target == label)[: train_per_class + val_per_class]
        for n, i in enumerate(indices):
            folder = root / ("train" if n < train_per_class else "val") / str(label)
            folder.mkdir(parents=True, exist_ok=True)
            pixels = (digits.images[i] * 255 / 16).astype(np.uint8)
            Image.fromarray(pixels, mode="L").resize((32, 32), Image.BICUBIC).save(folder / f"{i}.png")
    return root


def tiny_overrides(data: Path, output: Path, **extra: object) -> list[str]:
    """KEY=VALUE overrides for a fast deterministic CPU run of a tiny cvt_digits."""
    values = {
        "model.name": "cvt_digits",
        "model.overrides": TINY_MODEL,
        "data.train": str(data / "train"),
        "data.val": str(data / "val"),
        "data.workers": 0,
        "aug.auto_augment": None,
        "aug.mixup": 0.0,
        "aug.cutmix": 0.0,
        "aug.re_prob": 0.0,
        "optim.lr": 2e-3,
        "sched.warmup_epochs": 0,
        "sched.cooldown_epochs": 0,
        "train.epochs": 2,
        "train.batch_size": 4,
        "train.output": str(output),
        "train.quiet": True,
        "train.log_every_steps": 2,
        **extra,
    }
    import json

    return [f"{key}={json.dumps(value)}" for key, value in values.items()]


def train_on_one_thread(overrides: list[str]) -> dict:
    """torchcvt.engine.train of these overrides on one intra-op thread, as the subprocess tests run;
    the thread count is restored after."""
    from torchcvt.engine import load_config, train

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return train(load_config(None, overrides))
    finally:
        torch.set_num_threads(threads)


def add_unreadable_image(folder: Path, name: str = "broken.png") -> Path:
    """A PNG cut short after its header: ImageFolder lists it, decoding it fails."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    Image.new("L", (32, 32), 128).save(path)
    path.write_bytes(path.read_bytes()[:40])
    return path


def train_process(overrides: list[str], *args: str, **popen: object):
    """`torchcvt train` on one thread as a real subprocess, with this checkout's src first: the entry point
    the console script runs (torchcvt_launcher), which holds a Ctrl-C while torch loads."""
    import os
    import subprocess
    import sys

    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src"),
    }
    command = [sys.executable, "-m", "torchcvt_launcher", "train", *args, *overrides]
    return subprocess.Popen(command, env=env, **popen)


@torch.no_grad()
def perturb_weights(model: torch.nn.Module) -> torch.nn.Module:
    """In place: noise on every weight and random BatchNorm statistics, so every tensor moves the outputs."""
    for param in model.parameters():
        param.add_(torch.randn_like(param) * 0.1)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.normal_(0.0, 0.2)
            module.running_var.uniform_(0.5, 1.5)
    return model


class PlainOps(TorchDispatchMode):
    """Passes every op through unchanged; its presence makes torchcvt.layers take the plain path, the one that
    tracing, torch.compile and GPUs run."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))

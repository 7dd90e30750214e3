"""Training and evaluation: the CvT paper's recipe from timm pieces, one code path for 1 to N processes.

`train(config) -> summary` runs a whole experiment; `evaluate_checkpoint(...)` scores a checkpoint on
an ImageFolder tree. Under torchrun every process runs the same code; rank 0 alone logs and saves.
"""

from __future__ import annotations

import copy
import difflib
import json
import math
import os
import random
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import yaml
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler

from .checkpoints import read_checkpoint as read_model_checkpoint
from .config import CvtConfig, get_variant, variant_config
from .data import (
    ImageFolder,
    SeededSampler,
    ShardSampler,
    collate_skipping_bad,
    eval_transform,
    list_classes,
    train_transform,
    write_digits,
)
from .factory import create_model
from .model import CvT

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


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


# ----------------------------------------------------------------------------- configuration


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


# ----------------------------------------------------------------------------- distributed set-up


@dataclass
class Runtime:
    """Where this process runs: its rank among world_size processes and its device."""

    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_runtime(device: str = "auto") -> Runtime:
    """Join the torchrun process group when launched by torchrun (NCCL on GPUs, Gloo on CPU)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() if device == "auto" else device.startswith("cuda")
    chosen = torch.device(
        f"cuda:{local_rank}"
        if use_cuda and device in ("auto", "cuda")
        else (device if device != "auto" else "cpu")
    )
    if world_size > 1 and not dist.is_initialized():
        if chosen.type == "cuda":
            torch.cuda.set_device(chosen)
        dist.init_process_group("nccl" if chosen.type == "cuda" else "gloo")
    return Runtime(rank, world_size, chosen)


def _all_reduce(values: Sequence[float], runtime: Runtime) -> list[float]:
    tensor = torch.tensor(list(values), dtype=torch.float64)
    if runtime.distributed:
        tensor = tensor.to(runtime.device)
        dist.all_reduce(tensor)
    return tensor.cpu().tolist()


# ----------------------------------------------------------------------------- checkpoints


def save_checkpoint(state: dict[str, Any], path: str | Path) -> None:
    """Write atomically: a temporary file in the same folder, fsync, then rename over the old one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as handle:
            torch.save(state, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """A torchcvt checkpoint dict (tensors and plain data only, so weights_only loading works)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    return torch.load(path, map_location="cpu", weights_only=True)


ARCHITECTURE_FIELDS = (
    "num_channels",
    "patch_sizes",
    "patch_stride",
    "patch_padding",
    "embed_dim",
    "num_heads",
    "depth",
    "mlp_ratio",
    "qkv_bias",
    "cls_token",
    "qkv_projection_method",
    "kernel_qkv",
    "padding_kv",
    "stride_kv",
    "padding_q",
    "stride_q",
    "position_embedding",
    "token_embedding",
    "activation",
)


def check_same_architecture(
    checkpoint: dict[str, Any], config: CvtConfig, name: str, path: str | Path
) -> None:
    """One-line error when a torchcvt checkpoint holds another variant than the model being built."""
    saved = checkpoint.get("config")
    if not isinstance(saved, dict):
        return
    ours = config.to_dict()
    differing = [f for f in ARCHITECTURE_FIELDS if f in saved and list_or_value(saved[f]) != ours[f]]
    if differing:
        field = differing[0]
        raise ValueError(
            f"checkpoint {path} holds a {checkpoint.get('model_name', 'different model')} whose {field} is "
            f"{saved[field]} but this run builds {name} with {field} {ours[field]}"
        )


def list_or_value(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def _rng_state() -> dict[str, Any]:
    numpy_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "keys": torch.from_numpy(numpy_state[1].astype(np.int64)),
            "pos": int(numpy_state[2]),
            "has_gauss": int(numpy_state[3]),
            "gauss": float(numpy_state[4]),
        },
        "python": torch.tensor(random.getstate()[1], dtype=torch.int64),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(
        ("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"])
    )
    random.setstate((3, tuple(state["python"].tolist()), None))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# ----------------------------------------------------------------------------- optimizer


def _layer_ids(model: CvT) -> tuple[dict[str, int], int]:
    """Depth of every parameter for layer-wise LR decay: token embedding and each block one layer."""
    ids, layer = {}, 0
    for i, stage in enumerate(model.stages):
        for name, _ in stage.named_parameters():
            if not name.startswith("blocks."):
                ids[f"stage{i}.{name}"] = layer
        layer += 1
        for b, block in enumerate(stage.blocks):
            for name, _ in block.named_parameters():
                ids[f"stage{i}.blocks.{b}.{name}"] = layer
            layer += 1
    return ids, layer + 1


def param_groups(model: CvT, weight_decay: float, layer_decay: float | None = None) -> list[dict[str, Any]]:
    """Trainable parameters grouped by weight decay (none on norms, biases, tokens) and LR scale."""
    skip = model.no_weight_decay()
    ids, num_layers = _layer_ids(model)
    groups: dict[tuple[bool, int], dict[str, Any]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        no_decay = param.ndim <= 1 or name.endswith(".bias") or name in skip
        layer = ids.get(name, num_layers - 1)
        key = (no_decay, layer if layer_decay else 0)
        if key not in groups:
            scale = layer_decay ** (num_layers - 1 - layer) if layer_decay else 1.0
            groups[key] = {"params": [], "weight_decay": 0.0 if no_decay else weight_decay, "lr_scale": scale}
        groups[key]["params"].append(param)
    return [groups[key] for key in sorted(groups)]


def freeze_stages(model: CvT, count: int) -> None:
    """Stop gradients to the first `count` stages (their BN layers are kept in eval mode by the loop)."""
    if count > model.config.num_stages:
        raise ValueError(f"model.freeze_stages={count} but the model has {model.config.num_stages} stages")
    for stage in model.stages[:count]:
        stage.requires_grad_(False)


# ----------------------------------------------------------------------------- progress and logs


class Progress:
    """A tqdm bar per epoch on a terminal; plain log lines otherwise or with quiet."""

    def __init__(self, enabled: bool, quiet: bool, every: int):
        self.enabled = enabled
        self.bar_mode = enabled and not quiet and sys.stderr.isatty()
        self.every = max(1, every)
        self.bar = None

    def start(self, epoch: int, epochs: int, total: int, initial: int) -> None:
        self.epoch, self.epochs, self.total, self.started = epoch, epochs, total, time.perf_counter()
        self.initial = initial
        if self.bar_mode:
            from tqdm import tqdm

            self.bar = tqdm(
                total=total,
                initial=initial,
                desc=f"epoch {epoch + 1}/{epochs}",
                unit="step",
                dynamic_ncols=True,
                leave=False,
            )

    def update(self, step: int, loss: float, lr: float, images_per_second: float) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(
                loss=f"{loss:.4f}", lr=f"{lr:.2e}", img_s=f"{images_per_second:.0f}", refresh=False
            )
        elif step % self.every == 0 or step == self.total:
            done = step - self.initial
            eta = (time.perf_counter() - self.started) / max(done, 1) * (self.total - step)
            print(
                f"epoch {self.epoch + 1}/{self.epochs} step {step}/{self.total} loss {loss:.4f} lr {lr:.3e} "
                f"{images_per_second:.0f} img/s eta {_clock(eta)}",
                flush=True,
            )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def log(self, text: str) -> None:
        if self.enabled:
            (self.bar.write if self.bar is not None else print)(text)
            sys.stdout.flush()


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class MetricsLog:
    """metrics.jsonl plus TensorBoard scalars; on resume, records after the checkpoint's step are dropped."""

    def __init__(self, output: Path, resume_step: int | None):
        self.path = output / "metrics.jsonl"
        records = self.read(self.path) if resume_step is not None and self.path.exists() else []
        kept = [r for r in records if r["step"] <= resume_step] if resume_step is not None else []
        self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(output / "tensorboard"), purge_step=resume_step)

    @staticmethod
    def read(path: Path) -> list[dict[str, Any]]:
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def write(self, record: dict[str, Any]) -> None:
        with open(self.path, "a") as handle:
            handle.write(json.dumps(record) + "\n")
        for key, value in record.items():
            if key not in ("step", "epoch", "kind") and isinstance(value, (int, float)):
                self.writer.add_scalar(f"{record['kind']}/{key}", value, record["step"])

    def close(self) -> None:
        self.writer.close()


def plot_curves(metrics_path: Path, out_path: Path) -> None:
    """Training loss and LR per step, validation top-1 and loss per epoch, as one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = MetricsLog.read(metrics_path)
    train = [r for r in records if r["kind"] == "train"]
    val = [r for r in records if r["kind"] == "val"]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    axes[0].plot([r["step"] for r in train], [r["loss"] for r in train], label="train")
    axes[0].plot([r["step"] for r in val], [r["loss"] for r in val], "o-", label="val")
    axes[0].set(title="loss", xlabel="step")
    axes[0].legend()
    axes[1].plot([r["epoch"] for r in val], [100 * r["top1"] for r in val], "o-", label="top-1")
    axes[1].plot([r["epoch"] for r in val], [100 * r["top5"] for r in val], "o-", label="top-5")
    axes[1].set(title="validation accuracy (%)", xlabel="epoch")
    axes[1].legend()
    axes[2].plot([r["step"] for r in train], [r["lr"] for r in train])
    axes[2].set(title="learning rate", xlabel="step")
    fig.tight_layout()
    fig.savefig(out_path, dpi=100)
    plt.close(fig)


# ----------------------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: Iterable,
    device: torch.device,
    num_classes: int,
    runtime: Runtime | None = None,
    amp_dtype: torch.dtype | None = None,
    real_labels: Any = None,
    confusion: bool = False,
) -> dict[str, Any]:
    """Top-1, top-5 and mean cross-entropy over the loader, summed over ranks; optional confusion matrix."""
    model.eval()
    totals = torch.zeros(4, dtype=torch.float64)  # correct@1, correct@5, loss sum, count
    matrix = torch.zeros(num_classes, num_classes, dtype=torch.int64) if confusion else None
    skipped: list[str] = []
    for images, targets, bad in loader:
        skipped += [b.path for b in bad]
        images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            logits = model(images)
        logits = logits.float()
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        hits = top.eq(targets[:, None])
        totals += torch.tensor(
            [
                hits[:, 0].sum().item(),
                hits.any(1).sum().item(),
                nn.functional.cross_entropy(logits, targets, reduction="sum").item(),
                len(targets),
            ],
            dtype=torch.float64,
        )
        if matrix is not None:
            matrix += torch.bincount(
                targets.cpu() * num_classes + top[:, 0].cpu(), minlength=num_classes**2
            ).view(num_classes, num_classes)
        if real_labels is not None:
            real_labels.add_result(logits.cpu())
    correct1, correct5, loss_sum, count = _all_reduce(totals.tolist(), runtime or Runtime(0, 1, device))
    result = {
        "top1": correct1 / count,
        "top5": correct5 / count,
        "loss": loss_sum / count,
        "images": int(count),
        "skipped_images": skipped,
    }
    if matrix is not None:
        result["confusion"] = matrix
    if real_labels is not None:
        result["real_top1"] = real_labels.get_accuracy(1) / 100
        result["real_top5"] = real_labels.get_accuracy(max(real_labels.topk)) / 100
    return result


def _loader_kwargs(data: dict[str, Any], device: torch.device) -> dict[str, Any]:
    workers = int(data["workers"])
    return {
        "num_workers": workers,
        "pin_memory": bool(data["pin_memory"]) and device.type == "cuda",
        "persistent_workers": bool(data["persistent_workers"]) and workers > 0,
        "collate_fn": collate_skipping_bad,
    }


def plot_confusion(matrix: torch.Tensor, class_names: Sequence[str], out_path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(class_names)
    size = max(5.0, min(30.0, 0.3 * n + 3))
    fig, ax = plt.subplots(figsize=(size, size))
    rows = matrix.float() / matrix.sum(1, keepdim=True).clamp(min=1)
    ax.imshow(rows.numpy(), cmap="Blues", vmin=0, vmax=1)
    ax.set(
        xticks=range(n),
        yticks=range(n),
        xlabel="predicted",
        ylabel="true",
        title="confusion (row-normalised)",
    )
    ax.set_xticklabels(class_names, rotation=90, fontsize=max(4, 10 - n // 15))
    ax.set_yticklabels(class_names, fontsize=max(4, 10 - n // 15))
    if n <= 20:
        for i in range(n):
            for j in range(n):
                if matrix[i, j]:
                    ax.text(
                        j,
                        i,
                        int(matrix[i, j]),
                        ha="center",
                        va="center",
                        fontsize=8,
                        color="white" if rows[i, j] > 0.5 else "black",
                    )
    fig.tight_layout()
    fig.savefig(out_path, dpi=100)
    plt.close(fig)


def evaluate_checkpoint(
    model_name: str,
    checkpoint: str | Path,
    data: str | Path,
    *,
    output: str | Path | None = None,
    batch_size: int = 64,
    workers: int = 2,
    real_labels: str | Path | None = None,
    device: str = "auto",
) -> dict[str, Any]:
    """Score a checkpoint on an ImageFolder tree with the checkpoint's own class list; write a JSON report.

    The report goes to output (default: next to the checkpoint) as eval_<data>.json, with a
    confusion-matrix PNG for up to 100 classes.
    """
    checkpoint = Path(checkpoint)
    get_variant(model_name)
    # Any format create_model loads, read once: class list, architecture and weights come from it.
    stored = read_model_checkpoint(checkpoint)
    class_names = list(stored.class_names) if stored.class_names else list_classes(data)
    overrides = {}
    if stored.config is not None:
        saved = {"config": stored.config, "model_name": stored.architecture or model_name}
        if saved["model_name"] != model_name:
            check_same_architecture(saved, variant_config(model_name), model_name, checkpoint)
        overrides = {k: v for k, v in stored.config.items() if k in ARCHITECTURE_FIELDS}
    runtime = init_runtime(device)
    model = create_model(model_name, num_classes=len(class_names), checkpoint=stored, **overrides)
    del stored
    model.to(runtime.device)
    data_config = model.pretrained_cfg
    dataset = ImageFolder(data, eval_transform(data_config), class_names=class_names)
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        **_loader_kwargs(
            {"workers": workers, "pin_memory": True, "persistent_workers": False}, runtime.device
        ),
    )
    real = None
    if real_labels is not None:
        if not Path(real_labels).is_file():
            raise FileNotFoundError(f"ImageNet-ReaL labels file {real_labels} does not exist")
        from timm.data import RealLabelsImagenet

        real = RealLabelsImagenet(
            [path for path, _ in dataset.samples],
            real_json=str(real_labels),
            topk=(1, min(5, len(class_names))),
        )
    confusion = len(class_names) <= 100
    result = evaluate(model, loader, runtime.device, len(class_names), real_labels=real, confusion=confusion)
    out_dir = Path(output) if output is not None else checkpoint.parent
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"eval_{Path(data).resolve().name}"
    report = {
        "model": model_name,
        "checkpoint": str(checkpoint),
        "data": str(data),
        "classes": len(class_names),
        **{k: v for k, v in result.items() if k != "confusion"},
    }
    if confusion:
        matrix = result["confusion"]
        report["per_class_top1"] = {
            name: (matrix[i, i] / matrix[i].sum()).item()
            for i, name in enumerate(class_names)
            if matrix[i].sum()
        }
        report["confusion_png"] = str(out_dir / f"{stem}_confusion.png")
        plot_confusion(matrix, class_names, Path(report["confusion_png"]))
    report["report_json"] = str(out_dir / f"{stem}.json")
    Path(report["report_json"]).write_text(json.dumps(report, indent=2))
    return report


# ----------------------------------------------------------------------------- training


class Trainer:
    """Everything one training run holds; built (and every input checked) before the first step."""

    def __init__(self, cfg: dict[str, Any], runtime: Runtime):
        self.cfg, self.runtime = cfg, runtime
        t = cfg["train"]
        self.output = Path(t["output"])
        if runtime.is_main:
            self.output.mkdir(parents=True, exist_ok=True)
        if t["deterministic"]:
            torch.use_deterministic_algorithms(True)
            torch.backends.cudnn.benchmark = False
        elif runtime.device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        self._seed(int(t["seed"]))
        self.train_dir, self.val_dir = self._data_folders()
        self.class_names = list_classes(self.train_dir)
        val_classes = list_classes(self.val_dir)
        if val_classes != self.class_names:
            missing = sorted(set(self.class_names) - set(val_classes))
            extra = sorted(set(val_classes) - set(self.class_names))
            raise ValueError(
                f"val classes differ from train's ({len(val_classes)} in {self.val_dir}, "
                f"{len(self.class_names)} "
                f"in {self.train_dir}): missing from val {missing[:5]}, not in train {extra[:5]}"
            )
        self.model = self._build_model()
        data_config = self.model.pretrained_cfg
        self.train_set = ImageFolder(
            self.train_dir, train_transform(cfg["aug"], data_config), self.class_names
        )
        self.val_set = ImageFolder(self.val_dir, eval_transform(data_config), self.class_names)
        self.batch_size = int(t["batch_size"])
        per_rank = math.ceil(len(self.train_set) / runtime.world_size)
        if self.batch_size < 1 or self.batch_size > per_rank:
            raise ValueError(
                f"train.batch_size={self.batch_size} is larger than the {per_rank} training images each of "
                f"{runtime.world_size} process(es) gets from {self.train_dir} ({len(self.train_set)} in all)"
                if self.batch_size > per_rank
                else f"train.batch_size must be positive, got {self.batch_size}"
            )
        self.global_batch = self.batch_size * runtime.world_size
        self._build_loaders()
        self._build_optimization()

    def _seed(self, seed: int) -> None:
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)

    def _data_folders(self) -> tuple[Path, Path]:
        d = self.cfg["data"]
        if d["train"] is None:
            cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
            root = Path(d["digits_root"]) if d["digits_root"] else cache / "torchcvt" / "digits"
            if self.runtime.is_main:
                write_digits(root)
            if self.runtime.distributed:
                dist.barrier()
            return write_digits(root)
        train = Path(d["train"])
        val = Path(d["val"]) if d["val"] is not None else None
        if val is None:
            raise ValueError(
                f"data.val is not set (data.train is {train}); give the validation ImageFolder tree"
            )
        return train, val

    def _build_model(self) -> CvT:
        m, t = self.cfg["model"], self.cfg["train"]
        overrides = dict(m["overrides"] or {})
        name = m["name"]
        config = CvtConfig().replace(
            **{**get_variant(name).config, **overrides, "num_classes": len(self.class_names)}
        )
        self.resume_path = self._resume_path()
        self.resume_state = read_checkpoint(self.resume_path) if self.resume_path else None
        if self.resume_state is not None:
            check_same_architecture(self.resume_state, config, name, self.resume_path)
            saved_classes = self.resume_state.get("class_names")
            if saved_classes is not None and list(saved_classes) != self.class_names:
                raise ValueError(
                    f"checkpoint {self.resume_path} was trained on other classes than {self.train_dir}"
                )
        # Fine-tuning: create_model's loader checks the architecture and replaces a head of another size.
        checkpoint = m["checkpoint"] if self.resume_state is None else None
        model = create_model(name, num_classes=len(self.class_names), checkpoint=checkpoint, **overrides)
        if checkpoint is not None:
            self._log(f"fine-tuning from {checkpoint}")
        freeze_stages(model, int(m["freeze_stages"]))
        model.to(self.runtime.device)
        if m["sync_bn"] and self.runtime.distributed:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        self.amp_dtype = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}.get(t["amp"], "bad")
        if self.amp_dtype == "bad":
            raise ValueError(f"train.amp must be none, bf16 or fp16, got {t['amp']!r}")
        return model

    def _resume_path(self) -> Path | None:
        t = self.cfg["train"]
        if t["resume"]:
            return Path(t["resume"])
        last = self.output / "last.pth"
        return last if t["auto_resume"] and last.is_file() else None

    def _build_loaders(self) -> None:
        d, a, t, rt = self.cfg["data"], self.cfg["aug"], self.cfg["train"], self.runtime
        if a["repeated_aug"]:
            from timm.data.distributed_sampler import RepeatAugSampler

            base = RepeatAugSampler(
                self.train_set, num_replicas=rt.world_size, rank=rt.rank, num_repeats=int(a["repeated_aug"])
            )
        else:
            base = DistributedSampler(
                self.train_set,
                num_replicas=rt.world_size,
                rank=rt.rank,
                shuffle=True,
                seed=int(t["seed"]),
                drop_last=False,
            )
        self.sampler = SeededSampler(base, int(t["seed"]), rt.rank, rt.world_size)
        kwargs = _loader_kwargs(d, rt.device)
        # A private generator: creating loader iterators must not consume the global RNG.
        self.train_loader = DataLoader(
            self.train_set,
            batch_size=self.batch_size,
            sampler=self.sampler,
            drop_last=True,
            generator=torch.Generator().manual_seed(int(t["seed"])),
            **kwargs,
        )
        self.steps_per_epoch = len(base) // self.batch_size
        eval_batch = int(d["eval_batch_size"] or self.batch_size)
        self.val_loader = DataLoader(
            self.val_set,
            batch_size=eval_batch,
            sampler=ShardSampler(len(self.val_set), rt.rank, rt.world_size),
            **kwargs,
        )

    def _build_optimization(self) -> None:
        from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
        from timm.optim import create_optimizer_v2
        from timm.scheduler import CosineLRScheduler
        from timm.utils import ModelEmaV3

        o, s, a, t = self.cfg["optim"], self.cfg["sched"], self.cfg["aug"], self.cfg["train"]
        model = self.model
        self.lr = (
            float(o["lr"])
            if o["lr"] is not None
            else float(o["base_lr"]) * self.global_batch / o["base_batch_size"]
        )
        groups = param_groups(model, float(o["weight_decay"]), o["layer_decay"])
        extra = (
            {"betas": tuple(o["betas"]), "eps": float(o["eps"])}
            if "adam" in o["opt"]
            else {"momentum": float(o["momentum"])}
            if "sgd" in o["opt"] or "momentum" in o["opt"]
            else {}
        )
        self.optimizer = create_optimizer_v2(
            groups, opt=o["opt"], lr=self.lr, weight_decay=float(o["weight_decay"]), **extra
        )
        self.epochs = int(t["epochs"])
        cooldown = int(s["cooldown_epochs"])
        if self.epochs <= cooldown:
            raise ValueError(f"train.epochs={self.epochs} must exceed sched.cooldown_epochs={cooldown}")
        if s["name"] != "cosine":
            raise ValueError(f"sched.name must be 'cosine' (the paper's schedule), got {s['name']!r}")
        n = self.steps_per_epoch
        # Per-step schedule: cosine over epochs - cooldown (warm-up included), then min_lr to the end.
        self.scheduler = CosineLRScheduler(
            self.optimizer,
            t_initial=(self.epochs - cooldown) * n,
            lr_min=float(s["min_lr"]),
            warmup_t=int(s["warmup_epochs"] * n),
            warmup_lr_init=float(s["warmup_lr"]),
            t_in_epochs=False,
        )
        self.mixup = None
        if a["mixup"] > 0 or a["cutmix"] > 0:
            from timm.data import Mixup

            self.mixup = Mixup(
                mixup_alpha=a["mixup"],
                cutmix_alpha=a["cutmix"],
                prob=a["mixup_prob"],
                switch_prob=a["mixup_switch_prob"],
                mode=a["mixup_mode"],
                label_smoothing=a["label_smoothing"],
                num_classes=len(self.class_names),
            )
            self.criterion = SoftTargetCrossEntropy()
        elif a["label_smoothing"] > 0:
            self.criterion = LabelSmoothingCrossEntropy(smoothing=a["label_smoothing"])
        else:
            self.criterion = nn.CrossEntropyLoss()
        self.ema = ModelEmaV3(model, decay=float(t["ema_decay"])) if t["ema"] else None
        self.scaler = torch.amp.GradScaler(
            self.runtime.device.type,
            enabled=self.amp_dtype is torch.float16 and self.runtime.device.type == "cuda",
        )
        self.ddp = model
        if self.runtime.distributed:
            device_ids = [self.runtime.device.index] if self.runtime.device.type == "cuda" else None
            self.ddp = nn.parallel.DistributedDataParallel(model, device_ids=device_ids)

    # -- state

    def state(self, epoch: int, step_in_epoch: int) -> dict[str, Any]:
        rng = _rng_state()
        if self.runtime.distributed:
            gathered: list[Any] = [None] * self.runtime.world_size
            dist.all_gather_object(gathered, rng)
            rng = gathered
        else:
            rng = [rng]
        model = self.model
        return {
            "state_dict": model.state_dict(),
            "model_name": self.cfg["model"]["name"],
            "config": model.config.to_dict(),
            "class_names": list(self.class_names),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "ema": self.ema.module.state_dict() if self.ema is not None else None,
            "epoch": epoch,
            "step_in_epoch": step_in_epoch,
            "global_step": self.global_step,
            "best_top1": self.best_top1,
            "best_top5": self.best_top5,
            "world_size": self.runtime.world_size,
            "rng": rng,
            "train_config": self.cfg,
            "wall_seconds": self.wall_before + time.perf_counter() - self.started,
            "train_images": self.train_images,
            "train_seconds": self.train_seconds,
        }

    def save(self, name: str, epoch: int, step_in_epoch: int) -> None:
        state = self.state(epoch, step_in_epoch)
        if self.runtime.is_main:
            save_checkpoint(state, self.output / name)

    def restore(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["state_dict"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        if self.ema is not None and state.get("ema") is not None:
            self.ema.module.load_state_dict(state["ema"])
        self.start_epoch, self.start_step = int(state["epoch"]), int(state["step_in_epoch"])
        if self.start_step >= self.steps_per_epoch:
            self.start_epoch, self.start_step = self.start_epoch + 1, 0
        self.global_step = int(state["global_step"])
        self.best_top1, self.best_top5 = float(state["best_top1"]), float(state["best_top5"])
        self.wall_before = float(state.get("wall_seconds", 0.0))
        self.train_images, self.train_seconds = int(state["train_images"]), float(state["train_seconds"])
        rng = state["rng"]
        if len(rng) == self.runtime.world_size:
            _set_rng_state(rng[self.runtime.rank])
        else:
            self._log(
                f"checkpoint was written by {len(rng)} process(es), this run has {self.runtime.world_size}: "
                "random streams restart, so results will differ from an uninterrupted run"
            )

    def _log(self, text: str) -> None:
        if self.runtime.is_main and not getattr(self, "silent", False):
            print(text, flush=True)

    # -- loop

    def set_train_mode(self) -> None:
        self.ddp.train()
        for stage in self.model.stages[: int(self.cfg["model"]["freeze_stages"])]:
            stage.eval()

    def run(self) -> dict[str, Any]:
        t = self.cfg["train"]
        self.started = time.perf_counter()
        self.global_step, self.start_epoch, self.start_step = 0, 0, 0
        self.best_top1 = self.best_top5 = -1.0
        self.wall_before, self.train_images, self.train_seconds = 0.0, 0, 0.0
        if self.resume_state is not None:
            self.restore(self.resume_state)
            self._log(
                f"resuming from {self.resume_path} at epoch {self.start_epoch + 1}, step {self.global_step}"
            )
            self.resume_state = None
        main = self.runtime.is_main
        self.metrics = (
            MetricsLog(self.output, self.global_step if self.resume_path else None) if main else None
        )
        progress = Progress(main, bool(t["quiet"]), int(t["log_every_steps"]))
        self._log(
            f"training {self.cfg['model']['name']} on {len(self.train_set)} images of "
            f"{len(self.class_names)} classes ({self.train_dir}), {self.runtime.world_size} process(es) on "
            f"{self.runtime.device}, global batch {self.global_batch}, lr {self.lr:.3g}, "
            f"{self.epochs} epochs; "
            f"output {self.output}"
        )
        every = int(t["checkpoint_every_steps"])
        last_val: dict[str, Any] = {}
        bad_count = 0
        try:
            for epoch in range(self.start_epoch, self.epochs):
                start = self.start_step if epoch == self.start_epoch else 0
                self.sampler.set_epoch(epoch, start * self.batch_size)
                self.set_train_mode()
                progress.start(epoch, self.epochs, self.steps_per_epoch, start)
                window_loss, window_steps, tick = 0.0, 0, time.perf_counter()
                for step, (images, targets, bad) in enumerate(self.train_loader, start=start + 1):
                    bad_count += self._report_bad(bad, bad_count)
                    loss = self.train_step(images, targets)
                    self.global_step += 1
                    self.scheduler.step_update(self.global_step)
                    window_loss, window_steps = window_loss + loss, window_steps + 1
                    elapsed = time.perf_counter() - tick
                    self.train_images += self.global_batch
                    lr = self.optimizer.param_groups[-1]["lr"]
                    speed = window_steps * self.global_batch / max(elapsed, 1e-9)
                    progress.update(step, loss, lr, speed)
                    if main and (self.global_step % progress.every == 0 or step == self.steps_per_epoch):
                        self.metrics.write(
                            {
                                "kind": "train",
                                "step": self.global_step,
                                "epoch": epoch + step / self.steps_per_epoch,
                                "loss": window_loss / window_steps,
                                "lr": lr,
                                "images_per_second": speed,
                            }
                        )
                        self.train_seconds += elapsed
                        window_loss, window_steps, tick = 0.0, 0, time.perf_counter()
                    if every and self.global_step % every == 0:
                        self.save("last.pth", epoch, step)
                self.train_seconds += time.perf_counter() - tick if window_steps else 0.0
                progress.close()
                last_val = self.validate(epoch)
                self.save("last.pth", epoch + 1, 0)
                if last_val["top1"] > self.best_top1:
                    self.best_top1, self.best_top5 = last_val["top1"], last_val["top5"]
                    self.save("best.pth", epoch + 1, 0)
        finally:
            progress.close()
            if self.metrics is not None:
                self.metrics.close()
        if not last_val:
            last_val = self.validate(self.epochs - 1)
        return self.finish(last_val, bad_count)

    def _report_bad(self, bad: list, seen: int) -> int:
        for i, sample in enumerate(bad):
            if self.cfg["data"]["strict"]:
                raise ValueError(
                    f"unreadable image {sample.path} ({sample.error}); data.strict stops the run"
                )
            if self.runtime.is_main:
                print(
                    f"warning: skipped unreadable image {sample.path} ({sample.error}); "
                    f"{seen + i + 1} skipped so far",
                    file=sys.stderr,
                    flush=True,
                )
        return len(bad)

    def train_step(self, images: torch.Tensor, targets: torch.Tensor) -> float:
        device = self.runtime.device
        images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
        if self.mixup is not None:
            images, targets = self.mixup(images, targets)
        with torch.autocast(
            device.type, dtype=self.amp_dtype or torch.float32, enabled=self.amp_dtype is not None
        ):
            loss = self.criterion(self.ddp(images), targets)
        value = loss.detach().float()
        finite = torch.isfinite(value)
        if self.runtime.distributed:
            flag = finite.to(torch.float32).to(device)
            dist.all_reduce(flag, op=dist.ReduceOp.MIN)
            finite = flag.bool()
        if not finite:
            last = self.output / "last.pth"
            kept = f"the last good checkpoint is {last}" if last.exists() else "no checkpoint was written yet"
            raise TrainingDiverged(f"loss is {value.item()} at step {self.global_step + 1}; stopped, {kept}")
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        clip = self.cfg["optim"]["clip_grad"]
        if clip:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.model.parameters(), float(clip))
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if self.ema is not None:
            self.ema.update(self.model, step=self.global_step)
        return value.item()

    def validate(self, epoch: int) -> dict[str, Any]:
        result = evaluate(
            self.model,
            self.val_loader,
            self.runtime.device,
            len(self.class_names),
            self.runtime,
            self.amp_dtype,
        )
        record = {
            "kind": "val",
            "step": self.global_step,
            "epoch": epoch + 1,
            "top1": result["top1"],
            "top5": result["top5"],
            "loss": result["loss"],
        }
        if self.ema is not None:
            ema = evaluate(
                self.ema.module,
                self.val_loader,
                self.runtime.device,
                len(self.class_names),
                self.runtime,
                self.amp_dtype,
            )
            record.update(ema_top1=ema["top1"], ema_top5=ema["top5"], ema_loss=ema["loss"])
        if self.metrics is not None:
            self.metrics.write(record)
        self._log(
            f"epoch {epoch + 1}/{self.epochs}: val top-1 {100 * result['top1']:.2f}% "
            f"top-5 {100 * result['top5']:.2f}% loss {result['loss']:.4f}"
        )
        return result

    def finish(self, last_val: dict[str, Any], bad_count: int) -> dict[str, Any]:
        wall = self.wall_before + time.perf_counter() - self.started
        summary = {
            "model": self.cfg["model"]["name"],
            "best_val_top1": max(self.best_top1, last_val["top1"]),
            "best_val_top5": self.best_top5 if self.best_top1 >= last_val["top1"] else last_val["top5"],
            "final_val_top1": last_val["top1"],
            "final_val_top5": last_val["top5"],
            "final_val_loss": last_val["loss"],
            "epochs": self.epochs,
            "steps": self.global_step,
            "wall_seconds": wall,
            "images_per_second": self.train_images / max(self.train_seconds, 1e-9),
            "world_size": self.runtime.world_size,
            "skipped_images": bad_count,
            "checkpoint": str(self.output / "best.pth"),
            "last_checkpoint": str(self.output / "last.pth"),
            "curves": str(self.output / "curves.png"),
            "metrics": str(self.output / "metrics.jsonl"),
            "summary": str(self.output / "summary.json"),
        }
        if self.runtime.is_main:
            (self.output / "summary.json").write_text(json.dumps(summary, indent=2))
            plot_curves(self.output / "metrics.jsonl", self.output / "curves.png")
        return summary


def train(cfg: dict[str, Any]) -> dict[str, Any]:
    """Run one experiment from a config (see load_config); returns the summary written to summary.json."""
    runtime = init_runtime(cfg["train"]["device"])
    try:
        return Trainer(cfg, runtime).run()
    finally:
        if runtime.distributed and dist.is_initialized():
            dist.destroy_process_group()

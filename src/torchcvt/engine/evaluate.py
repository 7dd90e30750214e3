"""Scoring: top-1, top-5 and loss of a model over a loader, and of a checkpoint over an ImageFolder tree."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from ..checkpoints import read_checkpoint
from ..config import ARCHITECTURE_FIELDS, get_variant, variant_config
from ..data import ImageFolder, eval_transform, list_classes, loader_options
from ..factory import create_model
from .reporting import plot_confusion
from .runtime import Runtime, all_reduce, init_runtime
from .state import check_same_architecture


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
    correct1, correct5, loss_sum, count = all_reduce(totals.tolist(), runtime or Runtime(0, 1, device))
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
    stored = read_checkpoint(checkpoint)
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
        **loader_options(workers, True, False, runtime.device),
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

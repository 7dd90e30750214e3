"""Scoring: top-1, top-5 and loss of a model over a loader, and of a checkpoint over an ImageFolder tree."""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from ..checks import check_output_file, check_output_folder
from ..config import get_variant
from ..data import (
    BadImage,
    check_real_labels,
    eval_transform,
    is_folder_tree,
    loader_options,
    open_images,
    source_classes,
)
from ..errors import TorchcvtError
from ..factory import create_model
from ..files import write_json
from ..weights import Checkpoint, read_checkpoint
from .reporting import plot_confusion
from .runtime import Runtime, all_reduce, init_runtime


def unreadable_error(sample: BadImage, where: str) -> TorchcvtError:
    """The error strict mode stops with at an unreadable image."""
    return TorchcvtError(f"unreadable image {sample.path} ({sample.error}); {where} stops at the first one")


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
    strict: bool = False,
) -> dict[str, Any]:
    """Top-1, top-5 and mean cross-entropy over the readable images, summed over ranks.

    Unreadable images are never scored: they are counted (`unreadable`, summed over ranks) and listed
    (`unreadable_images`, this rank's); with strict the first one is a ValueError. One host sync in all.
    """
    model.eval()
    totals = torch.zeros(3, dtype=torch.float64, device=device)  # correct@1, correct@5, loss sum
    count = 0
    matrix = torch.zeros(num_classes * num_classes, dtype=torch.int64, device=device) if confusion else None
    unreadable: list[str] = []
    for images, targets, bad in loader:
        if bad and strict:
            raise unreadable_error(bad[0], "strict evaluation")
        unreadable += [b.path for b in bad]
        if images is None:
            if real_labels is not None:
                _add_real_results(real_labels, torch.empty(0, num_classes), {b.path for b in bad})
            continue
        images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            logits = model(images)
        logits = logits.float()
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        hits = top.eq(targets[:, None])
        loss = nn.functional.cross_entropy(logits, targets, reduction="sum")
        totals += torch.stack([hits[:, 0].sum().double(), hits.any(1).sum().double(), loss.double()])
        count += len(targets)
        if matrix is not None:
            matrix += torch.bincount(targets * num_classes + top[:, 0], minlength=num_classes**2)
        if real_labels is not None:
            _add_real_results(real_labels, logits.cpu(), {b.path for b in bad})
    counts = torch.tensor([count, len(unreadable)], dtype=torch.float64, device=device)
    correct1, correct5, loss_sum, count, bad_count = all_reduce(
        torch.cat([totals, counts]), runtime or Runtime(0, 1, device)
    )
    if not count:
        raise TorchcvtError(f"no image could be read ({int(bad_count)} unreadable): nothing to evaluate")
    result = {
        "top1": correct1 / count,
        "top5": correct5 / count,
        "loss": loss_sum / count,
        "images": int(count),
        "unreadable": int(bad_count),
        "unreadable_images": unreadable,
    }
    if matrix is not None:
        result["confusion"] = matrix.view(num_classes, num_classes).cpu()
    if real_labels is not None:
        result["real_top1"] = real_labels.get_accuracy(1) / 100
        result["real_top5"] = real_labels.get_accuracy(max(real_labels.topk)) / 100
    return result


def _add_real_results(real: Any, logits: torch.Tensor, unreadable: set[str]) -> None:
    # timm's ReaL scorer pairs results with its file list by position: step over files never scored.
    def skip() -> None:
        while real.sample_idx < len(real.filenames) and real.filenames[real.sample_idx] in unreadable:
            real.sample_idx += 1

    for row in logits.split(1):
        skip()
        real.add_result(row)
    skip()


def evaluate_checkpoint(
    model_name: str,
    checkpoint: str | Path | Checkpoint,
    data: str | Path,
    *,
    output: str | Path | None = None,
    batch_size: int = 64,
    workers: int = 2,
    real_labels: str | Path | None = None,
    device: str = "auto",
    strict: bool = False,
    overrides: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Score a checkpoint on an ImageFolder tree or a Hugging Face dataset split (a whole dataset: its
    validation split, hfdata.evaluation_split) with the checkpoint's own class list; write a JSON report.

    The report goes to output (default: next to the checkpoint) as eval_<data>.json (eval_<data>_ema.json
    for a checkpoint's EMA weights, Checkpoint.ema_weights()), with a
    confusion-matrix PNG for up to 100 classes. Unreadable images are counted and listed, never scored;
    with strict the first one is an error. `overrides` sets model config fields a checkpoint does not
    record (an official .pth of a non-default architecture).
    """
    get_variant(model_name)
    runtime = init_runtime(device)  # a device this machine lacks is an error before any reading
    path = checkpoint.path if isinstance(checkpoint, Checkpoint) else Path(checkpoint)
    out_dir = check_output_folder(output if output is not None else path.parent, "output")
    # The EMA weights' report stands beside the plain weights' one.
    ema = isinstance(checkpoint, Checkpoint) and checkpoint.is_ema
    data_name = Path(data).resolve().name if is_folder_tree(data) else (
        re.sub(r"[^\w.-]+", "_", str(data).removeprefix("hf:")).strip("_"))
    stem = f"eval_{data_name}{'_ema' if ema else ''}"
    if out_dir.is_dir():
        for name in (f"{stem}.json", f"{stem}_confusion.png"):
            check_output_file(out_dir / name, "report", reads=[path, real_labels])
    # Any format, read once: class list, architecture and weights come from it.
    stored = checkpoint if isinstance(checkpoint, Checkpoint) else read_checkpoint(path)
    checkpoint = path
    if not is_folder_tree(data):
        from ..hfdata import evaluation_split

        data = str(evaluation_split(str(data)))
    class_names = list(stored.class_names) if stored.class_names else source_classes(data)
    if stored.num_classes != len(class_names):
        n = len(class_names)
        source = f"it names {n} classes" if stored.class_names else f"{data} has {n} class folders"
        raise TorchcvtError(
            f"checkpoint {checkpoint} has a {stored.num_classes}-class head but {source}; evaluating "
            "never re-initialises a head"
        )
    model = create_model(model_name, checkpoint=stored, **(overrides or {}))
    del stored
    model.to(runtime.device)
    data_config = model.pretrained_cfg
    dataset = open_images(data, eval_transform(data_config), class_names=class_names)
    if runtime.is_main:
        dataset.warn_empty_classes()
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        **loader_options(workers, True, False, runtime.device, "workers"),
    )
    real = None
    if real_labels is not None:
        check_real_labels(real_labels, [path for path, _ in dataset.samples], len(class_names))
        from timm.data import RealLabelsImagenet

        real = RealLabelsImagenet(
            [path for path, _ in dataset.samples],
            real_json=str(real_labels),
            topk=(1, min(5, len(class_names))),
        )
    confusion = len(class_names) <= 100
    result = evaluate(
        model, loader, runtime.device, len(class_names), real_labels=real, confusion=confusion, strict=strict
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    report = {
        "model": model_name,
        "checkpoint": str(checkpoint),
        "weights": "ema" if ema else "plain",
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
    write_json(report["report_json"], report)
    return report

"""What a run tells its user: progress bars or log lines, metrics.jsonl, TensorBoard scalars, PNG plots."""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from ..errors import TorchcvtError
from ..extras import require
from ..files import append_text, write_figure, write_text

logger = logging.getLogger("torchcvt.engine")


# A log file shows progress at least this often, whatever train.log_every_steps says.
LOG_INTERVAL_SECONDS = 30.0


class Progress:
    """A tqdm bar per epoch on a terminal; otherwise log lines every log_every_steps steps and at least
    every LOG_INTERVAL_SECONDS; with quiet neither (the per-epoch validation lines remain)."""

    def __init__(self, enabled: bool, quiet: bool, every: int, interval: float | None = None):
        self.enabled = enabled and not quiet
        self.bar_mode = self.enabled and sys.stderr.isatty()
        self.every = max(1, every)
        self.interval = LOG_INTERVAL_SECONDS if interval is None else interval
        self.bar = None
        self.epoch = self.epochs = self.total = self.initial = 0
        self.started = self.last_line = time.perf_counter()

    def start(self, epoch: int, epochs: int, total: int, initial: int) -> None:
        self.epoch, self.epochs, self.total, self.started = epoch, epochs, total, time.perf_counter()
        self.initial = initial
        if self.bar_mode:
            self.bar = _bar(total, initial, f"epoch {epoch + 1}/{epochs}", "step")

    def due(self) -> bool:
        """Whether a log line is due by the clock (log-line mode only): none for LOG_INTERVAL_SECONDS."""
        return self.enabled and not self.bar_mode and time.perf_counter() - self.last_line >= self.interval

    def update(self, step: int, loss: float | None, lr: float, images_per_second: float) -> None:
        """One step done; loss (the mean since the last logging step) is given when a line is due."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(1)
            if loss is not None:
                self.bar.set_postfix(
                    loss=f"{loss:.4f}", lr=f"{lr:.2e}", img_s=f"{images_per_second:.0f}", refresh=False
                )
        elif loss is not None:
            done = step - self.initial
            eta = (time.perf_counter() - self.started) / max(done, 1) * (self.total - step)
            self.last_line = time.perf_counter()
            logger.info(
                f"epoch {self.epoch + 1}/{self.epochs} step {step}/{self.total} loss {loss:.4f} lr {lr:.3e} "
                f"{images_per_second:.0f} img/s eta {clock(eta)}"
            )

    def validating(self, batches: Iterable[Any], total: int) -> Iterator[Any]:
        """The validation batches, shown as a bar on a terminal, else a line at least every
        LOG_INTERVAL_SECONDS (nothing with quiet)."""
        bar = _bar(total, 0, f"validating {self.epoch + 1}/{self.epochs}", "batch") if self.bar_mode else None
        try:
            for done, batch in enumerate(batches, start=1):
                yield batch
                if bar is not None:
                    bar.update(1)
                elif self.due():
                    self.last_line = time.perf_counter()
                    logger.info(f"epoch {self.epoch + 1}/{self.epochs} validating: batch {done}/{total}")
        finally:
            if bar is not None:
                bar.close()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _bar(total: int, initial: int, desc: str, unit: str) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit=unit, dynamic_ncols=True, leave=False)


def shows_top5(num_classes: int | None) -> bool:
    """Whether top-5 says anything: with 5 classes or fewer it is always 100% (None: not known, shown)."""
    return num_classes is None or num_classes > 5


def accuracy_text(top1: float, top5: float, num_classes: int | None,
                  top5_format: str = " top-5 {:.2f}%") -> str:
    """'top-1 81.25%' and, where it says anything (shows_top5), top-5 in top5_format."""
    return f"top-1 {100 * top1:.2f}%" + (top5_format.format(100 * top5) if shows_top5(num_classes) else "")


def clock(seconds: float) -> str:
    """Seconds as H:MM:SS."""
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class MetricsLog:
    """metrics.jsonl plus TensorBoard scalars; on resume, records after the checkpoint's step are dropped."""

    def __init__(self, output: Path, resume_step: int | None):
        self.path = output / "metrics.jsonl"
        records = self.read(self.path) if resume_step is not None and self.path.exists() else []
        kept = [r for r in records if r["step"] <= resume_step] if resume_step is not None else []
        # Replaced whole, never emptied first: a kill or a full disk here keeps the earlier epochs.
        write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))
        require("tensorboard", "TensorBoard logging")
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(output / "tensorboard"), purge_step=resume_step)

    @staticmethod
    def read(path: Path) -> list[dict[str, Any]]:
        """The records of a metrics.jsonl; a last line torn by a kill mid-write is dropped with a notice."""
        lines = [line for line in path.read_text().splitlines() if line.strip()]
        records = []
        for number, line in enumerate(lines, start=1):
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as error:
                if number < len(lines):
                    raise TorchcvtError(f"{path} line {number} is not a JSON record ({error})") from None
                logger.warning(f"{path}: dropped its torn last line (a write cut short): {line[:60]!r}")
        return records

    def write(self, record: dict[str, Any]) -> None:
        append_text(self.path, json.dumps(record) + "\n")
        for key, value in record.items():
            if key not in ("step", "epoch", "kind") and isinstance(value, (int, float)):
                self.writer.add_scalar(f"{record['kind']}/{key}", value, record["step"])

    def close(self) -> None:
        self.writer.close()


def _figure(width: float, height: float) -> Any:
    # A Figure with its own Agg canvas: no pyplot, so no global backend is chosen or changed.
    Figure = require("matplotlib.figure", "plotting").Figure

    return Figure(figsize=(width, height))


def plot_curves(metrics_path: Path, out_path: Path, num_classes: int | None = None,
                train_loss: str = "train") -> None:
    """Training loss and LR per step, validation top-1 (and top-5 where shows_top5) and loss per epoch, as
    one PNG; train_loss labels the training loss (say what it includes: label smoothing, mixup)."""
    records = MetricsLog.read(metrics_path)
    train = [r for r in records if r["kind"] == "train"]
    val = [r for r in records if r["kind"] == "val"]
    fig = _figure(14, 4)
    axes = fig.subplots(1, 3)
    axes[0].plot([r["step"] for r in train], [r["loss"] for r in train], label=train_loss)
    axes[0].plot([r["step"] for r in val], [r["loss"] for r in val], "o-", label="val (plain cross-entropy)")
    axes[0].set(title="loss", xlabel="step")
    axes[0].legend()
    axes[1].plot([r["epoch"] for r in val], [100 * r["top1"] for r in val], "o-", label="top-1")
    if shows_top5(num_classes):
        axes[1].plot([r["epoch"] for r in val], [100 * r["top5"] for r in val], "o-", label="top-5")
    axes[1].set(title="validation accuracy (%)", xlabel="epoch")
    axes[1].legend()
    axes[2].plot([r["step"] for r in train], [r["lr"] for r in train])
    axes[2].set(title="learning rate", xlabel="step")
    fig.tight_layout()
    write_figure(out_path, fig)


def train_loss_label(label_smoothing: float, mixup: bool) -> str:
    """What the plotted training loss is: cross-entropy with the run's label smoothing and mixed targets."""
    parts = ([f"label smoothing {label_smoothing:g}"] if label_smoothing > 0 else []) + (
        ["mixup/CutMix targets"] if mixup else [])
    return f"train (with {', '.join(parts)})" if parts else "train"


def plot_confusion(matrix: torch.Tensor, class_names: Sequence[str], out_path: Path) -> None:
    """A row-normalised confusion matrix as a PNG, with counts written in for up to 20 classes."""
    n = len(class_names)
    size = max(5.0, min(30.0, 0.3 * n + 3))
    fig = _figure(size, size)
    ax = fig.subplots()
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
    write_figure(out_path, fig)

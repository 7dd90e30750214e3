"""Prediction results and what they are written to: tables, JSON and CSV reports, embedding files."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from .errors import TorchcvtError
from .files import write_bytes


class Prediction(NamedTuple):
    index: int
    label: str
    prob: float


@dataclass
class FileResult:
    """What happened to one input file: its predictions (or embedding row) or why it was not read."""

    path: str
    predictions: list[Prediction] | None = None
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        if self.error is not None:
            return {"path": self.path, "error": self.error}
        return {"path": self.path, "predictions": [p._asdict() for p in self.predictions or []]}


def write_json_report(results: Sequence[FileResult], path: str | Path) -> None:
    """A JSON list, per file {"path", "predictions": [{"index", "label", "prob"}]} or {"path", "error"}."""
    # allow_nan=False: NaN is not JSON, so a report can never hold it.
    text = json.dumps([r.to_dict() for r in results], indent=2, allow_nan=False) + "\n"
    write_bytes(path, text.encode())


def write_csv_report(results: Sequence[FileResult], path: str | Path) -> None:
    """One CSV row per prediction (path, rank, index, label, prob, error), or one with the error."""
    text = io.StringIO(newline="")
    writer = csv.writer(text)
    writer.writerow(["path", "rank", "index", "label", "prob", "error"])
    for result in results:
        if result.error is not None:
            writer.writerow([result.path, "", "", "", "", result.error])
        for rank, p in enumerate(result.predictions or [], 1):
            writer.writerow([result.path, rank, p.index, p.label, f"{p.prob:.6f}", ""])
    write_bytes(path, text.getvalue().encode())


def format_table(results: Sequence[FileResult]) -> str:
    """A plain-text table: path, rank, probability and class for each prediction, or the error."""
    rows = [("path", "#", "prob", "class")]
    for result in results:
        if result.error is not None:
            rows.append((result.path, "-", "-", f"error: {result.error}"))
        for rank, p in enumerate(result.predictions or [], 1):
            shown = result.path if rank == 1 else ""
            rows.append((shown, str(rank), f"{p.prob:.4f}", f"{p.label} ({p.index})"))
    # A newline or tab in a class name or file name would break the table's one line per prediction.
    rows = [tuple("".join(c if c.isprintable() else repr(c)[1:-1] for c in cell) for cell in row)
            for row in rows]
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    return "\n".join(
        "  ".join([*(cell.ljust(width) for cell, width in zip(row[:3], widths, strict=True)), row[3]])
        for row in rows
    )


def save_embeddings(path: str | Path, features: torch.Tensor, files: Sequence[str]) -> list[Path]:
    """Write features (N, D) and their file list: .safetensors (list in its metadata) or .npy + .files.json.

    Returns the files written.
    """
    path = Path(path)
    if len(files) != features.shape[0]:
        raise TorchcvtError(f"{features.shape[0]} feature rows but {len(files)} file names")
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        metadata = {"files": json.dumps(list(files))}
        save_file({"embeddings": features.contiguous()}, str(path), metadata=metadata)
        return [path]
    if path.suffix == ".npy":
        np.save(path, features.numpy())
        listing = path.with_suffix(".files.json")
        listing.write_text(json.dumps(list(files), indent=1) + "\n")
        return [path, listing]
    raise TorchcvtError(f"embeddings go to a .safetensors or .npy file, got {path.name!r}")


def load_embeddings(path: str | Path) -> tuple[torch.Tensor, list[str]]:
    """Read what save_embeddings wrote: the features (N, D) and the N file names."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            return f.get_tensor("embeddings"), json.loads((f.metadata() or {})["files"])
    return torch.from_numpy(np.load(path)), json.loads(path.with_suffix(".files.json").read_text())

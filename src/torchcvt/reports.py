"""Prediction results and what they are written to: tables, JSON and CSV reports, embedding files."""

from __future__ import annotations

import csv
import hashlib
import io
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from .errors import TorchcvtError
from .files import write_bytes, write_together


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
    write_bytes(path, text.encode(), stream=True)


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
    write_bytes(path, text.getvalue().encode(), stream=True)


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

    Both files are on disk before either is replaced (files.write_together), so a full disk keeps the old
    pair; the .files.json records the .npy's SHA-256, so a list left beside other features (a kill between
    the two renames) is refused when read. Returns the files written.
    """
    path = Path(path)
    if len(files) != features.shape[0]:
        raise TorchcvtError(f"{features.shape[0]} feature rows but {len(files)} file names")
    if path.suffix == ".safetensors":
        from safetensors.torch import save as safetensors_bytes

        data = safetensors_bytes({"embeddings": features.contiguous()}, {"files": json.dumps(list(files))})
        return [write_bytes(path, data)]
    if path.suffix == ".npy":
        array = io.BytesIO()
        np.save(array, features.numpy())
        data = array.getvalue()
        record = {"embeddings": path.name, "sha256": hashlib.sha256(data).hexdigest(), "files": list(files)}
        listing = (json.dumps(record, indent=1) + "\n").encode()
        return write_together({path: data, embedding_list_path(path): listing})
    raise TorchcvtError(f"embeddings go to a .safetensors or .npy file, got {path.name!r}")


def embedding_list_path(path: str | Path) -> Path:
    """Where save_embeddings puts the file list of a .npy: OUT.files.json beside OUT.npy."""
    return Path(path).with_suffix(".files.json")


def load_embeddings(path: str | Path) -> tuple[torch.Tensor, list[str]]:
    """Read what save_embeddings wrote: the features (N, D) and the N file names."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            return f.get_tensor("embeddings"), json.loads((f.metadata() or {})["files"])
    data = path.read_bytes()
    listing = embedding_list_path(path)
    record = json.loads(listing.read_text())
    if isinstance(record, list):  # written before the list recorded its .npy's hash
        files = record
    elif record.get("sha256") != hashlib.sha256(data).hexdigest():
        raise TorchcvtError(f"{listing} is the file list of other features than {path} (a write of both was "
                            "interrupted between them): run embed again")
    else:
        files = record["files"]
    return torch.from_numpy(np.load(io.BytesIO(data))), files

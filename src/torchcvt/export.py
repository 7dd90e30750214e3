"""Export a CvT for other runtimes: ONNX, TorchScript and torch.export programs, dynamic batch and size."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch.export import Dim, ExportedProgram

from .model import CvT

FORMATS = ("onnx", "torchscript", "exported")
SUFFIXES = {"onnx": ".onnx", "torchscript": ".pt", "exported": ".pt2"}


def example_input(model: CvT, height: int | None = None, width: int | None = None) -> torch.Tensor:
    """A random batch of two (so the batch dimension stays symbolic) at the model's input size by default."""
    default = (model.config.num_channels, model.config.img_size, model.config.img_size)
    size = getattr(model, "pretrained_cfg", {}).get("input_size", default)
    height, width = height or size[1], width or size[2]
    device = next(model.parameters()).device
    return torch.randn(2, model.config.num_channels, height, width, device=device)


def export_program(model: CvT, example: torch.Tensor | None = None) -> ExportedProgram:
    """torch.export of the model in eval mode with dynamic batch, height and width.

    The exporter derives the smallest height and width the graph is valid for; the program rejects
    smaller inputs (see program.range_constraints).
    """
    model = model.eval()
    example = example_input(model) if example is None else example
    dims = {0: Dim("batch", min=1), 2: Dim.AUTO, 3: Dim.AUTO}
    with torch.no_grad():
        return torch.export.export(model, (example,), dynamic_shapes=(dims,))


def export_onnx(model: CvT | ExportedProgram, path: str | Path, example: torch.Tensor | None = None) -> Path:
    """An ONNX file with input 'image' (batch, C, height, width) and output 'logits', all sizes dynamic."""
    program = model if isinstance(model, ExportedProgram) else export_program(model, example)
    with warnings.catch_warnings():
        # The exporter's own deprecation notices about its internals are noise to the user.
        warnings.simplefilter("ignore", DeprecationWarning)
        onnx_program = torch.onnx.export(program, dynamo=True, verbose=False, input_names=["image"],
                                         output_names=["logits"])
    onnx_program.save(str(path))
    return Path(path)


def export_torchscript(model: CvT, path: str | Path, example: torch.Tensor | None = None) -> Path:
    """A traced TorchScript module; shapes are traced symbolically, so any batch and size run."""
    model = model.eval()
    example = example_input(model) if example is None else example
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.jit.* is deprecated.*", category=FutureWarning)
        traced = torch.jit.trace(model, example, check_trace=False)
    traced.save(str(path))
    return Path(path)


def export_model(
    model: CvT, path: str | Path, format: str = "onnx", height: int | None = None, width: int | None = None
) -> Path:
    """Export to `format` (onnx, torchscript or exported) at path; height/width set the example's size."""
    if format not in FORMATS:
        raise ValueError(f"unknown export format {format!r}; choose one of {', '.join(FORMATS)}")
    path = Path(path)
    if not path.parent.is_dir():
        raise FileNotFoundError(f"output folder {path.parent} does not exist")
    example = example_input(model, height, width)
    if format == "torchscript":
        return export_torchscript(model, path, example)
    program = export_program(model, example)
    if format == "onnx":
        return export_onnx(program, path)
    torch.export.save(program, str(path))
    return path

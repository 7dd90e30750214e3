"""Export a CvT for other runtimes: ONNX, TorchScript and torch.export programs, dynamic batch and size."""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path

import torch
from torch.export import Dim, ExportedProgram

from .errors import TorchcvtError
from .extras import require
from .files import replace_file
from .geometry import stage_grids
from .inference import InferenceCvT, optimize_for_inference
from .model import CvT

FORMATS = ("onnx", "torchscript", "exported")
SUFFIXES = {"onnx": ".onnx", "torchscript": ".pt", "exported": ".pt2"}
logger = logging.getLogger(__name__)


def example_size(model: CvT, height: int | None = None, width: int | None = None) -> tuple[int, int]:
    """height and width, each defaulting to the model's input size."""
    default = (model.config.num_channels, model.config.img_size, model.config.img_size)
    size = getattr(model, "pretrained_cfg", {}).get("input_size", default)
    return height or size[1], width or size[2]


def example_input(model: CvT, height: int | None = None, width: int | None = None) -> torch.Tensor:
    """A random batch of two (so the batch dimension stays symbolic) at the model's input size by default."""
    height, width = example_size(model, height, width)
    device = next(model.parameters()).device
    return torch.randn(2, model.config.num_channels, height, width, device=device)


SizeRange = tuple[int, int | None]


def _unit_grids(model: CvT, height: int, width: int) -> tuple[tuple[bool, ...], tuple[bool, ...]] | None:
    """Which token and key/value grids are one token high, and which one wide; None if a stage has none."""
    try:
        stages = stage_grids(model.config, height, width)
    except ValueError:
        return None
    grids = [grid for stage in stages for grid in (stage.tokens, stage.queries, stage.keys)]
    return tuple(g[0] == 1 for g in grids), tuple(g[1] == 1 for g in grids)


def supported_sizes(model: CvT, height: int, width: int) -> tuple[SizeRange, SizeRange]:
    """The heights and widths a graph exported from a height x width example runs at: (min, max or None).

    The tracer specialises every token or key/value grid that is 1 token high (or wide) at the example:
    such a graph is right only while that grid stays 1. Grids grow with the input, so each range is an
    interval; with no such grid it is unbounded above.
    """
    example = _unit_grids(model, height, width)
    if example is None:
        raise TorchcvtError(f"a {height}x{width} input is too small for this model")
    ranges = []
    for axis, size in enumerate((height, width)):
        def same(n: int, axis: int = axis) -> bool:
            grids = _unit_grids(model, *((n, width) if axis == 0 else (height, n)))
            return grids is not None and grids[axis] == example[axis]

        low = size
        while low > 1 and same(low - 1):
            low -= 1
        high = size
        # Once no grid along this axis is 1, none becomes 1 again: the range is open above.
        while any(example[axis]) and same(high + 1):
            high += 1
        ranges.append((low, high if any(example[axis]) else None))
    return ranges[0], ranges[1]


def unbounded_size(model: CvT) -> int:
    """The smallest square example size whose exported graph runs at every larger size too."""
    size = 1
    while (grids := _unit_grids(model, size, size)) is None or any(grids[0]) or any(grids[1]):
        size += 1
    return size


def describe_sizes(sizes: tuple[SizeRange, SizeRange]) -> str:
    """'heights 19-34 and widths 19-34', or 'heights from 35 and widths from 35'."""
    def one(name: str, low: int, high: int | None) -> str:
        return f"{name} from {low}" if high is None else f"{name} {low}-{high}"

    return f"{one('heights', *sizes[0])} and {one('widths', *sizes[1])}"


def export_program(model: CvT, example: torch.Tensor | None = None) -> ExportedProgram:
    """torch.export of the model in eval mode with dynamic batch, height and width.

    The exporter derives the smallest height and width the graph is valid for; the program rejects
    smaller inputs (see program.range_constraints). BatchNorm is folded first (optimize_for_inference).
    """
    model = _folded(model)
    example = example_input(model) if example is None else example
    dims = {0: Dim("batch", min=1), 2: Dim.AUTO, 3: Dim.AUTO}
    with torch.no_grad():
        return torch.export.export(model, (example,), dynamic_shapes=(dims,))


def _folded(model: CvT) -> InferenceCvT:
    """The model with BatchNorm folded and QuickGELU's scaling in the weights: fewer ops in the graph."""
    return model if isinstance(model, InferenceCvT) else optimize_for_inference(model)


def export_onnx(model: CvT | ExportedProgram, path: str | Path, example: torch.Tensor | None = None) -> Path:
    """An ONNX file with input 'image' (batch, C, height, width) and output 'logits', all sizes dynamic."""
    for package in ("onnx", "onnxscript"):  # torch.onnx's exporter imports them
        require(package, "ONNX export")
    program = model if isinstance(model, ExportedProgram) else export_program(model, example)
    with warnings.catch_warnings():
        # The exporter's own deprecation notices about its internals are noise to the user.
        warnings.simplefilter("ignore", DeprecationWarning)
        onnx_program = torch.onnx.export(program, dynamo=True, verbose=False, input_names=["image"],
                                         output_names=["logits"])
    with replace_file(path) as handle:
        onnx_program.save(handle)
    return Path(path)


def export_torchscript(model: CvT, path: str | Path, example: torch.Tensor | None = None) -> Path:
    """A traced TorchScript module; shapes are traced symbolically, so any batch and size run."""
    model = _folded(model)
    example = example_input(model) if example is None else example
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.jit.* is deprecated.*", category=FutureWarning)
        traced = torch.jit.trace(model, example, check_trace=False)
    with replace_file(path) as handle, warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.jit.* is deprecated.*", category=FutureWarning)
        torch.jit.save(traced, handle)
    return Path(path)


def export_model(
    model: CvT, path: str | Path, format: str = "onnx", height: int | None = None, width: int | None = None
) -> Path:
    """Export to `format` (onnx, torchscript or exported) at path; height/width set the example's size."""
    if format not in FORMATS:
        raise TorchcvtError(f"unknown export format {format!r}; choose one of {', '.join(FORMATS)}")
    path = Path(path)
    if not path.parent.is_dir():
        raise TorchcvtError(f"output folder {path.parent} does not exist")
    height, width = example_size(model, height, width)
    needed = 2 * model.config.num_channels * height * width * 4  # the float32 example batch of two
    memory = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    if needed > memory:
        raise TorchcvtError(
            f"exporting at {height}x{width} needs {needed / 1e9:.0f} GB for the example input "
                         f"alone, more than the {memory / 1e9:.0f} GB of memory here: export at a smaller "
                         "size")
    try:
        return _export(model, path, format, height, width)
    except (RuntimeError, MemoryError) as error:
        exhausted = isinstance(error, (torch.OutOfMemoryError, MemoryError)) or "can't allocate" in str(error)
        if not exhausted:
            raise
        message = f"exporting at {height}x{width} ran out of memory: export at a smaller size"
        raise TorchcvtError(message) from None


def _export(model: CvT, path: Path, format: str, height: int, width: int) -> Path:
    example = example_input(model, height, width)
    if format != "torchscript":
        sizes = supported_sizes(model, *example.shape[2:])
        if sizes[0][1] is not None or sizes[1][1] is not None:
            logger.warning(
                "the %s graph exported at %dx%d runs only at %s: a grid one token high or wide is "
                "specialised by the tracer; export at %d x %d or more for every larger size",
                format, *example.shape[2:], describe_sizes(sizes), *[unbounded_size(model)] * 2)
    if format == "torchscript":
        return export_torchscript(model, path, example)
    program = export_program(model, example)
    if format == "onnx":
        return export_onnx(program, path)
    with replace_file(path) as handle:
        torch.export.save(program, handle)
    return path

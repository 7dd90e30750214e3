"""Attention maps: what a query (the class token or an image position) attends to, placed on the image.

Keys and values come from a strided convolution of the token map (stride_kv), so key j does not sit
at token j: each key's centre is traced back through every convolution to a pixel position, and the
maps are interpolated between those centres onto the input image.

`stage` arguments index model.stages (0-based, as Python lists); what is drawn or printed numbers stages
from 1, as `torchcvt info` does.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .config import CvtConfig
from .errors import TorchcvtError
from .extras import require
from .files import write_figure
from .geometry import projected_centres, projected_grid, stage_grid
from .layers import Attention
from .model import CvT, CvtFeatures


@dataclass
class AttentionMap:
    """One query's softmax attention over the spatial keys of one block, per head.

    weights: (B, heads, H_kv, W_kv); key_rows / key_cols: pixel centres of the key rows and columns
    in the input image; stage: the index into model.stages (0-based); query: the (x, y) pixel centre of
    the query cell, or None for the class token. Attention the class token pays to itself is left out,
    so a map sums to at most 1.
    """

    weights: torch.Tensor
    key_rows: torch.Tensor
    key_cols: torch.Tensor
    image_size: tuple[int, int]
    stage: int
    block: int
    query: tuple[float, float] | None

    @property
    def single_key(self) -> bool:
        """True when the stage has one key at this input size: every query's map is then uniform."""
        return self.weights.shape[-2:] == (1, 1)

    @property
    def mean(self) -> torch.Tensor:
        """The map averaged over heads: (B, H_kv, W_kv)."""
        return self.weights.mean(dim=1)

    def upsample(self) -> torch.Tensor:
        """Maps on the input image, (B, heads, H, W), linear between key centres and flat beyond them."""
        height, width = self.image_size
        rows = _interpolation_matrix(self.key_rows, height).to(self.weights)
        cols = _interpolation_matrix(self.key_cols, width).to(self.weights)
        return rows @ self.weights @ cols.T


def _interpolation_matrix(centres: torch.Tensor, size: int) -> torch.Tensor:
    """(size, n) matrix that linearly interpolates n values at `centres` onto pixels 0..size-1."""
    positions = np.arange(size, dtype=np.float64)
    xp = centres.double().numpy()
    columns = [np.interp(positions, xp, unit) for unit in np.eye(len(xp))]
    return torch.from_numpy(np.stack(columns, axis=1))


def _query_grid(config: CvtConfig, stage: int, height: int, width: int) -> tuple[int, int]:
    return projected_grid(config, stage, stage_grid(config, stage, height, width), query=True)


def key_grid(config: CvtConfig, stage: int, height: int, width: int) -> tuple[int, int]:
    """The key grid of stage `stage` (0-based) for an input of height x width."""
    return projected_grid(config, stage, stage_grid(config, stage, height, width), query=False)


def default_stage(config: CvtConfig, height: int, width: int) -> int:
    """The last stage (0-based) with more than one key at this input size, else the last stage.

    A stage with a 1x1 key grid (a small model's last stage on a small input) gives every query one key:
    its map is uniform and says nothing, so an earlier stage is drawn instead.
    """
    last = config.num_stages - 1
    return next((i for i in range(last, -1, -1) if key_grid(config, i, height, width) != (1, 1)), last)


@contextmanager
def record_attention(model: CvT | CvtFeatures) -> Iterator[list[Attention]]:
    """Inside the block every Attention keeps its last softmax weights; forward's result is unchanged."""
    modules = [m for m in model.modules() if isinstance(m, Attention)]
    previous = [m.keep_attention for m in modules]
    for module in modules:
        module.keep_attention = True
    try:
        yield modules
    finally:
        for module, keep in zip(modules, previous, strict=True):
            module.keep_attention = keep
            module.last_attention = module.last_kv_grid = None


def attention_map(
    model: CvT | CvtFeatures,
    x: torch.Tensor,
    stage: int | None = None,
    block: int = -1,
    query: Sequence[float] | None = None,
) -> AttentionMap:
    """Attention of one query in block `block` of stage `stage` for the input batch x (B, C, H, W).

    query None means the class token (or the image centre when the stage has none); (x, y) picks the
    query cell nearest that pixel of the input. Stages and blocks index like lists (0-based, -1: the
    last); stage None is default_stage's choice: the last stage with more than one key.
    """
    cvt = model.model if isinstance(model, CvtFeatures) else model
    config = cvt.config
    stages = cvt.stages
    cvt.check_input(x)
    height, width = x.shape[-2:]
    if stage is None:
        stage = default_stage(config, height, width)
    if not -len(stages) <= stage < len(stages):
        raise TorchcvtError(f"stage index {stage} does not exist; the model has stages 0..{len(stages) - 1} "
                         "(indexed from 0)")
    stage %= len(stages)
    blocks = stages[stage].blocks
    if not -len(blocks) <= block < len(blocks):
        raise TorchcvtError(f"block {block} does not exist; stage {stage + 1} has {len(blocks)} block(s)")
    block %= len(blocks)
    has_cls = config.cls_token[stage]
    if query is None and not has_cls:
        query = ((width - 1) / 2, (height - 1) / 2)
    if query is not None:
        qx, qy = query
        if not (0 <= qx < width and 0 <= qy < height):
            raise TorchcvtError(f"query ({qx}, {qy}) lies outside the {width}x{height} input")
    attention = blocks[block].attn
    with record_attention(cvt), torch.no_grad():
        cvt.forward_features(x)
        weights, (kv_h, kv_w) = attention.last_attention, attention.last_kv_grid
    q_scale, q_offset = projected_centres(config, stage, query=True)
    if query is None:
        row, query_pixel = 0, None
    else:
        q_h, q_w = _query_grid(config, stage, height, width)
        cell_y = min(max(round((qy - q_offset) / q_scale), 0), q_h - 1)
        cell_x = min(max(round((qx - q_offset) / q_scale), 0), q_w - 1)
        row = int(has_cls) + cell_y * q_w + cell_x
        query_pixel = (cell_x * q_scale + q_offset, cell_y * q_scale + q_offset)
    spatial = weights[:, :, row, int(has_cls):]
    k_scale, k_offset = projected_centres(config, stage, query=False)
    return AttentionMap(
        weights=spatial.reshape(*spatial.shape[:2], kv_h, kv_w).float(),
        key_rows=torch.arange(kv_h) * k_scale + k_offset,
        key_cols=torch.arange(kv_w) * k_scale + k_offset,
        image_size=(height, width),
        stage=stage,
        block=block,
        query=query_pixel,
    )


def denormalize(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """A preprocessed (C, H, W) tensor back to an (H, W, C) array in [0, 1] for display."""
    mean_t, std_t = torch.tensor(mean).view(-1, 1, 1), torch.tensor(std).view(-1, 1, 1)
    return (x.detach().cpu().float() * std_t + mean_t).clamp(0, 1).permute(1, 2, 0).numpy()


def describe(amap: AttentionMap) -> str:
    """'stage 3, block 2: attention of the class token', stages and blocks numbered from 1 as in `info`."""
    query = "class token" if amap.query is None else f"query at ({amap.query[0]:.0f}, {amap.query[1]:.0f})"
    return f"stage {amap.stage + 1}, block {amap.block + 1}: attention of the {query}"


def render_attention(
    image: np.ndarray | Image.Image, amap: AttentionMap, path: str | Path, index: int = 0, columns: int = 4
) -> Path:
    """Write a PNG: the image, the head-averaged map and each head's map as overlays (batch item `index`),
    on one colour scale (the smallest to the largest weight shown) with its colour bar."""
    Figure = require("matplotlib.figure", "rendering attention maps").Figure
    picture = np.asarray(image)
    maps = amap.upsample()[index]
    panels = [("input", None), (f"mean of {maps.shape[0]} heads", maps.mean(0))]
    panels += [(f"head {h + 1}", maps[h]) for h in range(maps.shape[0])] if maps.shape[0] > 1 else []
    columns = min(columns, len(panels))
    rows = -(-len(panels) // columns)
    figure = Figure(figsize=(3 * columns + 0.8, 3 * rows + 0.6), layout="constrained")
    title = describe(amap)
    if amap.single_key:
        title += "\n1x1 key grid at this input size: every query sees one key, so the map is uniform"
    figure.suptitle(title)
    # One scale for every panel, so heads compare by colour, spanning the weights shown (a uniform map:
    # 0 to its weight); the colour bar reads it in softmax weight.
    low, top = float(maps.min()), float(maps.max())
    if top - low < 1e-6:
        low, top = 0.0, top or 1.0
    # The map is drawn opaque with the image's brightness faintly over it: colours stay close to the bar's.
    grey = picture.mean(axis=-1) if picture.ndim == 3 else picture
    axes, shown = [], None
    for i, (name, heat) in enumerate(panels):
        ax = figure.add_subplot(rows, columns, i + 1)
        axes.append(ax)
        if heat is None:
            ax.imshow(picture)
        else:
            shown = ax.imshow(heat.numpy(), cmap="inferno", vmin=low, vmax=top)
            ax.imshow(grey, cmap="gray", alpha=0.25)
        if amap.query is not None:
            ax.plot(*amap.query, marker="+", color="cyan", markersize=14, markeredgewidth=2)
        ax.set_title(name, fontsize=9)
        ax.set_axis_off()
    bar = figure.colorbar(shown, ax=axes, shrink=0.8, pad=0.02)
    bar.set_label("attention weight per key", fontsize=9)
    return write_figure(png_path(path), figure, stream=True)


def png_path(path: str | Path) -> Path:
    """The file render_attention writes for path: path itself, with ".png" added when it has no suffix
    (but not to a device such as /dev/stdout)."""
    # matplotlib would add the suffix itself; naming the file here lets callers report the real name.
    path = Path(path)
    device = path.exists() and not path.is_file() and not path.is_dir()
    return path if path.suffix or device else path.with_suffix(".png")

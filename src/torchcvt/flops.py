"""Parameter and FLOP counts as the CvT paper reports them (one multiply-add = one FLOP).

FLOPs are counted analytically from the config: every convolution (token embedding, depthwise
projection), every Linear, and the two attention products q @ k^T and attn @ v, with the squeezed
key/value map and the class token. Normalisation, activations, softmax, pooling and bias additions
have no multiply-adds and are left out, as in fvcore and torch.utils.flop_counter.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .config import CvtConfig, get_variant, variant_config
from .errors import TorchcvtError
from .geometry import embedding_geometry, projection_geometry, stage_grids
from .model import CvT
from .weights.catalogue import info_weights, paper_figures


@dataclass(frozen=True)
class StageCost:
    """Token-map sizes and multiply-adds of one stage for a given input size."""

    grid: tuple[int, int]
    q_grid: tuple[int, int]
    kv_grid: tuple[int, int]
    embed_flops: int
    block_flops: int
    depth: int

    @property
    def flops(self) -> int:
        return self.embed_flops + self.depth * self.block_flops


def _pair(size: int | tuple[int, int]) -> tuple[int, int]:
    if isinstance(size, int) and not isinstance(size, bool):
        size = (size, size)
    if not (isinstance(size, (tuple, list)) and len(size) == 2 and all(isinstance(s, int) for s in size)):
        raise TorchcvtError(f"image size must be an int or (height, width), got {size!r}")
    if min(size) < 1:
        raise TorchcvtError(f"image size must be positive, got {size!r}")
    return int(size[0]), int(size[1])


def _projection_flops(config: CvtConfig, i: int, grid: tuple[int, int], query: bool) -> int:
    """Multiply-adds of the convolutional projection of q (or of k or v) onto grid."""
    method, kernel, _, _ = projection_geometry(config, i, query)
    # A depthwise conv has one k x k kernel per channel; pooling has no multiply-adds.
    return grid[0] * grid[1] * config.embed_dim[i] * kernel * kernel if method == "dw_bn" else 0


def stage_costs(config: CvtConfig, img_size: int | tuple[int, int]) -> list[StageCost]:
    """Per-stage grids and multiply-adds for an input of img_size (int or (height, width))."""
    height, width = _pair(img_size)
    costs = []
    for i, grids in enumerate(stage_grids(config, height, width)):
        grid, q_grid, kv_grid = grids.tokens, grids.queries, grids.keys
        dim = config.embed_dim[i]
        in_chans = config.num_channels if i == 0 else config.embed_dim[i - 1]
        kernel, _, _ = embedding_geometry(config, i)
        embed = grid[0] * grid[1] * dim * in_chans * kernel * kernel
        cls = int(config.cls_token[i])
        n_tokens = grid[0] * grid[1] + cls
        n_q = q_grid[0] * q_grid[1] + cls
        n_kv = kv_grid[0] * kv_grid[1] + cls
        hidden = int(dim * config.mlp_ratio[i])
        block = (
            _projection_flops(config, i, q_grid, query=True)
            + 2 * _projection_flops(config, i, kv_grid, query=False)
            + (n_q + 2 * n_kv) * dim * dim  # proj_q, proj_k, proj_v
            + 2 * n_q * n_kv * dim  # q @ k^T and attn @ v, summed over heads
            + n_q * dim * dim  # output projection
            + 2 * n_tokens * dim * hidden  # MLP fc1 and fc2
        )
        costs.append(StageCost(grid, q_grid, kv_grid, embed, block, config.depth[i]))
    return costs


def count_flops(config: CvtConfig, img_size: int | tuple[int, int] | None = None) -> int:
    """Multiply-adds of one forward pass for a single image (default size: config.img_size)."""
    size = config.img_size if img_size is None else img_size
    head = config.embed_dim[-1] * config.num_classes
    return sum(cost.flops for cost in stage_costs(config, size)) + head


def count_params(model_or_config: nn.Module | CvtConfig) -> int:
    """Number of parameters of a model, or of the CvT a config builds (built on the meta device)."""
    if isinstance(model_or_config, CvtConfig):
        with torch.device("meta"):
            model_or_config = CvT(model_or_config)
    return sum(p.numel() for p in model_or_config.parameters())


def model_info(name: str, img_size: int | tuple[int, int] | None = None) -> dict[str, Any]:
    """Parameters, GFLOPs, per-stage geometry, data config and the paper's figures of a registered variant.

    img_size (int or (height, width)) defaults to the variant's input size; the paper's figures are
    for that size.
    """
    variant = get_variant(name)
    config = variant_config(name)
    paper = paper_figures(name)
    size = _pair(variant.input_size[1:] if img_size is None else img_size)
    costs = stage_costs(config, size)
    flops = count_flops(config, size)
    stages = [
        {
            "stage": i + 1,
            "grid": list(cost.grid),
            "tokens": cost.grid[0] * cost.grid[1] + int(config.cls_token[i]),
            "kv_grid": list(cost.kv_grid),
            "embed_dim": config.embed_dim[i],
            "num_heads": config.num_heads[i],
            "depth": config.depth[i],
            "cls_token": config.cls_token[i],
            "projection": config.qkv_projection_method[i],
            "gflops": cost.flops / 1e9,
        }
        for i, cost in enumerate(costs)
    ]
    return {
        "name": name,
        "description": variant.description,
        "img_size": list(size),
        "params": count_params(config),
        "flops": flops,
        "gflops": flops / 1e9,
        "stages": stages,
        "data_config": {k: list(v) if isinstance(v, tuple) else v for k, v in variant.data_config().items()},
        "paper": {**paper, "img_size": list(variant.input_size[1:])} if paper else {},
        "weights": info_weights(name),
    }


def _gflops(value: float) -> str:
    return f"{value:.2f}" if value >= 0.1 else f"{value:.4f}"


def format_model_info(info: dict[str, Any]) -> str:
    """model_info's result as a short human-readable report."""
    paper = info["paper"]
    height, width = info["img_size"]
    paper_params = f"; paper {paper['params_m']}M" if paper else ""
    params = f"{info['params']:,} ({info['params'] / 1e6:.2f}M{paper_params})"
    paper_flops = f"paper {paper['gflops']}; " if paper and paper["img_size"] == info["img_size"] else ""
    gflops = f"{_gflops(info['gflops'])} at {height}x{width} ({paper_flops}one multiply-add = one FLOP)"
    rows = [("stage", "grid", "tokens", "kv grid", "dim", "heads", "depth", "cls", "projection", "GFLOPs")]
    for s in info["stages"]:
        grid, kv_grid = ("x".join(map(str, s[key])) for key in ("grid", "kv_grid"))
        rows.append((
            str(s["stage"]), grid, str(s["tokens"]), kv_grid, str(s["embed_dim"]), str(s["num_heads"]),
            str(s["depth"]), "yes" if s["cls_token"] else "-", s["projection"], _gflops(s["gflops"]),
        ))
    widths = [max(len(cell) for cell in column) for column in zip(*rows, strict=True)]
    table = ["  " + "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows]
    data = info["data_config"]
    lines = [
        f"{info['name']}: {info['description']}",
        f"  parameters  {params}",
        f"  GFLOPs      {gflops}",
        "",
        *table,
        "",
        f"  data config: input {'x'.join(map(str, data['input_size']))}, crop_pct {data['crop_pct']} "
        f"({data['crop_mode']}), {data['interpolation']}, mean {tuple(data['mean'])}, "
        f"std {tuple(data['std'])}",
        *(f"  weights: {w['name']}{' (default)' if w['default'] else ''}, {w['pretraining']}, "
          f"{w['top1']}% ImageNet-1k top-1 (paper), {w['hf_hub_id']}, licence {w['license']}"
          for w in info.get("weights", [])),
    ]
    return "\n".join(lines)

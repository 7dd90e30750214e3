"""Token-grid arithmetic of a CvT config: how big each stage's token, query and key/value maps are, and
where on the input image each token sits. The model, the FLOP count, the exporter and the attention
maps all ask here, so they cannot disagree."""

from __future__ import annotations

from dataclasses import dataclass

from .config import CvtConfig
from .errors import TorchcvtError

Grid = tuple[int, int]


def conv_out(size: int, kernel: int, stride: int, padding: int, ceil: bool = False) -> int:
    """Output length of a convolution (or of pooling with ceil_mode=ceil) along one side."""
    span = size + 2 * padding - kernel
    out = -(-span // stride) + 1 if ceil else span // stride + 1
    # PyTorch drops a last ceil-mode window that would start inside the right padding.
    if ceil and (out - 1) * stride >= size + padding:
        out -= 1
    return out


def embedding_geometry(config: CvtConfig, stage: int) -> tuple[int, int, int]:
    """(kernel, stride, padding) of a stage's token embedding: overlapping conv, or ViT-style patches."""
    if config.token_embedding[stage] == "patch":
        return config.patch_stride[stage], config.patch_stride[stage], 0
    return config.patch_sizes[stage], config.patch_stride[stage], config.patch_padding[stage]


def projection_methods(method: str) -> tuple[str, str]:
    """(query method, key/value method) of a stage's qkv_projection_method.

    Pooling has nothing to learn for the query, so the official 'avg' pools keys and values and keeps
    the query linear.
    """
    return ("linear" if method == "avg" else method), method


def projection_geometry(config: CvtConfig, stage: int, query: bool) -> tuple[str, int, int, int]:
    """(method, kernel, stride, padding) of the projection of a stage's queries (or keys and values)."""
    q_method, kv_method = projection_methods(config.qkv_projection_method[stage])
    if query:
        return q_method, config.kernel_qkv[stage], config.stride_q[stage], config.padding_q[stage]
    return kv_method, config.kernel_qkv[stage], config.stride_kv[stage], config.padding_kv[stage]


def projected_grid(config: CvtConfig, stage: int, grid: Grid, query: bool) -> Grid:
    """The query (or key/value) grid that a stage's projection makes of its token grid."""
    method, kernel, stride, padding = projection_geometry(config, stage, query)
    if method == "linear":
        return grid
    # 'avg' pools with ceil_mode, as the official code does; 'dw_bn' is a plain convolution.
    return tuple(conv_out(n, kernel, stride, padding, ceil=method == "avg") for n in grid)


def stage_grid(config: CvtConfig, stage: int, height: int, width: int) -> Grid:
    """Token-map size after the token embedding of `stage` for an input of height x width."""
    for i in range(stage + 1):
        kernel, stride, padding = embedding_geometry(config, i)
        height, width = (conv_out(n, kernel, stride, padding) for n in (height, width))
    return height, width


@dataclass(frozen=True)
class StageGrids:
    """A stage's token grid and the grids its attention's queries and keys/values are computed on."""

    tokens: Grid
    queries: Grid
    keys: Grid


def stage_grids(config: CvtConfig, height: int, width: int, stages: int | None = None) -> list[StageGrids]:
    """The grids of the first `stages` stages (default: all) for an input of height x width; ValueError
    if one of them would have no tokens."""
    grids = []
    for i in range(config.num_stages if stages is None else stages):
        tokens = stage_grid(config, i, height, width)
        if min(tokens) < 1:
            raise TorchcvtError(
                f"input of {height}x{width} pixels is too small: stage {i + 1}'s token embedding leaves "
                f"no tokens; the smallest size this model takes is {min_input_size(config)} pixels a side"
            )
        grids.append(StageGrids(tokens, projected_grid(config, i, tokens, query=True),
                                projected_grid(config, i, tokens, query=False)))
    return grids


def min_input_size(config: CvtConfig) -> int:
    """The smallest side length that leaves every stage at least one token."""
    size = 1
    while min(stage_grid(config, config.num_stages - 1, size, size)) < 1:
        size += 1
    return size


def reductions(config: CvtConfig) -> list[int]:
    """How many input pixels one token of each stage spans along a side (the product of the strides)."""
    out, reduction = [], 1
    for stride in config.patch_stride:
        reduction *= stride
        out.append(reduction)
    return out


def _affine(scale: float, offset: float, kernel: int, stride: int, padding: int) -> tuple[float, float]:
    # Output cell o of a convolution is centred on input coordinate o * stride - padding + (kernel - 1) / 2.
    return scale * stride, offset + scale * ((kernel - 1) / 2 - padding)


def token_centres(config: CvtConfig, stage: int) -> tuple[float, float]:
    """(scale, offset) so that token t of `stage` is centred on pixel scale * t + offset (per axis)."""
    scale, offset = 1.0, 0.0
    for i in range(stage + 1):
        scale, offset = _affine(scale, offset, *embedding_geometry(config, i))
    return scale, offset


def projected_centres(config: CvtConfig, stage: int, query: bool) -> tuple[float, float]:
    """(scale, offset) so that query (or key) k of `stage`'s attention is centred on pixel
    scale * k + offset (per axis)."""
    scale, offset = token_centres(config, stage)
    method, kernel, stride, padding = projection_geometry(config, stage, query)
    if method == "linear":
        return scale, offset
    return _affine(scale, offset, kernel, stride, padding)

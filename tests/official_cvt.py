"""An independent CvT for the tests: the module tree of the official code (microsoft/CvT,
lib/models/cls_cvt.py), so that its state dict has the official key names and shapes, and a forward written
from the paper's formulas with plain ops: no torchcvt code, no fused kernels, no fast paths.

Only what the tests use: the three projection methods ('dw_bn'; 'avg', which pools keys and values and
keeps the query linear; 'linear'), convolutional token embedding. The official code has no
position embedding; the paper's ablation adds one (Spec.pos_grid), resized bicubically as timm resizes
ViT's to another grid.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class Spec:
    """The official SPEC fields for three stages (cvt-13 layout unless told)."""

    embed_dim: tuple[int, ...] = (16, 32, 48)
    num_heads: tuple[int, ...] = (1, 2, 3)
    depth: tuple[int, ...] = (1, 1, 2)
    patch_size: tuple[int, ...] = (7, 3, 3)
    patch_stride: tuple[int, ...] = (4, 2, 2)
    patch_padding: tuple[int, ...] = (2, 1, 1)
    cls_token: tuple[bool, ...] = (False, False, True)
    qkv_bias: tuple[bool, ...] = (True, True, True)
    stride_kv: tuple[int, ...] = (2, 2, 2)
    method: tuple[str, ...] = ("dw_bn", "dw_bn", "dw_bn")
    pos_grid: tuple[tuple[int, int] | None, ...] = (None, None, None)
    mlp_ratio: float = 4.0
    eps: float = 1e-5


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """The official weights' activation: x * sigmoid(1.702 x)."""
    return x * torch.sigmoid(1.702 * x)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)


def _projection(dim: int, stride: int, method: str) -> nn.Sequential | None:
    if method != "dw_bn":  # 'avg' and 'linear' have nothing to learn, so no keys
        return None
    conv = nn.Conv2d(dim, dim, 3, stride=stride, padding=1, bias=False, groups=dim)
    return nn.Sequential(OrderedDict(conv=conv, bn=nn.BatchNorm2d(dim)))


class Attention(nn.Module):
    def __init__(self, dim: int, stride_kv: int, qkv_bias: bool, method: str):
        super().__init__()
        self.conv_proj_q = _projection(dim, 1, method)
        self.conv_proj_k, self.conv_proj_v = (_projection(dim, stride_kv, method) for _ in range(2))
        self.proj_q, self.proj_k, self.proj_v = (nn.Linear(dim, dim, bias=qkv_bias) for _ in range(3))
        self.proj = nn.Linear(dim, dim)


class Block(nn.Module):
    def __init__(self, dim: int, spec: Spec, i: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=spec.eps)
        self.attn = Attention(dim, spec.stride_kv[i], spec.qkv_bias[i], spec.method[i])
        self.norm2 = nn.LayerNorm(dim, eps=spec.eps)
        self.mlp = Mlp(dim, int(dim * spec.mlp_ratio))


class ConvEmbed(nn.Module):
    def __init__(self, in_chans: int, dim: int, spec: Spec, i: int):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, dim, spec.patch_size[i], spec.patch_stride[i], spec.patch_padding[i])
        self.norm = nn.LayerNorm(dim, eps=spec.eps)


class Stage(nn.Module):
    def __init__(self, in_chans: int, spec: Spec, i: int):
        super().__init__()
        dim = spec.embed_dim[i]
        self.patch_embed = ConvEmbed(in_chans, dim, spec, i)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim)) if spec.cls_token[i] else None
        grid = spec.pos_grid[i]
        self.pos_embed = nn.Parameter(torch.zeros(1, dim, *grid)) if grid else None
        self.blocks = nn.ModuleList(Block(dim, spec, i) for _ in range(spec.depth[i]))


class OfficialCvT(nn.Module):
    """Attribute names as the official ConvolutionalVisionTransformer: stage{i}, norm, head."""

    def __init__(self, spec: Spec, num_classes: int, activation: str):
        super().__init__()
        self.spec, self.activation = spec, activation
        for i in range(len(spec.embed_dim)):
            self.add_module(f"stage{i}", Stage(3 if i == 0 else spec.embed_dim[i - 1], spec, i))
        self.norm = nn.LayerNorm(spec.embed_dim[-1], eps=spec.eps)
        self.head = nn.Linear(spec.embed_dim[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cls = None
        for i in range(len(self.spec.embed_dim)):
            x, cls = self._stage(getattr(self, f"stage{i}"), x, i)
        pooled = self.norm(cls[:, 0]) if cls is not None else self.norm(x.flatten(2).transpose(1, 2)).mean(1)
        return self.head(pooled)

    def _stage(self, stage: Stage, x: torch.Tensor, i: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        x = stage.patch_embed.proj(x)
        batch, dim, height, width = x.shape
        tokens = stage.patch_embed.norm(x.flatten(2).transpose(1, 2))
        if stage.pos_embed is not None:
            pos = F.interpolate(stage.pos_embed, size=(height, width), mode="bicubic", align_corners=False)
            tokens = tokens + pos.flatten(2).transpose(1, 2)
        if stage.cls_token is not None:
            tokens = torch.cat((stage.cls_token.expand(batch, -1, -1), tokens), dim=1)
        for block in stage.blocks:
            tokens = tokens + self._attention(block.attn, block.norm1(tokens), height, width, i,
                                              stage.cls_token is not None)
            hidden = block.mlp.fc1(block.norm2(tokens))
            hidden = quick_gelu(hidden) if self.activation == "quick_gelu" else F.gelu(hidden)
            tokens = tokens + block.mlp.fc2(hidden)
        cls = tokens[:, :1] if stage.cls_token is not None else None
        grid = tokens[:, tokens.shape[1] - height * width:]
        return grid.transpose(1, 2).reshape(batch, dim, height, width), cls

    def _attention(self, attn: Attention, tokens: torch.Tensor, height: int, width: int, i: int,
                   has_cls: bool) -> torch.Tensor:
        heads, method, stride_kv = self.spec.num_heads[i], self.spec.method[i], self.spec.stride_kv[i]
        batch, _, dim = tokens.shape
        cls, grid = (tokens[:, :1], tokens[:, 1:]) if has_cls else (None, tokens)
        grid = grid.transpose(1, 2).reshape(batch, dim, height, width)

        def project(conv: nn.Sequential | None, linear: nn.Linear, stride: int | None) -> torch.Tensor:
            if method == "dw_bn":
                seq = conv.bn(conv.conv(grid))
            elif method == "avg" and stride is not None:  # the official 'avg' pools keys and values only
                seq = F.avg_pool2d(grid, 3, stride, 1, ceil_mode=True)
            else:
                seq = grid
            seq = seq.flatten(2).transpose(1, 2)
            seq = seq if cls is None else torch.cat((cls, seq), dim=1)
            return linear(seq).reshape(batch, seq.shape[1], heads, dim // heads).transpose(1, 2)

        q = project(attn.conv_proj_q, attn.proj_q, None)
        k = project(attn.conv_proj_k, attn.proj_k, stride_kv)
        v = project(attn.conv_proj_v, attn.proj_v, stride_kv)
        # The official scale is the full width's, dim ** -0.5, not the head width's.
        weights = torch.softmax(q @ k.transpose(-2, -1) * dim**-0.5, dim=-1)
        return attn.proj((weights @ v).transpose(1, 2).reshape(batch, -1, dim))


def perturbed(model: nn.Module, seed: int = 0, scale: float = 0.2) -> nn.Module:
    """In place: noise on every parameter (every bias included), random BatchNorm statistics, eval mode."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * scale)
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.normal_(0.0, 0.3, generator=generator)
                module.running_var.uniform_(0.5, 2.0, generator=generator)
    return model.eval()

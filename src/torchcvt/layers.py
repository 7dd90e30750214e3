"""CvT building blocks: token embedding, convolutional projection, attention, MLP, block.

Attribute names follow the official implementation (microsoft/CvT, lib/models/cls_cvt.py) so that
its checkpoints load without renaming.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from timm.layers import DropPath
from torch import nn


class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x): the activation the official CvT weights were trained with."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


def make_activation(name: str) -> nn.Module:
    return QuickGELU() if name == "quick_gelu" else nn.GELU()


class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in float32 even under autocast, cast back to the input dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=x.device.type, enabled=False):
            weight = None if self.weight is None else self.weight.float()
            bias = None if self.bias is None else self.bias.float()
            out = F.layer_norm(x.float(), self.normalized_shape, weight, bias, self.eps)
        return out.to(x.dtype)


class ConvEmbed(nn.Module):
    """Convolutional token embedding: Conv2d then LayerNorm over channels; returns tokens and grid."""

    def __init__(self, in_chans: int, embed_dim: int, patch_size: int, stride: int, padding: int, eps: float):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=stride, padding=padding)
        self.norm = LayerNorm(embed_dim, eps=eps)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        x = self.proj(x)
        height, width = x.shape[-2:]
        return self.norm(x.flatten(2).transpose(1, 2)), (height, width)


class ConvProjection(nn.Sequential):
    """The convolutional part of a q/k/v projection: depthwise conv + BN ('dw_bn') or pooling ('avg')."""

    def __init__(self, dim: int, method: str, kernel_size: int, padding: int, stride: int):
        if method == "dw_bn":
            layers = {
                "conv": nn.Conv2d(dim, dim, kernel_size, stride, padding, bias=False, groups=dim),
                "bn": nn.BatchNorm2d(dim),
            }
        else:
            layers = {"avg": nn.AvgPool2d(kernel_size, stride, padding, ceil_mode=True)}
        super().__init__(OrderedDict(layers))


class Attention(nn.Module):
    """Multi-head attention whose q, k, v come from a convolutional projection of the token map.

    Set keep_attention to True to store the softmax weights of the last call in last_attention
    (B, heads, N_q, N_kv) and the key grid in last_kv_grid; forward's result is unchanged.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        qkv_bias: bool,
        attn_drop: float,
        proj_drop: float,
        method: str,
        kernel_size: int,
        padding_kv: int,
        stride_kv: int,
        padding_q: int,
        stride_q: int,
        with_cls_token: bool,
    ):
        super().__init__()
        self.num_heads = num_heads
        self.with_cls_token = with_cls_token
        # The official code scales by the whole stage width, not the head width; the pretrained
        # weights were trained with it, so changing it would change every output.
        self.scale = dim**-0.5
        # Pooling has nothing to learn for the query, so the official 'avg' keeps q linear.
        q_method = "linear" if method == "avg" else method
        self.conv_proj_q = ConvProjection(dim, q_method, kernel_size, padding_q, stride_q) if q_method != "linear" else None
        self.conv_proj_k = ConvProjection(dim, method, kernel_size, padding_kv, stride_kv) if method != "linear" else None
        self.conv_proj_v = ConvProjection(dim, method, kernel_size, padding_kv, stride_kv) if method != "linear" else None
        self.proj_q = nn.Linear(dim, dim, bias=qkv_bias)
        self.proj_k = nn.Linear(dim, dim, bias=qkv_bias)
        self.proj_v = nn.Linear(dim, dim, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.keep_attention = False
        self.last_attention: torch.Tensor | None = None
        self.last_kv_grid: tuple[int, int] | None = None

    @staticmethod
    def _project(conv: nn.Module | None, grid: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        if conv is None:
            return tokens, tuple(grid.shape[-2:])
        out = conv(grid)
        return out.flatten(2).transpose(1, 2), tuple(out.shape[-2:])

    def forward(self, x: torch.Tensor, height: int, width: int) -> torch.Tensor:
        batch, _, dim = x.shape
        cls, tokens = (x[:, :1], x[:, 1:]) if self.with_cls_token else (None, x)
        grid = tokens.transpose(1, 2).reshape(batch, dim, height, width)
        q, _ = self._project(self.conv_proj_q, grid, tokens)
        k, kv_grid = self._project(self.conv_proj_k, grid, tokens)
        v, _ = self._project(self.conv_proj_v, grid, tokens)
        if cls is not None:
            q, k, v = (torch.cat((cls, t), dim=1) for t in (q, k, v))
        q, k, v = (
            proj(t).view(batch, t.shape[1], self.num_heads, -1).transpose(1, 2)
            for proj, t in ((self.proj_q, q), (self.proj_k, k), (self.proj_v, v))
        )
        if self.keep_attention:
            attn = (q @ k.transpose(-2, -1) * self.scale).softmax(dim=-1)
            self.last_attention, self.last_kv_grid = attn.detach(), kv_grid
            out = self.attn_drop(attn) @ v
        else:
            drop = self.attn_drop.p if self.training else 0.0
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=drop, scale=self.scale)
        out = out.transpose(1, 2).reshape(batch, -1, dim)
        return self.proj_drop(self.proj(out))


class Mlp(nn.Module):
    """fc1 -> activation -> dropout -> fc2 -> dropout."""

    def __init__(self, dim: int, hidden_dim: int, activation: str, drop: float):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = make_activation(activation)
        self.fc2 = nn.Linear(hidden_dim, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class Block(nn.Module):
    """Pre-norm transformer block: x + DropPath(Attention(LN(x))), then x + DropPath(MLP(LN(x)))."""

    def __init__(self, dim: int, mlp_ratio: float, activation: str, eps: float, drop: float, drop_path: float,
                 **attention_args):
        super().__init__()
        self.norm1 = LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, proj_drop=drop, **attention_args)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), activation, drop)

    def forward(self, x: torch.Tensor, height: int, width: int) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x), height, width))
        return x + self.drop_path(self.mlp(self.norm2(x)))

"""CvT building blocks: token embedding, convolutional projection, attention, MLP, block.

Attribute names follow the official implementation (microsoft/CvT, lib/models/cls_cvt.py) so that
its checkpoints load without renaming. The fast paths below change how the same math is computed,
never which parameters exist: BatchNorm is folded into the depthwise convolution in eval mode,
attention runs through scaled_dot_product_attention (in bf16 CPU inference, blocked oneDNN products),
CPU inference fuses bias, activation and residual add into oneDNN's linear kernel (torchcvt.fused,
which has the switch to turn both off), and training recomputes the MLP activation instead of storing it.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext

import torch
import torch.nn.functional as F
from timm.layers import DropPath
from torch import nn
from torch.utils.checkpoint import checkpoint

from . import fused
from .geometry import projection_methods
from .weightcache import derived, prepared_weight

QUICK_GELU_ALPHA = 1.702


class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x): the activation the official CvT weights were trained with."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(QUICK_GELU_ALPHA * x)


def make_activation(name: str) -> nn.Module:
    """The module for an activation name: 'quick_gelu', 'gelu' (exact) or 'silu' (x * sigmoid(x), which
    torchcvt.inference puts in place of QuickGELU after scaling the weights around it)."""
    return {"quick_gelu": QuickGELU, "silu": nn.SiLU}.get(name, nn.GELU)()


def linear(layer: nn.Linear, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
    """`residual + layer(x)` (or layer(x)), fused for CPU inference when layer is a plain nn.Linear."""
    # A subclass or a replacement (quantize_dynamic's Linear) may compute something else: call it.
    dtype = fused.fused_dtype(x) if type(layer) is nn.Linear else None
    if dtype is not None:
        # A float32 residual stream under bf16 autocast (a class-token stage) is added outside the kernel.
        same = residual is None or residual.dtype == dtype
        out = fused.linear(x, layer.weight, layer.bias, dtype, residual=residual if same else None)
        if out is not None:
            return out if same else residual + out
    out = layer(x)
    if residual is None:
        return out
    if type(layer) is nn.Linear and not torch.is_grad_enabled() and out.dtype == residual.dtype:
        return out.add_(residual)  # out is new and nobody else's: no second full-size tensor
    return residual + out


class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in float32 even under autocast, cast back to the input dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=x.device.type, enabled=False):
            if x.device.type == "cpu" and x.dtype == torch.bfloat16 and _is_float32(self.weight, self.bias):
                # The CPU kernel takes bf16 input with float32 parameters and accumulates in float32:
                # the same result without two full-size casts.
                return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
            weight = None if self.weight is None else self.weight.float()
            bias = None if self.bias is None else self.bias.float()
            out = F.layer_norm(x.float(), self.normalized_shape, weight, bias, self.eps)
        return out.to(x.dtype)


def _is_float32(*tensors: torch.Tensor | None) -> bool:
    return all(t is not None and t.dtype == torch.float32 for t in tensors)


def _cached_inference() -> bool:
    """Whether weights derived from parameters go through torchcvt.weightcache: eager inference only
    (a cached tensor has no autograd history, and tracers and compilers must see the ops that make it)."""
    return not torch.is_grad_enabled() and not fused.plain_ops_only()


def _compute_dtype(x: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype a convolution of x with weight runs in: autocast's, or the weight's own."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else weight.dtype


def token_map(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Tokens (B, H*W, C) as a dense channels-last map (B, C, H, W): a view where it can be, else a copy."""
    grid = tokens.transpose(1, 2).unflatten(2, (height, width))
    if not grid.is_contiguous(memory_format=torch.channels_last):
        return grid.contiguous(memory_format=torch.channels_last)  # tokens behind a class token, batch > 1
    if grid.shape[0] == 1:
        # For a batch of one PyTorch leaves the batch stride arbitrary, and oneDNN's convolution copies a
        # map whose batch stride is not C*H*W: spell it out (same memory, no copy).
        channels = grid.shape[1]
        return grid.as_strided(grid.shape, (channels * height * width, 1, width * channels, channels))
    return grid


class ConvEmbed(nn.Module):
    """Convolutional token embedding: Conv2d then LayerNorm over channels; returns tokens and grid."""

    def __init__(self, in_chans: int, embed_dim: int, patch_size: int, stride: int, padding: int, eps: float):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=stride, padding=padding)
        self.norm = LayerNorm(embed_dim, eps=eps)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        # A channels-last map gives a channels-last output, whose (B, HW, C) token view needs no copy.
        x = x.contiguous(memory_format=torch.channels_last)
        proj = self.proj
        if not _cached_inference() or type(proj) is not nn.Conv2d:
            x = proj(x)
        else:
            # The convolution would otherwise copy its weight to channels-last (and autocast cast it) on
            # every call.
            dtype = _compute_dtype(x, proj.weight)
            weight, bias = derived(proj.weight, ("embedding", dtype), (proj.weight, proj.bias), lambda: (
                proj.weight.to(dtype).contiguous(memory_format=torch.channels_last),
                None if proj.bias is None else proj.bias.to(dtype)))
            x = proj._conv_forward(x, weight, bias)
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

    def folded_conv(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Weight and bias of the one convolution equal to conv followed by BN with its running statistics."""
        bn = self.bn
        scale = torch.rsqrt(bn.running_var + bn.eps)
        if bn.weight is not None:
            scale = scale * bn.weight
        shift = -bn.running_mean * scale
        if bn.bias is not None:
            shift = shift + bn.bias
        return self.conv.weight * scale.view(-1, 1, 1, 1), shift

    def _cached_folded_conv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """folded_conv() in the dtype the convolution will run in, kept until a source changes."""
        bn, weight = self.bn, self.conv.weight
        dtype = _compute_dtype(x, weight)
        sources = (weight, bn.weight, bn.bias, bn.running_mean, bn.running_var)
        return derived(weight, ("folded", dtype), sources,
                       lambda: tuple(t.to(dtype) for t in self.folded_conv()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if "bn" in self._modules and not self.bn.training and self.bn.running_mean is not None:
            # Folded here rather than stored in the module: nothing to undo for training, checkpoints
            # unchanged. Without gradients the folded weights may be kept (weightcache).
            weight, bias = self._cached_folded_conv(x) if _cached_inference() else self.folded_conv()
            conv = self.conv
            return F.conv2d(x, weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups)
        return super().forward(x)


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
        q_method, kv_method = projection_methods(method)

        def projection(method: str, padding: int, stride: int) -> ConvProjection | None:
            return None if method == "linear" else ConvProjection(dim, method, kernel_size, padding, stride)

        self.conv_proj_q = projection(q_method, padding_q, stride_q)
        self.conv_proj_k = projection(kv_method, padding_kv, stride_kv)
        self.conv_proj_v = projection(kv_method, padding_kv, stride_kv)
        self.proj_q = nn.Linear(dim, dim, bias=qkv_bias)
        self.proj_k = nn.Linear(dim, dim, bias=qkv_bias)
        self.proj_v = nn.Linear(dim, dim, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.keep_attention = False
        self.last_attention: torch.Tensor | None = None
        self.last_kv_grid: tuple[int, int] | None = None

    def forward(
        self, x: torch.Tensor, height: int, width: int, residual: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Attention over x (B, [1 +] HW, C); with `residual`, residual + attention (fused where it can)."""
        batch, _, dim = x.shape
        cls, tokens = (x[:, :1], x[:, 1:]) if self.with_cls_token else (None, x)
        # The three convolutions share one dense map: a view of the tokens, or behind a class token
        # one copy here rather than one in each convolution.
        grid = token_map(tokens, height, width) if self.conv_proj_k is not None else None
        inputs, kv_grid = [], (height, width)
        for conv in (self.conv_proj_q, self.conv_proj_k, self.conv_proj_v):
            if conv is None:
                # A linear projection takes x as it is, class token included: no split and rejoin.
                inputs.append(x)
                continue
            out = conv(grid)
            kv_grid = tuple(out.shape[-2:])  # v comes last, and its grid is k's
            out = out.flatten(2).transpose(1, 2)
            inputs.append(out if cls is None else torch.cat((cls, out), dim=1))
        q, k, v = inputs
        q, k, v = (
            linear(proj, t).view(batch, t.shape[1], self.num_heads, dim // self.num_heads).transpose(1, 2)
            for proj, t in ((self.proj_q, q), (self.proj_k, k), (self.proj_v, v))
        )
        if self.keep_attention:
            attn = (q @ k.transpose(-2, -1) * self.scale).softmax(dim=-1)
            self.last_attention, self.last_kv_grid = attn.detach(), kv_grid
            out = self.attn_drop(attn) @ v
        else:
            out = None if self.training else fused.attention(q, k, v, self.scale)
            if out is None:
                drop = self.attn_drop.p if self.training else 0.0
                out = F.scaled_dot_product_attention(q, k, v, dropout_p=drop, scale=self.scale)
        out = out.transpose(1, 2).reshape(batch, q.shape[2], dim)
        if self.training and self.proj_drop.p > 0:
            out = self.proj_drop(self.proj(out))
            return out if residual is None else residual + out
        return linear(self.proj, out, residual)


class _ActivationLinear(torch.autograd.Function):
    """linear(act(h)) that keeps h but not act(h) for backward: the activation is recomputed there,
    which saves one (tokens x hidden) tensor per block, the largest activation of a block."""

    @staticmethod
    def forward(
        ctx, h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, activation: str
    ) -> torch.Tensor:
        ctx.save_for_backward(h, weight)
        ctx.activation, ctx.bias_dtype = activation, None if bias is None else bias.dtype
        return F.linear(_activation(h, activation), weight, bias)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        h, weight = ctx.saved_tensors
        needs_h, needs_weight, needs_bias, _ = ctx.needs_input_grad
        # Under autocast the forward ran in grad's dtype; parameter grads go back to their own dtype.
        grad_h = grad_weight = grad_bias = None
        flat_grad = grad.reshape(-1, grad.shape[-1])
        if needs_h:
            grad_act = grad @ weight.to(grad.dtype)
            if ctx.activation == "gelu":
                grad_h = torch.ops.aten.gelu_backward(grad_act, h)
            else:
                alpha = QUICK_GELU_ALPHA if ctx.activation == "quick_gelu" else 1.0
                gate = torch.sigmoid(alpha * h)
                grad_h = grad_act * (gate + alpha * h * gate * (1 - gate))
        if needs_weight:
            act = _activation(h, ctx.activation).reshape(flat_grad.shape[0], -1)
            grad_weight = (flat_grad.t() @ act).to(weight.dtype)
        if needs_bias:
            grad_bias = flat_grad.sum(0).to(ctx.bias_dtype)
        return grad_h, grad_weight, grad_bias, None


def _activation(x: torch.Tensor, activation: str) -> torch.Tensor:
    if activation == "gelu":
        return F.gelu(x)
    return x * torch.sigmoid(QUICK_GELU_ALPHA * x) if activation == "quick_gelu" else F.silu(x)


class Mlp(nn.Module):
    """fc1 -> activation -> dropout -> fc2 -> dropout."""

    def __init__(self, dim: int, hidden_dim: int, activation: str, drop: float):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = make_activation(activation)
        self.fc2 = nn.Linear(hidden_dim, dim)
        self.drop = nn.Dropout(drop)
        self.activation = activation

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """MLP of x; with `residual`, returns residual + MLP (fused when it can)."""
        dropping = self.training and self.drop.p > 0
        plain_linears = type(self.fc1) is nn.Linear and type(self.fc2) is nn.Linear
        if plain_linears and not dropping and x.device.type == "cpu" and not torch.is_grad_enabled():
            out = None if fused.plain_ops_only() else self._cpu_inference(x, residual)
            if out is not None:
                return out
        h = self.fc1(x)
        if dropping or not plain_linears or not torch.is_grad_enabled() or fused.plain_ops_only():
            out = self.drop(self.fc2(self.drop(self.act(h))))
        else:
            out = _ActivationLinear.apply(h, self.fc2.weight, self.fc2.bias, self.activation)
        return out if residual is None else residual + out

    def _cpu_inference(self, x: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor | None:
        """oneDNN's fused kernels where fused.fused_dtype chooses them, else plain products in row
        blocks; None where neither applies (mixed dtypes, autocast without the fused kernel)."""
        dtype = fused.fused_dtype(x)
        if dtype is not None:
            same = residual is None or residual.dtype == dtype
            out = self._fused_forward(x, residual if same else None, dtype)
            return out if same or out is None else residual + out
        if torch.is_autocast_enabled("cpu") or not _same_dtype(x, residual, self.fc1):
            return None
        return self._row_block_forward(x, residual)

    def _weights(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """fc1's weight and bias and fc2's weight for swish/GELU as the activation, in dtype.

        swish(y) = y * sigmoid(y); with y = 1.702 h it is 1.702 * QuickGELU(h), so for QuickGELU fc1 is
        scaled up by 1.702 and fc2 down by it: the same function, exact up to float rounding. The scaled
        weights are made on each call; torchcvt.optimize_for_inference makes them once (activation 'silu').
        """
        quick = self.activation == "quick_gelu"
        up, down = (QUICK_GELU_ALPHA, 1 / QUICK_GELU_ALPHA) if quick else (None, None)
        bias = self.fc1.bias
        return (prepared_weight(self.fc1.weight, dtype, up),
                None if bias is None else prepared_weight(bias, dtype, up),
                prepared_weight(self.fc2.weight, dtype, down))

    def _fused_forward(
        self, x: torch.Tensor, residual: torch.Tensor | None, dtype: torch.dtype
    ) -> torch.Tensor | None:
        fc1_weight, fc1_bias, fc2_weight = self._weights(dtype)
        kind = "gelu" if self.activation == "gelu" else "swish"
        hidden = fused.linear(x, fc1_weight, fc1_bias, dtype, kind)
        if hidden is None:
            return None
        return fused.linear(hidden, fc2_weight, self.fc2.bias, dtype, residual=residual)

    def _row_block_forward(self, x: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
        """CPU inference over blocks of rows: each block's hidden activation (4x the width) is made,
        activated in place and consumed while it is in cache, and never exists at full size."""
        # The weights as they are (no scaled copies to make): the activation runs on blocks in cache.
        fc1_weight, fc1_bias, fc2_weight = self.fc1.weight, self.fc1.bias, self.fc2.weight
        rows = x.reshape(-1, x.shape[-1])
        residual_rows = None if residual is None else residual.reshape(-1, residual.shape[-1])
        out = rows.new_empty(rows.shape[0], fc2_weight.shape[0])
        step = _rows_per_block(rows.shape[0], fc1_weight.shape[0] * x.element_size())
        for start in range(0, rows.shape[0], step):
            block = slice(start, start + step)
            hidden = F.linear(rows[block], fc1_weight, fc1_bias)
            if self.activation == "gelu":
                torch.ops.aten.gelu_(hidden)
            elif self.activation == "quick_gelu":
                hidden.mul_(hidden.mul(QUICK_GELU_ALPHA).sigmoid_())
            else:
                F.silu(hidden, inplace=True)
            _linear_into(out[block], hidden, fc2_weight, self.fc2.bias,
                         None if residual_rows is None else residual_rows[block])
        return out.view(*x.shape[:-1], out.shape[-1])


# Row blocks of about this many bytes of hidden activation stay in the L2/L3 caches of current CPUs
# while keeping the products large enough to run at full speed (measured in docs/benchmarks.md).
_BLOCK_BYTES = 4 << 20


def _rows_per_block(rows: int, row_bytes: int) -> int:
    """About _BLOCK_BYTES of hidden activation a block, the rows split evenly (no small last block)."""
    blocks = -(-rows // max(64, _BLOCK_BYTES // row_bytes))
    return -(-rows // blocks) if rows else 1


def _linear_into(
    out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
    residual: torch.Tensor | None,
) -> None:
    """out = x @ weight.T + bias (+ residual) without a temporary; CvT's fc2 always has a bias."""
    torch.addmm(bias if residual is None else residual, x, weight.t(), out=out)
    if residual is not None:
        out.add_(bias)


def _same_dtype(x: torch.Tensor, residual: torch.Tensor | None, layer: nn.Linear) -> bool:
    return layer.weight.dtype == x.dtype and (residual is None or residual.dtype == x.dtype)


class Block(nn.Module):
    """Pre-norm transformer block: x + DropPath(Attention(LN(x))), then x + DropPath(MLP(LN(x))).

    With grad_checkpointing set, training keeps only the block's input and recomputes the rest
    in backward (BatchNorm statistics are updated once, as without checkpointing).
    """

    def __init__(self, dim: int, mlp_ratio: float, activation: str, eps: float, drop: float, drop_path: float,
                 **attention_args):
        super().__init__()
        self.norm1 = LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, proj_drop=drop, **attention_args)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), activation, drop)
        self.grad_checkpointing = False

    def forward(self, x: torch.Tensor, height: int, width: int) -> torch.Tensor:
        if self.grad_checkpointing and torch.is_grad_enabled():
            def run(x: torch.Tensor) -> torch.Tensor:
                return self._forward(x, height, width)

            if torch.compiler.is_compiling():
                # Compiled, the recomputation is the partitioner's: it replays the ops backward needs, and
                # the statistics updates (functionalized buffer writes) are not among them. (The "eager"
                # backend has no partitioner and reruns the block: use aot_eager or inductor with it.)
                return checkpoint(run, x, use_reentrant=False)
            # Eager, checkpoint reruns run in backward: there under frozen_running_stats, so that
            # BatchNorm's statistics are updated once, as without checkpointing.
            return checkpoint(run, x, use_reentrant=False,
                              context_fn=lambda: (nullcontext(), frozen_running_stats(self)))
        return self._forward(x, height, width)

    def _forward(self, x: torch.Tensor, height: int, width: int) -> torch.Tensor:
        if self.training and not isinstance(self.drop_path, nn.Identity):
            x = x + self.drop_path(self.attn(self.norm1(x), height, width))
            return x + self.drop_path(self.mlp(self.norm2(x)))
        x = self.attn(self.norm1(x), height, width, residual=x)
        return self.mlp(self.norm2(x), residual=x)


@contextmanager
def frozen_running_stats(module: nn.Module) -> Iterator[None]:
    """Within it, the BatchNorms in module leave their running statistics as they are.

    Momentum 0 keeps the statistics (and keeps the ops, and so the tensors checkpointing saves, the same).
    """
    # _BatchNorm: every BatchNorm, SyncBatchNorm and BatchNorm1d/3d included (convert_sync_batchnorm).
    norms = [m for m in module.modules()
             if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    saved = [(norm.momentum, norm.num_batches_tracked.clone()) for norm in norms]
    for norm in norms:
        norm.momentum = 0.0
    try:
        yield
    finally:
        for norm, (momentum, count) in zip(norms, saved, strict=True):
            norm.momentum = momentum
            norm.num_batches_tracked.copy_(count)

"""optimize_for_inference: a model prepared once for inference (BatchNorm folded, QuickGELU's scaling in the
weights, weights in the compute dtype and the kernels' layout) instead of on every call.

Named as torch.jit.optimize_for_inference and torch.fx's optimize_for_inference, which do the same kind of
work (freeze, fold BatchNorm into convolutions) for TorchScript and FX modules: a reader who knows those
knows what this returns. The result is a snapshot: a new module, the original untouched, later edits to
the original not seen.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from .errors import TorchcvtError
from .fused import plain_ops_only
from .layers import QUICK_GELU_ALPHA, ConvEmbed, ConvProjection, LayerNorm, Mlp, make_activation
from .model import CvT

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class InferenceCvT(CvT):
    """A CvT prepared by optimize_for_inference: eval mode only, no gradients, inputs cast to its dtype."""

    compute_dtype: torch.dtype

    def train(self, mode: bool = True) -> InferenceCvT:
        if mode:
            raise TorchcvtError("a model from optimize_for_inference is for inference only: "
                                "train the original")
        return super().train(False)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward_features(x.to(self.compute_dtype))

    def forward_intermediates(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        return super().forward_intermediates(x.to(self.compute_dtype), *args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The fast CPU paths run only without autograd; tracers and compilers must not see the switch.
        if torch.is_grad_enabled() and not plain_ops_only():
            with torch.no_grad():
                return super().forward(x)
        return super().forward(x)


def optimize_for_inference(model: CvT, dtype: torch.dtype | None = None) -> InferenceCvT:
    """A new eval-only copy of model that computes in dtype (default: the model's own), with the per-call
    weight work done once: BatchNorm folded into the projections' depthwise convolutions, QuickGELU's
    1.702 moved into the MLP weights, weights cast and laid out for the kernels. A snapshot: later edits to
    model do not reach it (call again after changing the weights). Its outputs come in dtype."""
    if not isinstance(model, CvT):
        raise TorchcvtError(f"optimize_for_inference takes a torchcvt CvT, got a {type(model).__name__}")
    if dtype is None:
        dtype = model.head.weight.dtype if isinstance(model.head, nn.Linear) else model.norm.weight.dtype
    if dtype not in DTYPES:
        raise TorchcvtError(f"optimize_for_inference dtype must be one of {', '.join(map(str, DTYPES))}, "
                            f"got {dtype}")
    optimized = copy.deepcopy(model).eval()
    optimized.__class__ = InferenceCvT
    optimized.compute_dtype = dtype
    with torch.no_grad():
        for module in list(optimized.modules()):
            if isinstance(module, ConvProjection) and "bn" in module._modules:
                _fold_batchnorm(module)
            elif isinstance(module, Mlp) and module.activation == "quick_gelu":
                _fold_quick_gelu(module)
        for module in optimized.modules():
            # LayerNorm keeps float32 parameters: its CPU kernel takes bf16 input with them, in float32.
            if not isinstance(module, LayerNorm):
                own = [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]
                for name, tensor in own:
                    if tensor.is_floating_point():
                        setattr(module, name, _as(tensor, dtype))
            if isinstance(module, ConvEmbed):
                # The layout oneDNN's convolution reads for a channels-last map: no copy in each call.
                module.proj.weight.data = module.proj.weight.contiguous(memory_format=torch.channels_last)
    for parameter in optimized.parameters():
        parameter.requires_grad_(False)
    return optimized


def _as(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """tensor in dtype, a parameter staying a parameter (and a buffer a plain tensor)."""
    cast = tensor.detach().to(dtype)
    return nn.Parameter(cast, requires_grad=False) if isinstance(tensor, nn.Parameter) else cast


def _fold_batchnorm(projection: ConvProjection) -> None:
    """projection's conv and BatchNorm replaced by the one convolution equal to both (running statistics)."""
    weight, bias = projection.folded_conv()
    old = projection.conv
    conv = nn.Conv2d(old.in_channels, old.out_channels, old.kernel_size, old.stride, old.padding,
                     old.dilation, old.groups, bias=True, device=weight.device, dtype=weight.dtype)
    conv.weight.copy_(weight)
    conv.bias.copy_(bias)
    projection.conv = conv
    del projection.bn


def _fold_quick_gelu(mlp: Mlp) -> None:
    """fc2(QuickGELU(fc1 x)) as fc2'(SiLU(fc1' x)) with fc1' = 1.702 fc1 and fc2' = fc2 / 1.702: the same
    function (SiLU(1.702 h) = 1.702 QuickGELU(h)), one activation op, no scaled weights made per call."""
    mlp.fc1.weight.mul_(QUICK_GELU_ALPHA)
    if mlp.fc1.bias is not None:
        mlp.fc1.bias.mul_(QUICK_GELU_ALPHA)
    mlp.fc2.weight.div_(QUICK_GELU_ALPHA)
    mlp.activation = "silu"
    mlp.act = make_activation("silu")

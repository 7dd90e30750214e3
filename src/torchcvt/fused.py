"""oneDNN's fused linear for CPU inference: bias, activation or residual add in the matmul kernel; and
bf16 attention as blocked oneDNN products where PyTorch's flash kernel runs bf16 at fp32 speed.

The kernel, torch.ops.mkldnn._linear_pointwise, is a private PyTorch op. It is used only for inference
on the CPU in float32 or bfloat16, only after a check at its first use in each dtype that it gives what
F.linear gives, and never while tracing, compiling or under a dispatch mode. Where it is used is chosen
per CPU (preferred_dtypes): oneDNN's fp32 kernels beat MKL's only with AVX-512, and bf16 is native only
with AVX512-BF16 or AMX; elsewhere callers run plain PyTorch ops. TORCHCVT_FUSED=1 / 0 or
set_fused_linear(True / False) force it on or off. Weights in another form (cast to bfloat16, scaled for
QuickGELU) come from torchcvt.weightcache: made on each call unless set_weight_cache(True) keeps them.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import _get_current_dispatch_mode

from .errors import TorchcvtError
from .weightcache import prepared_weight

logger = logging.getLogger(__name__)

ENV_VAR = "TORCHCVT_FUSED"
_ON, _OFF, _AUTO = ("1", "true", "on", "yes"), ("0", "false", "off", "no"), ("auto", "")
_AVAILABLE = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")

# Scores of one block of query rows (all batch items and heads): a few MB, within a core's share of L2/L3.
ATTENTION_BLOCK_BYTES = 4 << 20

_setting: bool | str | None = None  # True / False forced, "auto" per CPU, None not yet read
_working: dict[torch.dtype, bool] = {}  # result of the first-use check, per dtype


def set_fused_linear(enable: bool | None = True) -> None:
    """Force oneDNN's fused linear for CPU inference on or off, or None for the per-CPU choice
    (the default); overrides TORCHCVT_FUSED."""
    global _setting
    _setting = "auto" if enable is None else bool(enable)


@functools.cache
def preferred_dtypes() -> tuple[torch.dtype, ...]:
    """The dtypes in which the fused kernel is faster than plain ops on this CPU.

    Measured (docs/benchmarks.md): on an AVX2-only CPU oneDNN's fp32 inner product runs 10-20% below
    MKL's (and about 35% below with exact GELU fused in), while on AVX-512 CPUs the fused kernel was the
    faster path; bf16 is fast only where oneDNN has it natively.
    """
    capability = torch.backends.cpu.get_cpu_capability()
    dtypes = (torch.float32,) if capability.startswith("AVX512") else ()
    if torch.ops.mkldnn._is_mkldnn_bf16_supported():
        dtypes += (torch.bfloat16,)
    return dtypes


def fused_linear_enabled(dtype: torch.dtype = torch.float32) -> bool:
    """Whether CPU inference in dtype uses the fused linear: the switch (TORCHCVT_FUSED or
    set_fused_linear), else the per-CPU choice of preferred_dtypes."""
    global _setting
    if _setting is None:
        value = os.environ.get(ENV_VAR, "auto").strip().lower()
        if value not in _ON + _OFF + _AUTO:
            raise TorchcvtError(f"{ENV_VAR} must be 0, 1 or auto (or true/false, on/off), got {value!r}")
        _setting = "auto" if value in _AUTO else value in _ON
    return dtype in preferred_dtypes() if _setting == "auto" else _setting


def plain_ops_only() -> bool:
    """True while tracing, compiling or under a dispatch mode (FlopCounterMode, fake tensors): those
    must see ordinary aten ops, and the compilers fuse on their own."""
    return (torch.jit.is_tracing() or torch.jit.is_scripting() or torch.compiler.is_compiling()
            or _get_current_dispatch_mode() is not None)


def fused_dtype(x: torch.Tensor) -> torch.dtype | None:
    """The dtype the fused linear would compute in for input x, or None where plain ops must run."""
    if not _AVAILABLE or x.device.type != "cpu" or torch.is_grad_enabled() or plain_ops_only():
        return None
    dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else x.dtype
    if dtype not in (torch.float32, torch.bfloat16) or not fused_linear_enabled(dtype):
        return None
    if dtype not in _working:
        _working[dtype] = _check(dtype)
    return dtype if _working[dtype] else None


def linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype,
    activation: str = "none", residual: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """act(x @ weight.T + bias) or that plus residual, in one oneDNN call, weights cast to dtype.

    activation is "none", "gelu" (exact) or "swish" (y * sigmoid(y)). Returns None if the kernel fails;
    it is then switched off for dtype (with one warning) and the caller runs the plain path.
    """
    weight = prepared_weight(weight, dtype)
    bias = None if bias is None else prepared_weight(bias, dtype)
    return _guarded(dtype, lambda: _call(x.to(dtype), weight, bias, activation, residual))


def _call(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, activation: str,
    residual: torch.Tensor | None,
) -> torch.Tensor:
    if residual is not None:
        return torch.ops.mkldnn._linear_pointwise.binary(x, residual, weight, bias, "add")
    algorithm = "none" if activation == "gelu" else ""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, activation, [], algorithm)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor | None:
    """softmax(scale q k^T) v for bf16 CPU inference, or None where scaled_dot_product_attention must run.

    PyTorch's CPU flash-attention kernel runs bf16 at its fp32 speed; two oneDNN bf16 products per block
    of query rows, the block's scores staying in cache, run about 1.5x faster on AVX512-BF16. The scores
    are rounded to bf16 before the softmax, as every matmul-softmax-matmul attention under bf16 autocast
    rounds them (transformers' CvT, the official code); the flash kernel keeps them in float32.
    """
    if q.dtype != torch.bfloat16 or fused_dtype(q) != torch.bfloat16:
        return None
    return blocked_attention(q, k, v, scale)


def blocked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """softmax(scale q k^T) v of (B, heads, N, head dim) tensors, ATTENTION_BLOCK_BYTES of scores a block."""
    batch, heads, queries, head_dim = q.shape
    q, keys_t, values = q.flatten(0, 1), k.flatten(0, 1).transpose(1, 2), v.flatten(0, 1)
    step = max(1, ATTENTION_BLOCK_BYTES // max(1, q.shape[0] * keys_t.shape[-1] * q.element_size()))
    out = torch.empty_like(q)
    block = q.new_empty(q.shape[0], min(step, queries), keys_t.shape[-1])
    for start in range(0, queries, step):
        rows = slice(start, start + step)
        scores = block[:, : min(step, queries - start)]
        torch.baddbmm(scores, q[:, rows], keys_t, beta=0, alpha=scale, out=scores)
        torch.softmax(scores, dim=-1, out=scores)
        torch.bmm(scores, values, out=out[:, rows])
    return out.view(batch, heads, queries, head_dim)


def _guarded(dtype: torch.dtype, fn: Callable[[], torch.Tensor]) -> torch.Tensor | None:
    try:
        return fn()
    except (RuntimeError, NotImplementedError) as error:
        # oneDNN refuses some dtypes on some CPUs (bfloat16 without AVX-512), and a private op may change.
        _working[dtype] = False
        logger.warning("oneDNN fused linear failed in %s (%s); using plain PyTorch ops",
                       dtype, str(error).splitlines()[0])
        return None


def _check(dtype: torch.dtype) -> bool:
    """Whether every form of the fused kernel matches F.linear on a small random case in dtype."""
    # The first use may be inside autocast, which would compute the float32 reference in bfloat16.
    with torch.autocast("cpu", enabled=False):
        return _matches_plain(dtype)


def _matches_plain(dtype: torch.dtype) -> bool:
    generator = torch.Generator().manual_seed(0)
    x, weight, bias, residual = (torch.randn(*shape, generator=generator) / 2
                                 for shape in ((2, 5, 24), (40, 24), (40,), (2, 5, 40)))
    x, weight, bias, residual = (t.to(dtype) for t in (x, weight, bias, residual))
    plain = F.linear(x.float(), weight.float(), bias.float())
    expected = {"none": plain, "gelu": F.gelu(plain), "swish": F.silu(plain), "add": plain + residual.float()}
    tolerance = 1e-4 if dtype == torch.float32 else 3e-2
    for form, want in expected.items():
        add = residual if form == "add" else None
        got = _guarded(dtype, lambda form=form, add=add: _call(x, weight, bias, form, add))
        if got is None:
            return False
        if got.dtype != dtype or not torch.allclose(got.float(), want, rtol=tolerance, atol=tolerance):
            logger.warning("oneDNN fused linear (%s, %s) differs from F.linear by %.2e; using plain ops",
                           form, dtype, (got.float() - want).abs().max().item())
            return False
    return True

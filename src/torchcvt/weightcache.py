"""Tensors derived from parameters for inference (cast, scaled, BatchNorm-folded): made on every call by
default, or, opted into with set_weight_cache(True), made once and kept.

Kept tensors cannot be made safe cheaply: a change through `.data` (`p.data.mul_(0.5)`, a copy into
`p.data`, a module's .to()/.float() that frees a storage and gets the same address back) leaves no trace
that a check could see without reading every weight, so a cache would answer with the old weights. It is
therefore off unless asked for. When on, a derived tensor is remade after the in-place updates PyTorch
counts (optimizer steps, load_state_dict, in-place ops under no_grad, BatchNorm statistics) and when a
parameter or module is replaced; after anything else call clear_weight_cache(). Only inference uses it:
a derived tensor carries no autograd history.

Deprecated (removed in the next release): torchcvt.optimize_for_inference makes these tensors once in a
new module, a snapshot that cannot go stale; set_weight_cache and clear_weight_cache warn and still work.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Hashable
from typing import TypeVar

import torch
from torch.utils.weak import WeakIdKeyDictionary

# key tensor -> {tag: (stamp of the sources, derived tensor)}
_cache: WeakIdKeyDictionary = WeakIdKeyDictionary()
_enabled = False

T = TypeVar("T")


def set_weight_cache(enable: bool = True) -> None:
    """Keep weights derived for CPU inference between calls (faster at small batches) or make them on every
    call (the default). With it on, call clear_weight_cache() after editing parameters through `.data` or
    moving the model to another dtype or device. Deprecated: use torchcvt.optimize_for_inference."""
    global _enabled
    _deprecated("set_weight_cache")
    _enabled = bool(enable)
    if not _enabled:
        _cache.clear()


def weight_cache_enabled() -> bool:
    """Whether derived weights are kept between calls (set_weight_cache)."""
    return _enabled


def clear_weight_cache() -> None:
    """Forget every kept derived tensor, so that the next call remakes them from the parameters.
    Deprecated with set_weight_cache."""
    _deprecated("clear_weight_cache")
    _cache.clear()


def _deprecated(name: str) -> None:
    warnings.warn(f"torchcvt.{name} is deprecated and will be removed in the next release: "
                  "torchcvt.optimize_for_inference(model, dtype) prepares the weights once, in a new module "
                  "that later edits to the model cannot make stale", DeprecationWarning, stacklevel=3)


def derived(
    key: torch.Tensor, tag: Hashable, sources: tuple[torch.Tensor | None, ...], make: Callable[[], T]
) -> T:
    """make()'s result, or with the cache on the one kept for (key, tag) while no source has changed."""
    # Inference tensors (made under torch.inference_mode) have no version counter to watch.
    if not _enabled or any(t is not None and t.is_inference() for t in (key, *sources)):
        with torch.no_grad():
            return make()
    stamp = tuple(None if t is None else (t._version, t.data_ptr(), t.dtype, t.device) for t in sources)
    entries = _cache.get(key)
    if entries is None:
        entries = _cache[key] = {}
    cached = entries.get(tag)
    if cached is not None and cached[0] == stamp:
        return cached[1]
    with torch.no_grad():
        value = make()
    entries[tag] = (stamp, value)
    return value


def prepared_weight(weight: torch.Tensor, dtype: torch.dtype, scale: float | None = None) -> torch.Tensor:
    """weight cast to dtype (and times scale)."""
    if weight.dtype == dtype and scale is None:
        return weight
    # Scaled in the parameter's own precision, then cast: one rounding, as for the plain path's cast.
    return derived(weight, (dtype, scale), (weight,),
                   lambda: (weight if scale is None else weight * scale).to(dtype))


def cached_for(key: torch.Tensor) -> int:
    """How many derived tensors are kept for key."""
    return len(_cache.get(key) or ())

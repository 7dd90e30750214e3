"""Tensors derived from parameters for inference (cast, scaled, BatchNorm-folded), made once.

A derived tensor is kept, keyed by a parameter, for as long as every tensor it was made from is unchanged:
same in-place version counter (an optimizer step, load_state_dict or a running-statistics update bumps
it) and same storage (a .to() or a replaced .data gives new storage). It dies with its key parameter.
Only inference uses it: a derived tensor carries no autograd history.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import TypeVar

import torch
from torch.utils.weak import WeakIdKeyDictionary

# key tensor -> {tag: (stamp of the sources, derived tensor)}
_cache: WeakIdKeyDictionary = WeakIdKeyDictionary()

T = TypeVar("T")


def derived(
    key: torch.Tensor, tag: Hashable, sources: tuple[torch.Tensor | None, ...], make: Callable[[], T]
) -> T:
    """make()'s result for (key, tag), made again only when one of sources has changed since."""
    stamp = tuple(None if t is None else (t._version, t.data_ptr()) for t in sources)
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
    """weight cast to dtype (and times scale), made once for as long as the parameter is unchanged."""
    if weight.dtype == dtype and scale is None:
        return weight
    # Scaled in the parameter's own precision, then cast: one rounding, as for the plain path's cast.
    return derived(weight, (dtype, scale), (weight,),
                   lambda: (weight if scale is None else weight * scale).to(dtype))


def cached_for(key: torch.Tensor) -> int:
    """How many derived tensors are kept for key."""
    return len(_cache.get(key) or ())

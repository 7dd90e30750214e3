"""Where a run's starting weights come from: released weights by tag (the Hub cache) or a local file.

The one place the engine asks the weights layer about tags and files, so that layer can move freely.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import TorchcvtError

if TYPE_CHECKING:
    from ..weights import Checkpoint


def released_tags() -> list[str]:
    """Every tagged name with released weights, e.g. 'cvt_13_384.ms_in22k_ft_in1k'."""
    from ..factory import list_models

    return list_models(pretrained=True)


def tag_architecture(tag: str, key: str = "model.pretrained") -> str:
    """The variant a released-weights tag fits (an untagged name stands for its default tag); a one-line
    error naming key for a name without released weights."""
    tags = released_tags()
    if tag not in tags and not any(known.startswith(f"{tag}.") for known in tags):
        raise TorchcvtError(f"{key}={tag!r} is not a released-weights tag; tags: {', '.join(tags)}")
    return tag.split(".", 1)[0]


def released_weights(tag: str) -> Checkpoint:
    """A tag's released weights, read from the Hugging Face cache (fetched there when missing), with the
    class names and activation the weight catalogue records."""
    from ..factory import pretrained_checkpoint

    return pretrained_checkpoint(tag)[1]


def checkpoint_architecture(path: str | Path) -> str | None:
    """The variant a checkpoint file records (torchcvt checkpoints do), else None."""
    return read_weights(path).architecture


def read_weights(path: str | Path) -> Checkpoint:
    """A weights file read once: its tensors, head size, class names and recorded architecture."""
    from ..weights import read_checkpoint

    return read_checkpoint(path)


def adopted_architecture(path: str | Path, name: str, overrides: Mapping[str, Any]) -> dict[str, Any]:
    """The model config fields a weights file records that building `name` with `overrides` from it
    takes over (create_model's rule), where they differ from that build's defaults: what a run's config
    must say for the model it trains. A checkpoint `name` cannot hold is a one-line error."""
    from ..config import architecture_differences, variant_config
    from ..weights.load import fit_config

    fitted = fit_config(read_weights(path), name, dict(overrides))
    base = variant_config(name, **overrides).to_dict()
    taken = tuple(key for key in fitted if key not in overrides)
    return {key: value for key, value, _ in architecture_differences(fitted, base, taken)}

"""Fitting a checkpoint to a model: the one architecture check, the head rule, and load_into."""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

from timm.models import adapt_input_conv

from ..config import ARCHITECTURE_FIELDS, VARIANTS, CvtConfig, architecture_differences, variant_config
from ..errors import TorchcvtError
from ..model import CvT
from .checkpoint import Checkpoint, read_checkpoint
from .io import StateDict, preview

logger = logging.getLogger(__name__)

FIRST_CONV = "stage0.patch_embed.proj"
# in_chans is adapted (timm's adapt_input_conv), and another activation fits the same weights: neither
# field stops a checkpoint from loading.
_ADAPTABLE = ("num_channels", "activation")


def head_size(checkpoint: Checkpoint | None, num_classes: int | None, features_only: bool) -> int:
    """The head a model gets: the checkpoint's unless num_classes asks for another (1000 without either).

    One rule for every caller (create_model, predictor, the commands); a backbone has none.
    """
    if features_only:
        return 0
    if num_classes is not None:
        return num_classes
    return checkpoint.num_classes if checkpoint is not None and checkpoint.num_classes else 1000


def recorded_fields(checkpoint: Checkpoint) -> dict[str, Any]:
    """The architecture fields a checkpoint records (all of them for torchcvt's own files)."""
    return {key: value for key, value in (checkpoint.config or {}).items() if key in ARCHITECTURE_FIELDS}


def holding_variants(fields: dict[str, Any]) -> list[str]:
    """Registered variants whose architecture has every one of these recorded field values."""
    return [name for name in VARIANTS
            if not architecture_differences(fields, variant_config(name).to_dict(),
                                            tuple(f for f in ARCHITECTURE_FIELDS if f not in _ADAPTABLE))]


def fit_config(checkpoint: Checkpoint, name: str, requested: dict[str, Any]) -> dict[str, Any]:
    """The config overrides that build variant `name` as the checkpoint holds it.

    The checkpoint's recorded fields are taken unless the caller set them (requested: load_into then checks
    them). A checkpoint of another registered variant whose architecture `name` cannot hold is a ValueError
    naming it; one of an unregistered architecture is built as it records, with a notice. A foreign
    transformers folder records no activation: it gets the default, with a notice.
    """
    saved = recorded_fields(checkpoint)
    base = variant_config(name).to_dict()
    unset = tuple(f for f in ARCHITECTURE_FIELDS if f not in requested and f not in _ADAPTABLE)
    differences = architecture_differences(saved, base, unset)
    if differences and checkpoint.architecture != name:
        held = [checkpoint.architecture] if checkpoint.architecture else holding_variants(saved)
        listed = ", ".join(f"{field} {theirs}" for field, theirs, _ in differences)
        if not held:  # a custom architecture, recorded in full: build it, saying so
            logger.warning("%s holds a CvT of its own architecture, not %s's (%s): building what it records",
                           checkpoint.path, name, listed)
        else:
            field, theirs, ours = differences[0]
            raise TorchcvtError(
                f"checkpoint {checkpoint.path} holds a {' or '.join(held)} whose {field} is {theirs} but "
                f"{name}'s is {ours}, so {name} cannot hold it: use {held[0]} as the model (or leave it out)"
            )
    if checkpoint.architecture and checkpoint.architecture != name:
        logger.info("%s holds %s weights: building them as %s, as asked (the same architecture)",
                    checkpoint.path, checkpoint.architecture, name)
    if checkpoint.format == "hf" and "activation" not in saved and "activation" not in requested:
        logger.warning(
            "%s is a transformers folder, which does not record the activation its weights were trained "
            "with: using %s (torchcvt's default, the official CvT's QuickGELU); if they were trained with "
            "transformers' exact GELU, pass activation='gelu' (--set activation=gelu)",
            checkpoint.path, base["activation"],
        )
    return {**saved, **requested}


def load_into(model: CvT, checkpoint: Checkpoint) -> Checkpoint:
    """Load checkpoint's weights into model: the only architecture check and head adaptation.

    A recorded architecture field that differs is a ValueError naming it; an activation that differs warns
    in the log. A head of another size than the model's is left out (the model keeps its own, new head); a
    first convolution for other input channels is adapted as timm does. Class names come along with the
    head they label.
    """
    theirs = recorded_fields(checkpoint)
    clashes = [(field, saved, ours) for field, saved, ours in
               architecture_differences(theirs, model.config.to_dict()) if field not in _ADAPTABLE]
    if clashes:
        _raise_other_architecture(checkpoint, theirs, clashes)
    if theirs.get("activation", model.config.activation) != model.config.activation:
        logger.warning("%s was saved with activation=%r but the model uses %r: its outputs will differ from "
                       "the saved model's", checkpoint.path, theirs["activation"], model.config.activation)
    state_dict = _fit_state_dict(model, checkpoint)
    model.load_state_dict(state_dict)
    names = checkpoint.class_names
    if names and checkpoint.num_classes == model.num_classes == len(names):
        model.pretrained_cfg = {**getattr(model, "pretrained_cfg", {}), "label_names": tuple(names)}
    return checkpoint


def _fit_state_dict(model: CvT, checkpoint: Checkpoint) -> StateDict:
    state_dict = dict(checkpoint.state_dict)
    own = model.state_dict()
    # torch copies any dtype into a float tensor without a word: int8, bool or complex weights (a quantized
    # or corrupt file) would load as garbage.
    wrong = next((k for k in own if k in state_dict and own[k].is_floating_point()
                  and not state_dict[k].is_floating_point()), None)
    if wrong is not None:
        raise TorchcvtError(f"{checkpoint.path}: tensor {wrong} holds {str(state_dict[wrong].dtype)[6:]} "
                            f"values where the model has {str(own[wrong].dtype)[6:]} weights")
    if checkpoint.num_classes != model.num_classes:
        state_dict = {key: value for key, value in state_dict.items() if not key.startswith("head.")}
        state_dict.update({key: value for key, value in own.items() if key.startswith("head.")})
        if model.num_classes:  # a headless backbone (num_classes=0, features_only) drops the head by design
            logger.info("%s has a head of %d classes, the model one of %d: the model keeps its new head, "
                        "initialised at random (train it before use)", checkpoint.path,
                        checkpoint.num_classes, model.num_classes)
    key = f"{FIRST_CONV}.weight"
    if key in state_dict and key in own and state_dict[key].shape[1] != own[key].shape[1]:
        state_dict[key] = adapt_input_conv(own[key].shape[1], state_dict[key])
    # BatchNorm's batch counters do not change outputs; some exports drop them.
    for name, value in own.items():
        if name.endswith("num_batches_tracked"):
            state_dict.setdefault(name, value)
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    misshaped = [f"{k} {tuple(state_dict[k].shape)} vs {tuple(own[k].shape)} in the model"
                 for k in own if k in state_dict and state_dict[k].shape != own[k].shape]
    if missing or unexpected or misshaped:
        problems = [f"{len(keys)} {label} ({preview(keys)})" for label, keys in
                    (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)) if keys]
        hint = _layout_hint(checkpoint.state_dict, model.config)
        raise TorchcvtError(f"{checkpoint.path} does not fit the model{hint}: {'; '.join(problems)}")
    return state_dict


def _raise_other_architecture(checkpoint: Checkpoint, saved: dict[str, Any],
                              clashes: list[tuple[str, Any, Any]]) -> None:
    names = holding_variants(saved)
    like = f" (it looks like {' or '.join(names)})" if names else ""
    listed = "; ".join(f"{field} is {theirs} there but {ours} here" for field, theirs, ours in clashes)
    raise TorchcvtError(f"{checkpoint.path} was saved from another architecture{like}: {listed}; "
                     "create the model with matching overrides")


def _layout(state_dict: StateDict) -> tuple[list[int], list[int]]:
    """Depth and width of each stage as the keys and shapes of a state dict show them."""
    depth, width = [], []
    while f"stage{len(width)}.patch_embed.proj.weight" in state_dict:
        stage = len(width)
        width.append(state_dict[f"stage{stage}.patch_embed.proj.weight"].shape[0])
        block = re.compile(rf"stage{stage}\.blocks\.(\d+)\.")
        depth.append(len({match.group(1) for key in state_dict if (match := block.match(key))}))
    return depth, width


def _layout_hint(state_dict: StateDict, config: CvtConfig) -> str:
    depth, width = _layout(state_dict)
    if not width or (depth, width) == (list(config.depth), list(config.embed_dim)):
        return ""  # no stage to read (its first convolution is missing), or the model's own layout
    names = holding_variants({"depth": depth, "embed_dim": width})
    return (f": it looks like another variant (depth {depth}, embed_dim {width}; the model has depth "
            f"{list(config.depth)}, embed_dim {list(config.embed_dim)})"
            + (f" such as {' or '.join(names)}" if names else ""))


def load_checkpoint(model: CvT, path: str | Path | Checkpoint) -> Checkpoint:
    """Load an official, transformers or torchcvt checkpoint (a path, or one already read) into model."""
    return load_into(model, path if isinstance(path, Checkpoint) else read_checkpoint(path))


def checkpoint_variant(checkpoint: Checkpoint) -> str | None:
    """The variant a checkpoint records, else the first registered one whose architecture it records."""
    if checkpoint.architecture:
        return checkpoint.architecture
    saved = recorded_fields(checkpoint)
    held = holding_variants(saved) if saved else []
    if len(held) > 1:
        logger.info("%s names no variant; its architecture is that of %s: building %s", checkpoint.path,
                    " and ".join(held), held[0])
    return held[0] if held else None

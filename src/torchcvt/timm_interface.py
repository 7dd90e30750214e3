"""The parts of CvT's interface that timm's helpers call: parameter groups for layer-wise decay,
weight-decay exemptions, gradient checkpointing, input-size changes, and feature maps (forward_intermediates,
prune_intermediate_layers) for backbones."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .errors import TorchcvtError
from .geometry import stage_grid
from .layers import Block, token_map

OUTPUT_FORMATS = ("NCHW", "NLC")


class TimmInterface:
    """Mixed into CvT, whose stages, norm, config and feature_info these methods use."""

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """Class tokens and position embeddings are exempt from weight decay."""
        return {name for name, _ in self.named_parameters() if name.endswith(("cls_token", "pos_embed"))}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """Parameter groups for timm's layer-wise LR decay: the stem, then each block (coarse: each stage)."""
        # A stage's token embedding and class token join its first block; the final norm joins the last.
        blocks = r"^stage(\d+)" if coarse else [
            (r"^stage(\d+)\.(?:patch_embed|cls_token|pos_embed)", (0,)),
            (r"^stage(\d+)\.blocks\.(\d+)", None),
            (r"^norm", (99999,)),
        ]
        return {"stem": r"^stage0\.patch_embed", "blocks": blocks}

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block in backward instead of storing its activations (timm's convention)."""
        for module in self.modules():
            if isinstance(module, Block):
                module.grad_checkpointing = enable

    @torch.jit.ignore
    def set_input_size(self, img_size: int | tuple[int, int] | None = None, patch_size: Any = None) -> None:
        """Make img_size the model's nominal input size; position embeddings (if any) are resampled to it.

        Any input size runs without this call; it only matters for position embeddings and the data config.
        """
        if patch_size is not None:
            raise TorchcvtError("CvT's token embeddings are convolutions of a fixed size: patch_size "
                             "cannot change")
        if img_size is None:
            return
        height, width = (img_size, img_size) if isinstance(img_size, int) else img_size
        if height != width:
            raise TorchcvtError(f"img_size must be square (config.img_size is one side), got {img_size!r}")
        for i, stage in enumerate(self.stages):
            if stage.pos_embed is not None:
                grid = stage_grid(self.config, i, height, width)
                resampled = F.interpolate(stage.pos_embed.detach(), size=grid, mode="bicubic",
                                          align_corners=False)
                stage.pos_embed = nn.Parameter(resampled)
        self.config = self.config.replace(img_size=height)
        if hasattr(self, "pretrained_cfg"):
            size = (self.config.num_channels, height, width)
            self.pretrained_cfg = {**self.pretrained_cfg, "input_size": size}

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | list[int] | tuple[int, ...] | None = None,
        norm: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
        stop_early: bool = False,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """Feature maps of feature_info's entries (0: stem, 1..n: stages) as timm's models return them.

        indices: None (all), n (the last n) or a list; norm applies the final norm to the last stage's map;
        output_fmt 'NCHW' gives (B, C, H, W) maps, 'NLC' (B, H*W, C) tokens without the class token.
        Unless intermediates_only, also the normalised final tokens (forward_features' output).
        stop_early runs the stages only as far as the last index asked for.
        """
        if output_fmt not in OUTPUT_FORMATS:
            raise TorchcvtError(f"output_fmt must be one of {list(OUTPUT_FORMATS)}, got {output_fmt!r}")
        take, last_taken = self._take_indices(indices)
        self._check(x)
        last = len(self.feature_info) - 1
        run_to = last_taken if stop_early else last
        intermediates = []
        tokens = x
        for i, stage in enumerate(self.stages):
            embedded, (height, width) = stage.patch_embed(x)
            if i == 0 and 0 in take:
                intermediates.append(_as_format(embedded, height, width, output_fmt))
            tokens = embedded
            if i + 1 > run_to:
                break
            tokens = stage.forward_tokens(embedded, height, width)
            grid_tokens = tokens[:, 1:] if stage.cls_token is not None else tokens
            if i + 1 in take:
                shown = self.norm(grid_tokens) if norm and i + 1 == last else grid_tokens
                intermediates.append(_as_format(shown, height, width, output_fmt))
            if i + 1 < len(self.stages):
                x = token_map(grid_tokens, height, width)
        return intermediates if intermediates_only else (self.norm(tokens), intermediates)

    def _take_indices(self, indices: int | list[int] | tuple[int, ...] | None) -> tuple[list[int], int]:
        """Absolute feature indices for timm's `indices` argument, and the largest of them."""
        count = len(self.feature_info)
        if indices is None:
            indices = count
        if isinstance(indices, int):
            if not 0 < indices <= count:
                raise TorchcvtError(f"indices={indices} asks for the last {indices} of {count} features")
            take = list(range(count - indices, count))
        else:
            take = [i + count if i < 0 else i for i in indices]
            if not take or any(not 0 <= i < count for i in take):
                raise TorchcvtError(f"feature indices {list(indices)} are out of range 0..{count - 1} "
                                 f"(0: stem, 1..{count - 1}: stages)")
        return take, max(take)

    def prune_intermediate_layers(
        self,
        indices: int | list[int] | tuple[int, ...] = 1,
        prune_norm: bool = False,
        prune_head: bool = True,
    ) -> list[int]:
        """Drop the stages after the last feature in `indices` (and the head, and the norm); returns them."""
        take, last_taken = self._take_indices(indices)
        kept = max(last_taken, 1)  # the stem is part of stage 0, which stays
        for i in range(kept, self.num_stages):
            delattr(self, f"stage{i}")
        if kept < self.num_stages:
            self.num_stages = kept
            self.num_features = self.config.embed_dim[kept - 1]
            self.has_cls_token = self.config.cls_token[kept - 1]
            # The final norm has the width of a stage that no longer exists.
            prune_norm = True
        self.feature_info = self.feature_info[: last_taken + 1]
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0, "")
        return take


def _as_format(tokens: torch.Tensor, height: int, width: int, output_fmt: str) -> torch.Tensor:
    """Grid tokens (B, H*W, C) as a map (B, C, H, W) or as they are."""
    if output_fmt == "NLC":
        return tokens
    return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], height, width)


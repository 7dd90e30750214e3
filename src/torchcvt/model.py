"""The CvT model: three (or any number of) stages, a final norm and a linear head."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from timm.layers import trunc_normal_
from timm.models import FeatureInfo
from torch import nn

from .config import CvtConfig
from .layers import Block, ConvEmbed, LayerNorm, token_map


def stage_grid(config: CvtConfig, stage: int, height: int, width: int) -> tuple[int, int]:
    """Token-map size after the token embedding of `stage` for an input of height x width."""
    for i in range(stage + 1):
        kernel, stride, padding = embedding_geometry(config, i)
        height = (height + 2 * padding - kernel) // stride + 1
        width = (width + 2 * padding - kernel) // stride + 1
    return height, width


def embedding_geometry(config: CvtConfig, stage: int) -> tuple[int, int, int]:
    """(kernel, stride, padding) of a stage's token embedding: overlapping conv, or ViT-style patches."""
    if config.token_embedding[stage] == "patch":
        return config.patch_stride[stage], config.patch_stride[stage], 0
    return config.patch_sizes[stage], config.patch_stride[stage], config.patch_padding[stage]


class CvtStage(nn.Module):
    """Token embedding, optional position embedding and class token, then a stack of blocks."""

    def __init__(self, config: CvtConfig, index: int):
        super().__init__()
        c, i = config, index
        in_chans = c.num_channels if i == 0 else c.embed_dim[i - 1]
        dim = c.embed_dim[i]
        kernel, stride, padding = embedding_geometry(c, i)
        self.patch_embed = ConvEmbed(in_chans, dim, kernel, stride, padding, c.layer_norm_eps)
        self.pos_drop = nn.Dropout(c.drop_rate[i])
        if c.position_embedding[i]:
            grid = stage_grid(c, i, c.img_size, c.img_size)
            self.pos_embed = nn.Parameter(torch.zeros(1, dim, *grid))
        else:
            self.pos_embed = None
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim)) if c.cls_token[i] else None
        # Stochastic depth rises linearly over this stage's blocks, as in the official code.
        # Computed on the CPU so that the model can also be built on the meta device.
        rates = torch.linspace(0, c.drop_path_rate[i], c.depth[i], device="cpu").tolist()
        self.blocks = nn.ModuleList(
            Block(
                dim,
                c.mlp_ratio[i],
                c.activation,
                c.layer_norm_eps,
                drop=c.drop_rate[i],
                drop_path=rate,
                num_heads=c.num_heads[i],
                qkv_bias=c.qkv_bias[i],
                attn_drop=c.attention_drop_rate[i],
                method=c.qkv_projection_method[i],
                kernel_size=c.kernel_qkv[i],
                padding_kv=c.padding_kv[i],
                stride_kv=c.stride_kv[i],
                padding_q=c.padding_q[i],
                stride_q=c.stride_q[i],
                with_cls_token=c.cls_token[i],
            )
            for rate in rates
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """Image-like map (B, C, H, W) in; tokens (B, [1 +] H'W', C') and the grid (H', W') out."""
        x, (height, width) = self.patch_embed(x)
        return self.forward_tokens(x, height, width), (height, width)

    def forward_tokens(self, x: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """The embedded tokens (B, H'W', C') through position embedding, class token and the blocks."""
        if self.pos_embed is not None:
            pos = self.pos_embed
            if pos.shape[-2:] != (height, width):
                pos = F.interpolate(pos, size=(height, width), mode="bicubic", align_corners=False)
            x = x + pos.flatten(2).transpose(1, 2)
        if self.cls_token is not None:
            # In the tokens' dtype: under autocast a float32 class token would promote the whole
            # stage's residual stream to float32, unlike the stages before it.
            x = torch.cat((self.cls_token.to(x.dtype).expand(x.shape[0], -1, -1), x), dim=1)
        x = self.pos_drop(x)
        for block in self.blocks:
            x = block(x, height, width)
        return x


GLOBAL_POOLS = ("token", "avg", "")
OUTPUT_FORMATS = ("NCHW", "NLC")


class CvT(nn.Module):
    """Convolutional vision Transformer (Wu et al., 2021); state dict keys match the official code.

    global_pool: 'token' (the class token; the default when the last stage has one), 'avg' (mean of the
    grid tokens) or '' (no pooling: the head sees every token).
    """

    def __init__(self, config: CvtConfig, global_pool: str | None = None):
        super().__init__()
        self.config = config
        self.num_classes = config.num_classes
        self.num_features = config.embed_dim[-1]
        self.has_cls_token = config.cls_token[-1]
        self.num_stages = config.num_stages
        self.global_pool = self._check_pool(global_pool)
        for i in range(config.num_stages):
            self.add_module(f"stage{i}", CvtStage(config, i))
        self.norm = LayerNorm(self.num_features, eps=config.layer_norm_eps)
        self.head_drop = nn.Dropout(config.head_drop_rate)
        self.head = nn.Linear(self.num_features, config.num_classes) if config.num_classes else nn.Identity()
        # Feature 0 is the convolutional stem (stage 0's token embedding), 1..n the stages, as timm
        # numbers a CNN's stem and stages: out_indices=(1, 2, 3) are the three stage maps.
        self.feature_info = [{"num_chs": config.embed_dim[0], "reduction": config.patch_stride[0],
                              "module": "stage0.patch_embed"}]
        reduction = 1
        for i in range(config.num_stages):
            reduction *= config.patch_stride[i]
            self.feature_info.append(
                {"num_chs": config.embed_dim[i], "reduction": reduction, "module": f"stage{i}"}
            )
        self.init_weights()

    @property
    def stages(self) -> list[CvtStage]:
        return [getattr(self, f"stage{i}") for i in range(self.num_stages)]

    def _check_pool(self, global_pool: str | None) -> str:
        if global_pool is None:
            return "token" if self.has_cls_token else "avg"
        if global_pool not in GLOBAL_POOLS:
            raise ValueError(f"global_pool must be one of {list(GLOBAL_POOLS)}, got {global_pool!r}")
        if global_pool == "token" and not self.has_cls_token:
            raise ValueError("global_pool='token' needs a class token in the last stage (cls_token[-1]); "
                             "use 'avg'")
        return global_pool

    def init_weights(self) -> None:
        """trunc_normal(std=initializer_range) or xavier for Linear layers, as in the official code."""
        std = self.config.initializer_range
        for module in self.modules():
            if isinstance(module, nn.Linear):
                if self.config.init == "xavier":
                    nn.init.xavier_uniform_(module.weight)
                else:
                    trunc_normal_(module.weight, std=std)
                # The official code leaves the head's bias at PyTorch's default (uniform) initialisation.
                if module.bias is not None and module is not self.head:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, (nn.LayerNorm, nn.BatchNorm2d)):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        for stage in self.stages:
            if stage.cls_token is not None:
                trunc_normal_(stage.cls_token, std=std)
            if stage.pos_embed is not None:
                trunc_normal_(stage.pos_embed, std=std)

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
            raise ValueError("CvT's token embeddings are convolutions of a fixed size: patch_size "
                             "cannot change")
        if img_size is None:
            return
        height, width = (img_size, img_size) if isinstance(img_size, int) else img_size
        if height != width:
            raise ValueError(f"img_size must be square (config.img_size is one side), got {img_size!r}")
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

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """Replace the head by a freshly initialised one with num_classes outputs (0: no head)."""
        if global_pool is not None:
            self.global_pool = self._check_pool(global_pool)
        self.num_classes = num_classes
        self.config = self.config.replace(num_classes=num_classes)
        device = self.stage0.patch_embed.proj.weight.device
        self.head = nn.Linear(self.num_features, num_classes, device=device) if num_classes else nn.Identity()
        if num_classes:
            trunc_normal_(self.head.weight, std=self.config.initializer_range)
            nn.init.zeros_(self.head.bias)

    def check_input(self, x: torch.Tensor) -> None:
        """Raise ValueError with a readable message for a tensor the model cannot take."""
        if x.dim() != 4:
            raise ValueError(
                f"expected a batch of images (B, C, H, W), got a tensor of shape {tuple(x.shape)}"
            )
        if x.shape[1] != self.config.num_channels:
            raise ValueError(
                f"input has {x.shape[1]} channels but the model expects {self.config.num_channels} "
                f"(shape {tuple(x.shape)})"
            )
        height, width = x.shape[-2:]
        for i in range(self.num_stages):
            grid = stage_grid(self.config, i, height, width)
            if min(grid) < 1:
                raise ValueError(
                    f"input of {height}x{width} pixels is too small: stage {i + 1}'s token embedding leaves "
                    f"no tokens; the smallest size this model takes is {self.min_input_size()} pixels a side"
                )

    def min_input_size(self) -> int:
        """The smallest side length that leaves every stage at least one token."""
        size = 1
        while min(stage_grid(self.config, self.num_stages - 1, size, size)) < 1:
            size += 1
        return size

    def _check(self, x: torch.Tensor) -> None:
        if not (torch.jit.is_tracing() or torch.jit.is_scripting() or torch.compiler.is_compiling()):
            self.check_input(x)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised tokens of the last stage, class token first when it has one: (B, [1 +] N, C)."""
        self._check(x)
        for i, stage in enumerate(self.stages):
            tokens, (height, width) = stage(x)
            if i + 1 < len(self.stages):
                x = token_map(tokens[:, 1:] if stage.cls_token is not None else tokens, height, width)
        return self.norm(tokens)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Pool forward_features' output as global_pool says, then the classifier."""
        if self.global_pool == "token":
            x = x[:, 0]
        elif self.global_pool == "avg":
            x = (x[:, 1:] if self.has_cls_token else x).mean(dim=1)
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

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
            raise ValueError(f"output_fmt must be one of {list(OUTPUT_FORMATS)}, got {output_fmt!r}")
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
                raise ValueError(f"indices={indices} asks for the last {indices} of {count} features")
            take = list(range(count - indices, count))
        else:
            take = [i + count if i < 0 else i for i in indices]
            if not take or any(not 0 <= i < count for i in take):
                raise ValueError(f"feature indices {list(indices)} are out of range 0..{count - 1} "
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
    return tokens.transpose(1, 2).reshape(tokens.shape[0], -1, height, width)


class CvtFeatures(nn.Module):
    """Backbone for detection and segmentation: forward returns the feature maps of out_indices.

    out_indices number feature_info's entries: 0 is the stem, 1..n the stages (default: every stage).
    """

    def __init__(self, model: CvT, out_indices: int | list[int] | tuple[int, ...] | None = None):
        super().__init__()
        if out_indices is None:
            out_indices = tuple(range(1, model.num_stages + 1))
        stages = [dict(info) for info in model.feature_info]
        self.out_indices = tuple(model.prune_intermediate_layers(out_indices))
        self.model = model
        # timm's FeatureInfo, so that backbone code can call feature_info.channels() / .reduction().
        self.feature_info = FeatureInfo(stages, out_indices=self.out_indices)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.model.forward_intermediates(x, self.out_indices, intermediates_only=True)

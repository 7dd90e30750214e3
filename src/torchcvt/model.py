"""The CvT model: three (or any number of) stages, a final norm and a linear head."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import trunc_normal_
from timm.models import FeatureInfo
from torch import nn

from .config import CvtConfig
from .layers import Block, ConvEmbed, LayerNorm


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
        return x, (height, width)


class CvT(nn.Module):
    """Convolutional vision Transformer (Wu et al., 2021); state dict keys match the official code."""

    def __init__(self, config: CvtConfig):
        super().__init__()
        self.config = config
        self.num_classes = config.num_classes
        self.num_features = config.embed_dim[-1]
        self.has_cls_token = config.cls_token[-1]
        for i in range(config.num_stages):
            self.add_module(f"stage{i}", CvtStage(config, i))
        self.norm = LayerNorm(self.num_features, eps=config.layer_norm_eps)
        self.head_drop = nn.Dropout(config.head_drop_rate)
        self.head = nn.Linear(self.num_features, config.num_classes) if config.num_classes else nn.Identity()
        reduction = 1
        self.feature_info = []
        for i in range(config.num_stages):
            reduction *= config.patch_stride[i]
            self.feature_info.append(
                {"num_chs": config.embed_dim[i], "reduction": reduction, "module": f"stage{i}"}
            )
        self.init_weights()

    @property
    def stages(self) -> list[CvtStage]:
        return [getattr(self, f"stage{i}") for i in range(self.config.num_stages)]

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
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block in backward instead of storing its activations (timm's convention)."""
        for module in self.modules():
            if isinstance(module, Block):
                module.grad_checkpointing = enable

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the head by a freshly initialised one with num_classes outputs (0: no head)."""
        self.num_classes = num_classes
        self.config = self.config.replace(num_classes=num_classes)
        device = self.norm.weight.device
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
        for i in range(self.config.num_stages):
            grid = stage_grid(self.config, i, height, width)
            if min(grid) < 1:
                raise ValueError(
                    f"input of {height}x{width} pixels is too small: stage {i + 1}'s token embedding leaves "
                    f"no tokens; the smallest size this model takes is {self.min_input_size()} pixels a side"
                )

    def min_input_size(self) -> int:
        """The smallest side length that leaves every stage at least one token."""
        size = 1
        while min(stage_grid(self.config, self.config.num_stages - 1, size, size)) < 1:
            size += 1
        return size

    def _run_stages(self, x: torch.Tensor, keep_maps: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
        if not (torch.jit.is_tracing() or torch.jit.is_scripting() or torch.compiler.is_compiling()):
            self.check_input(x)
        maps = []
        for stage in self.stages:
            tokens, (height, width) = stage(x)
            grid_tokens = tokens[:, 1:] if stage.cls_token is not None else tokens
            x = grid_tokens.transpose(1, 2).reshape(tokens.shape[0], -1, height, width)
            if keep_maps:
                maps.append(x)
        return tokens, maps

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised tokens of the last stage, class token first when it has one: (B, [1 +] N, C)."""
        tokens, _ = self._run_stages(x, keep_maps=False)
        return self.norm(tokens)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Class token (or mean of all tokens) of forward_features' output, then the classifier."""
        x = x[:, 0] if self.has_cls_token else x.mean(dim=1)
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(
        self, x: torch.Tensor, intermediates_only: bool = False
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """Stage maps (B, C_i, H_i, W_i) for every stage, and unless intermediates_only the final tokens."""
        tokens, maps = self._run_stages(x, keep_maps=True)
        return maps if intermediates_only else (self.norm(tokens), maps)


class CvtFeatures(nn.Module):
    """Backbone wrapper for detection and segmentation: forward returns the stage maps."""

    def __init__(self, model: CvT):
        super().__init__()
        model.reset_classifier(0)
        self.model = model
        # timm's FeatureInfo, so that backbone code can call feature_info.channels() / .reduction().
        stages = [dict(info) for info in model.feature_info]
        self.feature_info = FeatureInfo(stages, out_indices=tuple(range(len(stages))))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.model.forward_intermediates(x, intermediates_only=True)

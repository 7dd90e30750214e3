"""The CvT model: three (or any number of) stages, a final norm and a linear head."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import trunc_normal_
from timm.models import FeatureInfo
from torch import nn

from .config import CvtConfig
from .errors import TorchcvtError
from .geometry import embedding_geometry, reductions, stage_grid, stage_grids
from .geometry import min_input_size as _min_input_size
from .layers import Block, ConvEmbed, LayerNorm, token_map
from .timm_interface import TimmInterface


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
            # Promoted, as the official code's torch.cat does: under fp16/bf16 autocast its float32 class
            # token makes this stage's residual stream (and the final norm) float32.
            dtype = torch.promote_types(self.cls_token.dtype, x.dtype)
            cls = self.cls_token.to(dtype).expand(x.shape[0], -1, -1)
            x = torch.cat((cls, x.to(dtype)), dim=1)
        x = self.pos_drop(x)
        for block in self.blocks:
            x = block(x, height, width)
        return x


GLOBAL_POOLS = ("token", "avg", "")


class CvT(TimmInterface, nn.Module):
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
        self.feature_info += [{"num_chs": dim, "reduction": reduction, "module": f"stage{i}"}
                              for i, (dim, reduction) in enumerate(zip(config.embed_dim, reductions(config),
                                                                       strict=True))]
        self.init_weights()

    @property
    def stages(self) -> list[CvtStage]:
        return [getattr(self, f"stage{i}") for i in range(self.num_stages)]

    def _check_pool(self, global_pool: str | None) -> str:
        if global_pool is None:
            return "token" if self.has_cls_token else "avg"
        if global_pool not in GLOBAL_POOLS:
            raise TorchcvtError(f"global_pool must be one of {list(GLOBAL_POOLS)}, got {global_pool!r}")
        if global_pool == "token" and not self.has_cls_token:
            raise TorchcvtError("global_pool='token' needs a class token in the last stage (cls_token[-1]); "
                             "use 'avg'")
        return global_pool

    def init_weights(self) -> None:
        """As the official code: the stages' Linear layers trunc_normal(std=initializer_range) or xavier
        with zero bias; the head trunc_normal whatever `init` says, its bias PyTorch's default."""
        std = self.config.initializer_range
        for module in self.stages:
            module.apply(self._init_stage_module)
        for stage in self.stages:
            if stage.cls_token is not None:
                trunc_normal_(stage.cls_token, std=std)
            if stage.pos_embed is not None:
                trunc_normal_(stage.pos_embed, std=std)
        if isinstance(self.head, nn.Linear):
            trunc_normal_(self.head.weight, std=std)

    def _init_stage_module(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            if self.config.init == "xavier":
                nn.init.xavier_uniform_(module.weight)
            else:
                trunc_normal_(module.weight, std=self.config.initializer_range)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, (nn.LayerNorm, nn.BatchNorm2d)):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """Replace the head by a freshly initialised one with num_classes outputs (0: no head), initialised
        as the official code initialises its head: trunc_normal weight, PyTorch's default bias."""
        if global_pool is not None:
            self.global_pool = self._check_pool(global_pool)
        self.num_classes = num_classes
        self.config = self.config.replace(num_classes=num_classes)
        device = self.stage0.patch_embed.proj.weight.device
        self.head = nn.Linear(self.num_features, num_classes, device=device) if num_classes else nn.Identity()
        if num_classes:
            trunc_normal_(self.head.weight, std=self.config.initializer_range)

    def check_input(self, x: torch.Tensor) -> None:
        """Raise ValueError with a readable message for a tensor the model cannot take."""
        if x.dim() != 4:
            raise TorchcvtError(
                f"expected a batch of images (B, C, H, W), got a tensor of shape {tuple(x.shape)}"
            )
        if x.shape[1] != self.config.num_channels:
            raise TorchcvtError(
                f"input has {x.shape[1]} channels but the model expects {self.config.num_channels} "
                f"(shape {tuple(x.shape)})"
            )
        stage_grids(self.config, *x.shape[-2:], stages=self.num_stages)

    def min_input_size(self) -> int:
        """The smallest side length that leaves every stage at least one token."""
        return _min_input_size(self.config)

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

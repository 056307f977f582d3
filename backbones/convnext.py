"""ConvNeXt (Liu et al. 2022, "A ConvNet for the 2020s")."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .contract import Backbone, ClassifierCfg, Rules
from .layers import Dilation, DropPath, LayerFn, LayerNorm2d, drop_path_rates
from .registry import register_backbone

LayerNorm2d6 = partial(LayerNorm2d, eps=1e-6)
# torchvision's `block.<i>` (a Sequential with permutes in it) -> our names
_TORCHVISION_BLOCK = {0: "dwconv", 2: "norm", 3: "fc1", 5: "fc2"}


def pad_to_multiple(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """Zero-pad the bottom and right edges so that H and W are multiples of `multiple`.

    A patchify conv (kernel = stride) then gives ceil(H / stride) instead of dropping the
    remainder; inputs that already divide are untouched (and match the reference exactly).
    """
    if torch.compiler.is_compiling():
        # Traced with symbolic sizes (torch.export, ONNX, torch.compile), a branch on the size
        # would fix it, and the remainder arithmetic makes tracing slow. Padding by
        # `multiple - 1` always gives the same patches: the conv (kernel = stride = multiple)
        # still yields ceil(H / multiple) rows, and rows past the last patch are never read.
        return F.pad(x, (0, multiple - 1, 0, multiple - 1))
    pad_h, pad_w = -x.shape[-2] % multiple, -x.shape[-1] % multiple
    if pad_h or pad_w:  # in eager mode an unneeded pad would copy
        return F.pad(x, (0, pad_w, 0, pad_h))
    return x


class Stem(nn.Module):
    """Non-overlapping 4x4 patches (a 4x4 conv with stride 4), then a norm."""

    def __init__(self, in_channels: int, out_channels: int, norm_layer: LayerFn) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 4, stride=4)
        self.norm = norm_layer(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.conv(pad_to_multiple(x, 4)))  # (B, C, ceil(H/4), ceil(W/4))


class Downsample(nn.Module):
    """A norm, then a 2x2 conv with stride 2: halves the size between stages.

    Dilated instead (`stride=1`, for `output_stride`), the 2x2 conv keeps the size: zero
    padding of `dilation` rows and columns, the extra one at the bottom and right, as timm's
    "same" padding.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        norm_layer: LayerFn,
        stride: int = 2,
        dilation: int = 1,
    ) -> None:
        super().__init__()
        self.norm = norm_layer(in_channels)
        self.conv = nn.Conv2d(in_channels, out_channels, 2, stride=stride, dilation=dilation)
        before = dilation // 2
        self.padding = (before, dilation - before) * 2  # left, right, top, bottom

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(x)
        if self.conv.stride == (2, 2):
            return self.conv(pad_to_multiple(x, 2))  # (B, C', ceil(H/2), ceil(W/2))
        return self.conv(F.pad(x, self.padding))  # (B, C', H, W)


class ConvNeXtBlock(nn.Module):
    """7x7 depthwise conv -> norm -> 4x wide MLP with GELU, scaled per channel, plus identity."""

    def __init__(
        self,
        channels: int,
        norm_layer: LayerFn = LayerNorm2d6,
        layer_scale_init: float = 1e-6,
        drop_path: float = 0.0,
        dilation: int = 1,
    ) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(
            channels, channels, 7, padding=3 * dilation, dilation=dilation, groups=channels
        )
        self.norm = norm_layer(channels)
        self.fc1 = nn.Linear(channels, 4 * channels)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(4 * channels, channels)
        # Layer scale (Touvron et al. 2021): each block starts close to the identity.
        self.layer_scale = nn.Parameter(torch.full((channels,), layer_scale_init))
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # LayerNorm2d leaves its output channels-last in memory: the permute is free and the
        # Linear layers then run on contiguous (B, H, W, C) rows.
        out = self.norm(self.dwconv(x)).permute(0, 2, 3, 1)  # (B, H, W, C)
        out = self.fc2(self.act(self.fc1(out))) * self.layer_scale  # (B, H, W, C)
        return x + self.drop_path(out.permute(0, 3, 1, 2))  # (B, C, H, W)


@dataclass(frozen=True)
class ConvNeXtCfg:
    depths: tuple[int, int, int, int]  # blocks per stage
    widths: tuple[int, int, int, int]  # channels per stage


class ConvNeXt(Backbone):
    """ConvNeXt (Liu et al. 2022): a 4x4 patchify stem (/4), then four stages (C2..C5).

    Each stage after the first starts with its downsampling layer (norm + 2x2 conv with
    stride 2), so every stage output is a level and has the stage's width.

    Args:
        cfg: the variant (blocks and channels per stage).
        layer_scale_init: initial value of the per-channel scale on each block's branch.
        **common: the contract's arguments (`Backbone`); levels C2..C5; LayerNorm2d with eps
            1e-6 by default (`norm_eval` only matters with a BatchNorm `norm_layer`: LayerNorms
            have no running statistics).
    """

    # torchvision's and timm's head: global average pool, LayerNorm, linear.
    classifier_cfg = ClassifierCfg(norm_layer=LayerNorm2d6)

    def __init__(self, cfg: ConvNeXtCfg, *, layer_scale_init: float = 1e-6, **common: Any) -> None:
        super().__init__(**common)
        norm_layer = self.norm_layer or LayerNorm2d6
        rates = drop_path_rates(self.drop_path_rate, cfg.depths)
        self.stem = Stem(self.in_chans, cfg.widths[0], norm_layer)  # /4, the same stride as C2

        self.stages = nn.ModuleList()
        in_channels = cfg.widths[0]
        dilate = Dilation(self.output_stride)
        dilate(4)  # the stem
        for index, (depth, width) in enumerate(zip(cfg.depths, cfg.widths, strict=True)):
            layers: OrderedDict[str, nn.Module] = OrderedDict()
            if index > 0:
                # dilated instead of strided, it keeps the dilation before it (timm's rule)
                stride, dilation = dilate(2)
                layers["downsample"] = Downsample(in_channels, width, norm_layer, stride, dilation)
            layers["blocks"] = nn.Sequential(
                *(
                    ConvNeXtBlock(
                        width, norm_layer, layer_scale_init, rates[index][i], dilate.dilation
                    )
                    for i in range(depth)
                )
            )
            self.stages.append(nn.Sequential(layers))
            self.add_level(width, stride=4 * 2**index)
            in_channels = width

        self._init_weights()
        self.finalize()

    def _init_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Conv2d | nn.Linear):
                # The references' trunc_normal_(std=0.02) truncates at +-2, i.e. 100 std: it
                # never rejects a sample, so normal_ draws the same numbers, 4x faster.
                nn.init.normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)

    _TORCHVISION: Rules = (
        (r"features\.0\.0\.(\w+)", r"backbone.stem.conv.\1"),
        (r"features\.0\.1\.(\w+)", r"backbone.stem.norm.\1"),
        # features.1/3/5/7: the stages' blocks
        *(
            (
                rf"features\.{2 * i + 1}\.(\d+)\.block\.{j}\.(\w+)",
                rf"backbone.stages.{i}.blocks.\1.{ours}.\2",
            )
            for i in range(4)
            for j, ours in _TORCHVISION_BLOCK.items()
        ),
        *(
            (
                rf"features\.{2 * i + 1}\.(\d+)\.layer_scale",
                rf"backbone.stages.{i}.blocks.\1.layer_scale",
            )
            for i in range(4)
        ),
        # features.2/4/6: the downsampling layers, which open our stages 1..3
        *(
            (rf"features\.{2 * i}\.{j}\.(\w+)", rf"backbone.stages.{i}.downsample.{ours}.\1")
            for i in range(1, 4)
            for j, ours in ((0, "norm"), (1, "conv"))
        ),
        (r"classifier\.0\.(\w+)", r"head.norm.\1"),
        (r"classifier\.2\.(\w+)", r"head.fc.\1"),
    )
    _TIMM: Rules = (
        (r"stem\.0\.(\w+)", r"backbone.stem.conv.\1"),
        (r"stem\.1\.(\w+)", r"backbone.stem.norm.\1"),
        (r"stages\.(\d)\.downsample\.0\.(\w+)", r"backbone.stages.\1.downsample.norm.\2"),
        (r"stages\.(\d)\.downsample\.1\.(\w+)", r"backbone.stages.\1.downsample.conv.\2"),
        (r"stages\.(\d)\.blocks\.(\d+)\.conv_dw\.(\w+)", r"backbone.stages.\1.blocks.\2.dwconv.\3"),
        (r"stages\.(\d)\.blocks\.(\d+)\.norm\.(\w+)", r"backbone.stages.\1.blocks.\2.norm.\3"),
        (
            r"stages\.(\d)\.blocks\.(\d+)\.mlp\.(fc[12])\.(\w+)",
            r"backbone.stages.\1.blocks.\2.\3.\4",
        ),
        (r"stages\.(\d)\.blocks\.(\d+)\.gamma", r"backbone.stages.\1.blocks.\2.layer_scale"),
        (r"head\.(norm|fc)\.(\w+)", r"head.\1.\2"),
    )
    weight_rules = {"torchvision": _TORCHVISION, "timm": _TIMM}


CFGS = {  # Liu et al. 2022, Sec. 3 (ConvNeXt-T/S/B/L)
    "convnext_tiny": ConvNeXtCfg(depths=(3, 3, 9, 3), widths=(96, 192, 384, 768)),
    "convnext_small": ConvNeXtCfg(depths=(3, 3, 27, 3), widths=(96, 192, 384, 768)),
    "convnext_base": ConvNeXtCfg(depths=(3, 3, 27, 3), widths=(128, 256, 512, 1024)),
    "convnext_large": ConvNeXtCfg(depths=(3, 3, 27, 3), widths=(192, 384, 768, 1536)),
}


@register_backbone(timm="convnext_tiny")
def convnext_tiny(**kwargs) -> ConvNeXt:
    return ConvNeXt(CFGS["convnext_tiny"], **kwargs)


@register_backbone(timm="convnext_small")
def convnext_small(**kwargs) -> ConvNeXt:
    return ConvNeXt(CFGS["convnext_small"], **kwargs)


@register_backbone(timm="convnext_base")
def convnext_base(**kwargs) -> ConvNeXt:
    return ConvNeXt(CFGS["convnext_base"], **kwargs)


@register_backbone(timm="convnext_large")
def convnext_large(**kwargs) -> ConvNeXt:
    return ConvNeXt(CFGS["convnext_large"], **kwargs)

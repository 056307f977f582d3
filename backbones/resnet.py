"""ResNet (He et al. 2015), ResNeXt (Xie et al. 2016) and Wide ResNet (Zagoruyko & Komodakis 2016).

ResNet v1.5 stride placement, as torchvision and timm: a bottleneck downsamples in its 3x3 conv.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .contract import Backbone, Rules
from .layers import (
    ConvNormAct,
    Dilation,
    DropPath,
    LayerFn,
    ReLU,
    drop_path_rates,
    init_he_normal,
)
from .registry import register_backbone


class BasicBlock(nn.Module):
    """Two 3x3 convs with an identity (or 1x1 projection) shortcut.

    `first_dilation` (default `dilation`) is the first conv's: where a stage is dilated
    instead of strided, its first block keeps the dilation of the stage before (timm's rule;
    torchvision has no dilated BasicBlock).
    """

    expansion = 1

    def __init__(
        self,
        in_channels: int,
        channels: int,
        stride: int = 1,
        groups: int = 1,
        width_per_group: int = 64,
        norm_layer: LayerFn = nn.BatchNorm2d,
        drop_path: float = 0.0,
        dilation: int = 1,
        first_dilation: int | None = None,
    ) -> None:
        super().__init__()
        if groups != 1 or width_per_group != 64:
            raise ValueError("BasicBlock supports only groups=1 and width_per_group=64")
        out_channels = channels * self.expansion
        self.conv1 = ConvNormAct(
            in_channels,
            channels,
            3,
            stride,
            dilation=first_dilation or dilation,
            norm_layer=norm_layer,
            act_layer=ReLU,
        )
        self.conv2 = ConvNormAct(
            channels, out_channels, 3, dilation=dilation, norm_layer=norm_layer, act_layer=None
        )
        self.shortcut = _shortcut(in_channels, out_channels, stride, norm_layer)
        self.drop_path = DropPath(drop_path)
        self.act = ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.drop_path(self.conv2(self.conv1(x)))
        out += self.shortcut(x)  # in place, as torchvision: one memory pass less
        return self.act(out)


class Bottleneck(nn.Module):
    """1x1 reduce -> 3x3 (grouped for ResNeXt) -> 1x1 expand by 4, plus the shortcut.

    The 3x3 conv has `first_dilation` (default `dilation`): the first block of a dilated
    stage keeps the dilation of the stage before, as torchvision's and timm's.
    """

    expansion = 4

    def __init__(
        self,
        in_channels: int,
        channels: int,
        stride: int = 1,
        groups: int = 1,
        width_per_group: int = 64,
        norm_layer: LayerFn = nn.BatchNorm2d,
        drop_path: float = 0.0,
        dilation: int = 1,
        first_dilation: int | None = None,
    ) -> None:
        super().__init__()
        width = int(channels * width_per_group / 64) * groups
        out_channels = channels * self.expansion
        self.conv1 = ConvNormAct(in_channels, width, 1, norm_layer=norm_layer, act_layer=ReLU)
        self.conv2 = ConvNormAct(
            width,
            width,
            3,
            stride,
            dilation=first_dilation or dilation,
            groups=groups,
            norm_layer=norm_layer,
            act_layer=ReLU,
        )
        self.conv3 = ConvNormAct(width, out_channels, 1, norm_layer=norm_layer, act_layer=None)
        self.shortcut = _shortcut(in_channels, out_channels, stride, norm_layer)
        self.drop_path = DropPath(drop_path)
        self.act = ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.drop_path(self.conv3(self.conv2(self.conv1(x))))
        out += self.shortcut(x)  # in place, as torchvision: one memory pass less
        return self.act(out)


def _shortcut(in_channels: int, out_channels: int, stride: int, norm_layer: LayerFn) -> nn.Module:
    if stride == 1 and in_channels == out_channels:
        return nn.Identity()
    return ConvNormAct(in_channels, out_channels, 1, stride, norm_layer=norm_layer, act_layer=None)


@dataclass(frozen=True)
class ResNetCfg:
    block: type[BasicBlock | Bottleneck]
    depths: tuple[int, int, int, int]
    groups: int = 1
    width_per_group: int = 64


class ResNet(Backbone):
    """ResNet / ResNeXt / Wide ResNet: a 7x7 stem (C1), then four stages (C2..C5).

    Args:
        cfg: the variant (block type, blocks per stage, groups, width per group).
        zero_init_residual: zero the last norm of each block, so blocks start as identities.
        **common: the contract's arguments (`Backbone`); levels C1..C5, BatchNorm2d by default.
    """

    def __init__(self, cfg: ResNetCfg, *, zero_init_residual: bool = False, **common: Any) -> None:
        super().__init__(**common)
        block, norm_layer = cfg.block, self.norm_layer or nn.BatchNorm2d
        self.stem = ConvNormAct(
            self.in_chans, 64, 7, stride=2, norm_layer=norm_layer, act_layer=ReLU
        )
        self.add_level(64, stride=2)

        self.stages = nn.ModuleList()
        in_channels, stride = 64, 2
        rates = drop_path_rates(self.drop_path_rate, cfg.depths)
        dilate = Dilation(self.output_stride)
        dilate(4)  # the stem and its max-pool: never dilated
        for index, depth in enumerate(cfg.depths):
            channels = 64 * 2**index
            first_stride, first_dilation = dilate(1 if index == 0 else 2)
            layers: OrderedDict[str, nn.Module] = OrderedDict()
            if index == 0:  # C2 starts with the stem's max-pool
                layers["pool"] = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
            for i in range(depth):
                layers[str(i)] = block(
                    in_channels,
                    channels,
                    stride=first_stride if i == 0 else 1,
                    groups=cfg.groups,
                    width_per_group=cfg.width_per_group,
                    norm_layer=norm_layer,
                    drop_path=rates[index][i],
                    dilation=dilate.dilation,
                    first_dilation=first_dilation if i == 0 else dilate.dilation,
                )
                in_channels = channels * block.expansion
            stride *= 2
            self.stages.append(nn.Sequential(layers))
            self.add_level(in_channels, stride)

        init_he_normal(self)
        if zero_init_residual:
            for module in self.modules():
                if isinstance(module, Bottleneck):
                    nn.init.zeros_(module.conv3.norm.weight)
                elif isinstance(module, BasicBlock):
                    nn.init.zeros_(module.conv2.norm.weight)
        self.finalize()

    # torchvision and timm name the parameters of these networks identically.
    _RULES: Rules = (
        (r"conv1\.weight", "backbone.stem.conv.weight"),
        (r"bn1\.(\w+)", r"backbone.stem.norm.\1"),
        *(
            rule
            for i in range(4)
            for rule in (
                (
                    rf"layer{i + 1}\.(\d+)\.conv(\d)\.(\w+)",
                    rf"backbone.stages.{i}.\1.conv\2.conv.\3",
                ),
                (rf"layer{i + 1}\.(\d+)\.bn(\d)\.(\w+)", rf"backbone.stages.{i}.\1.conv\2.norm.\3"),
                (
                    rf"layer{i + 1}\.(\d+)\.downsample\.0\.(\w+)",
                    rf"backbone.stages.{i}.\1.shortcut.conv.\2",
                ),
                (
                    rf"layer{i + 1}\.(\d+)\.downsample\.1\.(\w+)",
                    rf"backbone.stages.{i}.\1.shortcut.norm.\2",
                ),
            )
        ),
        (r"fc\.(\w+)", r"head.fc.\1"),
    )
    weight_rules = {"torchvision": _RULES, "timm": _RULES}


CFGS = {  # He et al. 2015, Table 1; Xie et al. 2016 (ResNeXt); Zagoruyko & Komodakis 2016 (WRN)
    "resnet18": ResNetCfg(block=BasicBlock, depths=(2, 2, 2, 2)),
    "resnet34": ResNetCfg(block=BasicBlock, depths=(3, 4, 6, 3)),
    "resnet50": ResNetCfg(block=Bottleneck, depths=(3, 4, 6, 3)),
    "resnet101": ResNetCfg(block=Bottleneck, depths=(3, 4, 23, 3)),
    "resnet152": ResNetCfg(block=Bottleneck, depths=(3, 8, 36, 3)),
    "resnext50_32x4d": ResNetCfg(
        block=Bottleneck, depths=(3, 4, 6, 3), groups=32, width_per_group=4
    ),
    "resnext101_32x8d": ResNetCfg(
        block=Bottleneck, depths=(3, 4, 23, 3), groups=32, width_per_group=8
    ),
    "resnext101_64x4d": ResNetCfg(
        block=Bottleneck, depths=(3, 4, 23, 3), groups=64, width_per_group=4
    ),
    "wide_resnet50_2": ResNetCfg(block=Bottleneck, depths=(3, 4, 6, 3), width_per_group=128),
    "wide_resnet101_2": ResNetCfg(block=Bottleneck, depths=(3, 4, 23, 3), width_per_group=128),
}


@register_backbone(timm="resnet18")
def resnet18(**kwargs) -> ResNet:
    return ResNet(CFGS["resnet18"], **kwargs)


@register_backbone(timm="resnet34")
def resnet34(**kwargs) -> ResNet:
    return ResNet(CFGS["resnet34"], **kwargs)


@register_backbone(timm="resnet50")
def resnet50(**kwargs) -> ResNet:
    return ResNet(CFGS["resnet50"], **kwargs)


@register_backbone(timm="resnet101")
def resnet101(**kwargs) -> ResNet:
    return ResNet(CFGS["resnet101"], **kwargs)


@register_backbone(timm="resnet152")
def resnet152(**kwargs) -> ResNet:
    return ResNet(CFGS["resnet152"], **kwargs)


@register_backbone(timm="resnext50_32x4d")
def resnext50_32x4d(**kwargs) -> ResNet:
    return ResNet(CFGS["resnext50_32x4d"], **kwargs)


@register_backbone(timm="resnext101_32x8d")
def resnext101_32x8d(**kwargs) -> ResNet:
    return ResNet(CFGS["resnext101_32x8d"], **kwargs)


@register_backbone(timm="resnext101_64x4d")
def resnext101_64x4d(**kwargs) -> ResNet:
    return ResNet(CFGS["resnext101_64x4d"], **kwargs)


@register_backbone(timm="wide_resnet50_2")
def wide_resnet50_2(**kwargs) -> ResNet:
    return ResNet(CFGS["wide_resnet50_2"], **kwargs)


@register_backbone(timm="wide_resnet101_2")
def wide_resnet101_2(**kwargs) -> ResNet:
    return ResNet(CFGS["wide_resnet101_2"], **kwargs)

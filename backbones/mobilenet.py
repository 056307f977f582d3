"""MobileNetV2 (Sandler et al. 2018) and MobileNetV3 (Howard et al. 2019).

Both stack inverted residuals (`layers.InvertedResidual`) between a 3x3 stem and a 1x1 head
conv that belongs to C5. `width_mult` scales every channel count through `make_divisible`,
exactly as torchvision computes it, so `mobilenet_v2(width_mult=0.5)` converts from
`torchvision.models.mobilenet_v2(width_mult=0.5)`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import partial
from itertools import groupby, islice
from typing import Any

from torch import nn

from .contract import Backbone, ClassifierCfg, Rules
from .layers import (
    BatchNorm2dTF,
    ConvNormAct,
    Dilation,
    Hardswish,
    InvertedResidual,
    LayerFn,
    ReLU,
    ReLU6,
    SqueezeExcite,
    drop_path_rates,
    init_he_normal,
    make_divisible,
)
from .mobile_weights import conv_norm_rules, timm_rules, torchvision_block_rules, torchvision_rules
from .registry import register_backbone


class MobileNetV2(Backbone):
    """MobileNetV2 (Sandler et al. 2018): inverted residuals with linear bottlenecks and ReLU6.

    Args:
        cfg: the network at width 1 (stem, stages, head conv).
        width_mult: channel multiplier (e.g. 0.35, 0.5, 0.75, 1.0, 1.4); the head conv is
            never narrowed below its width-1 size.
        **common: the contract's arguments (`Backbone`); levels C1..C5, BatchNorm2d by default;
            `drop_path_rate` as EfficientNet's (block i of n: `drop_path_rate * i / n`).
    """

    classifier_cfg = ClassifierCfg(dropout=0.2)

    def __init__(self, cfg: MobileNetV2Cfg, *, width_mult: float = 1.0, **common: Any) -> None:
        super().__init__(**common)
        cfg, norm_layer = cfg.scaled(width_mult), self.norm_layer or nn.BatchNorm2d
        self.stem = ConvNormAct(
            self.in_chans, cfg.stem_channels, 3, stride=2, norm_layer=norm_layer, act_layer=ReLU6
        )
        self.add_level(cfg.stem_channels, stride=2)

        self.stages = nn.ModuleList()
        in_channels, stride = cfg.stem_channels, 2
        # block i of n drops its branch with rate drop_path_rate * i / n, as EfficientNet's
        rates = drop_path_rates(
            self.drop_path_rate, [row.depth for row in cfg.stages], endpoint=False
        )
        dilate = Dilation(self.output_stride)
        dilate(2)  # the stem
        for row, row_rates in zip(cfg.stages, rates, strict=True):
            blocks = []
            for i, rate in enumerate(row_rates):
                # a block dilated instead of strided keeps the dilation before it (timm's rule)
                block_stride, dilation = dilate(row.stride if i == 0 else 1)
                blocks.append(
                    InvertedResidual(
                        in_channels,
                        row.out_channels,
                        expanded_channels=in_channels * row.expand_ratio,
                        stride=block_stride,
                        dilation=dilation,
                        act_layer=ReLU6,
                        norm_layer=norm_layer,
                        drop_path=rate,
                    )
                )
                in_channels = row.out_channels
            stride *= row.stride
            self.stages.append(nn.Sequential(*blocks))
            self.add_level(in_channels, stride)
        self.stages.append(
            ConvNormAct(in_channels, cfg.head_channels, 1, norm_layer=norm_layer, act_layer=ReLU6)
        )
        self.add_level(cfg.head_channels, stride)

        self.weight_rules = {
            "torchvision": torchvision_rules(
                self.stages, _torchvision_v2_block, ((r"classifier\.1\.(\w+)", r"head.fc.\1"),)
            ),
            "timm": timm_rules(len(self.stages)),
        }
        init_he_normal(self)
        self.finalize()


class MobileNetV3(Backbone):
    """MobileNetV3 (Howard et al. 2019): inverted residuals with hard-swish and squeeze-excite.

    Args:
        cfg: the variant at width 1 (large or small).
        width_mult: channel multiplier (e.g. 0.35, 0.5, 0.75, 1.0, 1.4).
        **common: the contract's arguments (`Backbone`); levels C1..C5, BatchNorm2d with eps
            1e-3 and momentum 0.01 by default, as torchvision's; `drop_path_rate` as
            EfficientNet's (block i of n: `drop_path_rate * i / n`); `output_stride=16` is
            torchvision's `dilated=True`.
    """

    def __init__(self, cfg: MobileNetV3Cfg, *, width_mult: float = 1.0, **common: Any) -> None:
        super().__init__(**common)
        norm_layer = self.norm_layer or BatchNorm2dTF
        # A stage is a row of blocks with the same output channels, as timm groups them; rows
        # are found at width 1, since narrow widths can round two rows to one channel count.
        depths = [len(list(row)) for _, row in groupby(cfg.blocks, key=lambda b: b.out_channels)]
        cfg = cfg.scaled(width_mult)
        self.stem = ConvNormAct(
            self.in_chans,
            cfg.stem_channels,
            3,
            stride=2,
            norm_layer=norm_layer,
            act_layer=Hardswish,
        )
        self.add_level(cfg.stem_channels, stride=2)

        self.stages = nn.ModuleList()
        in_channels, stride = cfg.stem_channels, 2
        remaining = iter(cfg.blocks)
        rates = drop_path_rates(self.drop_path_rate, depths, endpoint=False)
        dilate = Dilation(self.output_stride)
        dilate(2)  # the stem
        for depth, row_rates in zip(depths, rates, strict=True):
            blocks = []
            for block, rate in zip(islice(remaining, depth), row_rates, strict=True):
                # a block dilated instead of strided takes the new dilation, as torchvision's
                # `mobilenet_v3_large(dilated=True)` (DeepLabV3's and LR-ASPP's backbone)
                block_stride, _ = dilate(block.stride)
                se_layer = None
                if block.se:
                    se_layer = partial(
                        SqueezeExcite,
                        squeeze_channels=make_divisible(block.expanded_channels // 4),
                        act_layer=ReLU,
                        gate_layer=nn.Hardsigmoid,
                    )
                blocks.append(
                    InvertedResidual(
                        in_channels,
                        block.out_channels,
                        expanded_channels=block.expanded_channels,
                        kernel_size=block.kernel_size,
                        stride=block_stride,
                        dilation=dilate.dilation,
                        act_layer=block.act,
                        se_layer=se_layer,
                        norm_layer=norm_layer,
                        drop_path=rate,
                    )
                )
                in_channels = block.out_channels
                stride *= block.stride
            self.stages.append(nn.Sequential(*blocks))
            self.add_level(in_channels, stride)
        self.stages.append(
            ConvNormAct(
                in_channels, cfg.head_channels, 1, norm_layer=norm_layer, act_layer=Hardswish
            )
        )
        self.add_level(cfg.head_channels, stride)

        self.classifier_cfg = ClassifierCfg(
            hidden_channels=(cfg.hidden_channels,), act_layer=Hardswish, dropout=0.2
        )
        self.weight_rules = {
            "torchvision": torchvision_rules(
                self.stages,
                torchvision_block_rules,
                (  # pool, linear, hardswish, dropout, linear
                    (r"classifier\.0\.(\w+)", r"head.hidden.0.linear.\1"),
                    (r"classifier\.3\.(\w+)", r"head.fc.\1"),
                ),
            )
        }
        init_he_normal(self)
        self.finalize()


# ----------------------------------------------------------------------------- weight rules


def _torchvision_v2_block(block: InvertedResidual, source: str, target: str) -> Rules:
    # conv.0, conv.1: (expand,) depthwise as conv-norm-act; then the projection's conv and norm
    # as two separate entries.
    parts = ["depthwise"] if isinstance(block.expand, nn.Identity) else ["expand", "depthwise"]
    rules = [
        rule
        for j, part in enumerate(parts)
        for rule in conv_norm_rules(rf"{source}conv\.{j}\.", f"{target}{part}.")
    ]
    j = len(parts)
    rules += [
        (rf"{source}conv\.{j}\.weight", f"{target}project.conv.weight"),
        (rf"{source}conv\.{j + 1}\.(\w+)", rf"{target}project.norm.\1"),
    ]
    return tuple(rules)


# ----------------------------------------------------------------------------- variants


@dataclass(frozen=True)
class V2Stage:
    expand_ratio: int
    out_channels: int
    depth: int
    stride: int


@dataclass(frozen=True)
class MobileNetV2Cfg:
    stem_channels: int
    stages: tuple[V2Stage, ...]
    head_channels: int

    def scaled(self, width: float) -> MobileNetV2Cfg:
        """Channels times `width`, rounded to multiples of 8; the head conv never narrower."""
        _check_width(width)
        return replace(
            self,
            stem_channels=make_divisible(self.stem_channels * width),
            stages=tuple(
                replace(s, out_channels=make_divisible(s.out_channels * width)) for s in self.stages
            ),
            head_channels=make_divisible(self.head_channels * max(1.0, width)),
        )


@dataclass(frozen=True)
class V3Block:
    kernel_size: int
    expanded_channels: int
    out_channels: int
    se: bool
    act: LayerFn  # ReLU (RE) or hard-swish (HS)
    stride: int


@dataclass(frozen=True)
class MobileNetV3Cfg:
    stem_channels: int
    blocks: tuple[V3Block, ...]
    head_channels: int  # the 1x1 conv ending C5
    hidden_channels: int  # the classifier's hidden linear layer

    def scaled(self, width: float) -> MobileNetV3Cfg:
        """Channels times `width`, rounded to multiples of 8."""
        _check_width(width)
        blocks = tuple(
            replace(
                b,
                expanded_channels=make_divisible(b.expanded_channels * width),
                out_channels=make_divisible(b.out_channels * width),
            )
            for b in self.blocks
        )
        # torchvision widens the head conv with the last block (960 = 6 x 160), which is not
        # always make_divisible(960 * width): small at width 0.35 has 6 x 32, not 200.
        head_ratio = self.head_channels // self.blocks[-1].out_channels
        return replace(
            self,
            stem_channels=make_divisible(self.stem_channels * width),
            blocks=blocks,
            head_channels=head_ratio * blocks[-1].out_channels,
            hidden_channels=make_divisible(self.hidden_channels * width),
        )


def _check_width(width: float) -> None:
    if not isinstance(width, int | float) or width <= 0:
        raise ValueError(f"width_mult must be a positive number, got {width!r}")


MOBILENET_V2 = MobileNetV2Cfg(  # Sandler et al. 2018, Table 2 (t, c, n, s)
    stem_channels=32,
    stages=(
        V2Stage(expand_ratio=1, out_channels=16, depth=1, stride=1),
        V2Stage(expand_ratio=6, out_channels=24, depth=2, stride=2),
        V2Stage(expand_ratio=6, out_channels=32, depth=3, stride=2),
        V2Stage(expand_ratio=6, out_channels=64, depth=4, stride=2),
        V2Stage(expand_ratio=6, out_channels=96, depth=3, stride=1),
        V2Stage(expand_ratio=6, out_channels=160, depth=3, stride=2),
        V2Stage(expand_ratio=6, out_channels=320, depth=1, stride=1),
    ),
    head_channels=1280,
)

RE, HS = ReLU, Hardswish  # the tables' "NL" column
MOBILENET_V3_LARGE = MobileNetV3Cfg(  # Howard et al. 2019, Table 1
    stem_channels=16,
    blocks=(
        V3Block(kernel_size=3, expanded_channels=16, out_channels=16, se=False, act=RE, stride=1),
        V3Block(kernel_size=3, expanded_channels=64, out_channels=24, se=False, act=RE, stride=2),
        V3Block(kernel_size=3, expanded_channels=72, out_channels=24, se=False, act=RE, stride=1),
        V3Block(kernel_size=5, expanded_channels=72, out_channels=40, se=True, act=RE, stride=2),
        V3Block(kernel_size=5, expanded_channels=120, out_channels=40, se=True, act=RE, stride=1),
        V3Block(kernel_size=5, expanded_channels=120, out_channels=40, se=True, act=RE, stride=1),
        V3Block(kernel_size=3, expanded_channels=240, out_channels=80, se=False, act=HS, stride=2),
        V3Block(kernel_size=3, expanded_channels=200, out_channels=80, se=False, act=HS, stride=1),
        V3Block(kernel_size=3, expanded_channels=184, out_channels=80, se=False, act=HS, stride=1),
        V3Block(kernel_size=3, expanded_channels=184, out_channels=80, se=False, act=HS, stride=1),
        V3Block(kernel_size=3, expanded_channels=480, out_channels=112, se=True, act=HS, stride=1),
        V3Block(kernel_size=3, expanded_channels=672, out_channels=112, se=True, act=HS, stride=1),
        V3Block(kernel_size=5, expanded_channels=672, out_channels=160, se=True, act=HS, stride=2),
        V3Block(kernel_size=5, expanded_channels=960, out_channels=160, se=True, act=HS, stride=1),
        V3Block(kernel_size=5, expanded_channels=960, out_channels=160, se=True, act=HS, stride=1),
    ),
    head_channels=960,
    hidden_channels=1280,
)

MOBILENET_V3_SMALL = MobileNetV3Cfg(  # Howard et al. 2019, Table 2
    stem_channels=16,
    blocks=(
        V3Block(kernel_size=3, expanded_channels=16, out_channels=16, se=True, act=RE, stride=2),
        V3Block(kernel_size=3, expanded_channels=72, out_channels=24, se=False, act=RE, stride=2),
        V3Block(kernel_size=3, expanded_channels=88, out_channels=24, se=False, act=RE, stride=1),
        V3Block(kernel_size=5, expanded_channels=96, out_channels=40, se=True, act=HS, stride=2),
        V3Block(kernel_size=5, expanded_channels=240, out_channels=40, se=True, act=HS, stride=1),
        V3Block(kernel_size=5, expanded_channels=240, out_channels=40, se=True, act=HS, stride=1),
        V3Block(kernel_size=5, expanded_channels=120, out_channels=48, se=True, act=HS, stride=1),
        V3Block(kernel_size=5, expanded_channels=144, out_channels=48, se=True, act=HS, stride=1),
        V3Block(kernel_size=5, expanded_channels=288, out_channels=96, se=True, act=HS, stride=2),
        V3Block(kernel_size=5, expanded_channels=576, out_channels=96, se=True, act=HS, stride=1),
        V3Block(kernel_size=5, expanded_channels=576, out_channels=96, se=True, act=HS, stride=1),
    ),
    head_channels=576,
    hidden_channels=1024,
)


@register_backbone(timm="mobilenetv2_100")
def mobilenet_v2(**kwargs) -> MobileNetV2:
    return MobileNetV2(MOBILENET_V2, **kwargs)


@register_backbone()
def mobilenet_v3_large(**kwargs) -> MobileNetV3:
    return MobileNetV3(MOBILENET_V3_LARGE, **kwargs)


@register_backbone()
def mobilenet_v3_small(**kwargs) -> MobileNetV3:
    return MobileNetV3(MOBILENET_V3_SMALL, **kwargs)

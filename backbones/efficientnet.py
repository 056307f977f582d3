"""EfficientNet B0-B7 (Tan & Le 2019): MobileNetV2's inverted residual with squeeze-excite and
SiLU (MBConv); B1..B7 are B0 scaled in width and depth by the compound scaling rule.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from functools import partial
from typing import Any

from torch import nn

from .contract import Backbone, ClassifierCfg
from .layers import (
    BatchNorm2dTF,
    ConvNormAct,
    Dilation,
    InvertedResidual,
    LayerFn,
    SiLU,
    SqueezeExcite,
    drop_path_rates,
    init_he_normal,
    make_divisible,
)
from .mobile_weights import timm_rules, torchvision_block_rules, torchvision_rules
from .registry import register_backbone


class EfficientNet(Backbone):
    """EfficientNet (Tan & Le 2019): a 3x3 stem (C1), seven MBConv rows, a 1x1 head conv (C5).

    Args:
        cfg: the variant (stem, rows, head conv, classifier dropout, norm).
        **common: the contract's arguments (`Backbone`); levels C1..C5; the variant's norm
            by default (torchvision's: BatchNorm2d, with eps 1e-3 and momentum 0.01 for
            B5..B7). `drop_path_rate` gives block i of n the rate `drop_path_rate * i / n`, so
            0.2 means what torchvision's `stochastic_depth_prob=0.2` means.
    """

    def __init__(self, cfg: EfficientNetCfg, **common: Any) -> None:
        super().__init__(**common)
        norm_layer = self.norm_layer or cfg.norm_layer
        self.stem = ConvNormAct(
            self.in_chans, cfg.stem_channels, 3, stride=2, norm_layer=norm_layer, act_layer=SiLU
        )
        self.add_level(cfg.stem_channels, stride=2)

        self.stages = nn.ModuleList()
        in_channels, stride = cfg.stem_channels, 2
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
                        expanded_channels=make_divisible(in_channels * row.expand_ratio),
                        kernel_size=row.kernel_size,
                        stride=block_stride,
                        dilation=dilation,
                        act_layer=SiLU,
                        # squeezed relative to the block's input, not its expanded width
                        se_layer=partial(
                            SqueezeExcite,
                            squeeze_channels=max(1, in_channels // 4),
                            act_layer=SiLU,
                        ),
                        norm_layer=norm_layer,
                        drop_path=rate,
                    )
                )
                in_channels = row.out_channels
            stride *= row.stride
            self.stages.append(nn.Sequential(*blocks))
            self.add_level(in_channels, stride)
        self.stages.append(
            ConvNormAct(in_channels, cfg.head_channels, 1, norm_layer=norm_layer, act_layer=SiLU)
        )
        self.add_level(cfg.head_channels, stride)

        self.classifier_cfg = ClassifierCfg(dropout=cfg.dropout)
        self.weight_rules = {
            "torchvision": torchvision_rules(
                self.stages,
                torchvision_block_rules,
                ((r"classifier\.1\.(\w+)", r"head.fc.\1"),),  # pool, dropout, linear
                nested=True,
            ),
            "timm": timm_rules(len(self.stages)),
        }
        init_he_normal(self)
        self.finalize()


@dataclass(frozen=True)
class MBConvStage:
    expand_ratio: int
    kernel_size: int
    stride: int
    out_channels: int
    depth: int


@dataclass(frozen=True)
class EfficientNetCfg:
    stem_channels: int
    stages: tuple[MBConvStage, ...]
    head_channels: int
    dropout: float  # before the classifier's linear layer
    norm_layer: LayerFn = nn.BatchNorm2d

    def scaled(
        self, *, width: float, depth: float, dropout: float, norm_layer: LayerFn | None = None
    ) -> EfficientNetCfg:
        """Compound scaling (Tan & Le 2019, Sec. 3.3): channels times `width` rounded to
        multiples of 8, repeats times `depth` rounded up."""
        return replace(
            self,
            stem_channels=make_divisible(self.stem_channels * width),
            stages=tuple(
                replace(
                    row,
                    out_channels=make_divisible(row.out_channels * width),
                    depth=math.ceil(row.depth * depth),
                )
                for row in self.stages
            ),
            head_channels=make_divisible(self.head_channels * width),
            dropout=dropout,
            norm_layer=self.norm_layer if norm_layer is None else norm_layer,
        )


EFFICIENTNET_B0 = EfficientNetCfg(  # Tan & Le 2019, Table 1 (stages 2-8; 1 is the stem, 9 the head)
    stem_channels=32,
    stages=(
        MBConvStage(expand_ratio=1, kernel_size=3, stride=1, out_channels=16, depth=1),
        MBConvStage(expand_ratio=6, kernel_size=3, stride=2, out_channels=24, depth=2),
        MBConvStage(expand_ratio=6, kernel_size=5, stride=2, out_channels=40, depth=2),
        MBConvStage(expand_ratio=6, kernel_size=3, stride=2, out_channels=80, depth=3),
        MBConvStage(expand_ratio=6, kernel_size=5, stride=1, out_channels=112, depth=3),
        MBConvStage(expand_ratio=6, kernel_size=5, stride=2, out_channels=192, depth=4),
        MBConvStage(expand_ratio=6, kernel_size=3, stride=1, out_channels=320, depth=1),
    ),
    head_channels=1280,
    dropout=0.2,
)

# The (width, depth) coefficients and dropout of the reference implementation; torchvision's
# B5..B7 weights come from TensorFlow and keep its BatchNorm settings.
CFGS = {
    "efficientnet_b0": EFFICIENTNET_B0,
    "efficientnet_b1": EFFICIENTNET_B0.scaled(width=1.0, depth=1.1, dropout=0.2),
    "efficientnet_b2": EFFICIENTNET_B0.scaled(width=1.1, depth=1.2, dropout=0.3),
    "efficientnet_b3": EFFICIENTNET_B0.scaled(width=1.2, depth=1.4, dropout=0.3),
    "efficientnet_b4": EFFICIENTNET_B0.scaled(width=1.4, depth=1.8, dropout=0.4),
    "efficientnet_b5": EFFICIENTNET_B0.scaled(
        width=1.6, depth=2.2, dropout=0.4, norm_layer=BatchNorm2dTF
    ),
    "efficientnet_b6": EFFICIENTNET_B0.scaled(
        width=1.8, depth=2.6, dropout=0.5, norm_layer=BatchNorm2dTF
    ),
    "efficientnet_b7": EFFICIENTNET_B0.scaled(
        width=2.0, depth=3.1, dropout=0.5, norm_layer=BatchNorm2dTF
    ),
}


@register_backbone(timm="efficientnet_b0")
def efficientnet_b0(**kwargs) -> EfficientNet:
    return EfficientNet(CFGS["efficientnet_b0"], **kwargs)


@register_backbone(timm="efficientnet_b1")
def efficientnet_b1(**kwargs) -> EfficientNet:
    return EfficientNet(CFGS["efficientnet_b1"], **kwargs)


@register_backbone(timm="efficientnet_b2")
def efficientnet_b2(**kwargs) -> EfficientNet:
    return EfficientNet(CFGS["efficientnet_b2"], **kwargs)


@register_backbone(timm="efficientnet_b3")
def efficientnet_b3(**kwargs) -> EfficientNet:
    return EfficientNet(CFGS["efficientnet_b3"], **kwargs)


@register_backbone(timm="efficientnet_b4")
def efficientnet_b4(**kwargs) -> EfficientNet:
    return EfficientNet(CFGS["efficientnet_b4"], **kwargs)


@register_backbone()  # timm's efficientnet_b5..b7 use BatchNorm eps 1e-5, torchvision's 1e-3
def efficientnet_b5(**kwargs) -> EfficientNet:
    return EfficientNet(CFGS["efficientnet_b5"], **kwargs)


@register_backbone()
def efficientnet_b6(**kwargs) -> EfficientNet:
    return EfficientNet(CFGS["efficientnet_b6"], **kwargs)


@register_backbone()
def efficientnet_b7(**kwargs) -> EfficientNet:
    return EfficientNet(CFGS["efficientnet_b7"], **kwargs)

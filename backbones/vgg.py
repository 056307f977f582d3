"""VGG (Simonyan & Zisserman 2014), plain and with BatchNorm after each conv (the `_bn` variants).

Five blocks of 3x3 convs with a 2x2 max-pool after each. As ResNet's stages open with their
stride-2 block, ours open with the pool: the first block (stride 1) is the stem, and stage k is
pool k + block k+1, so each level is the last conv (+ norm) + ReLU at its stride, the map just
before the next pool (vgg16: C1 = conv2_2, C2 = conv3_3, C3 = conv4_3, the stride-8 map of
SSD, C4 = conv5_3); C5 is pool5 alone, what torchvision's classifier reads, as in timm's
`features_only` VGG.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from .contract import Backbone, ClassifierCfg, Rules
from .layers import ConvNormAct, LayerFn, ReLU, init_he_normal
from .registry import register_backbone

WIDTHS = (64, 128, 256, 512, 512)  # channels of the five blocks


@dataclass(frozen=True)
class VGGCfg:
    depths: tuple[int, int, int, int, int]  # 3x3 convs in each block
    norm_layer: LayerFn | None = None  # after each conv: BatchNorm2d in the `_bn` variants


class VGG(Backbone):
    """VGG (Simonyan & Zisserman 2014): a stride-1 stem, pool + block for C1..C4, pool5 for C5.

    Args:
        cfg: the variant (convs per block, and whether each is followed by a norm).
        **common: the contract's arguments (`Backbone`) but `drop_path_rate` and
            `output_stride`; levels C1..C5; `frozen_stages=k` freezes the convs up to Ck;
            `norm_layer=None` keeps the variant's norm (BatchNorm2d for `_bn`, none otherwise).
    """

    # torchvision's head: 7x7 average pool, flatten, two 4096-wide hidden layers with dropout.
    classifier_cfg = ClassifierCfg(pool_size=7, hidden_channels=(4096, 4096), dropout=0.5)
    # No residual blocks to drop, and neither torchvision nor timm has a dilated VGG.
    unsupported = ("drop_path_rate", "output_stride")

    def __init__(self, cfg: VGGCfg, **common: Any) -> None:
        super().__init__(**common)
        norm_layer = self.norm_layer or cfg.norm_layer
        blocks = []
        in_channels = self.in_chans
        for depth, width in zip(cfg.depths, WIDTHS, strict=True):
            layers: OrderedDict[str, nn.Module] = OrderedDict()
            if blocks:  # every block but the first runs on the previous block's pooled output
                layers["pool"] = _max_pool()
            for i in range(depth):
                # The reference keeps the conv bias even before BatchNorm; so do we, for its weights.
                layers[str(i)] = ConvNormAct(
                    in_channels, width, 3, bias=True, norm_layer=norm_layer, act_layer=ReLU
                )
                in_channels = width
            blocks.append(nn.Sequential(layers))

        self.stem = blocks[0]  # stride 1: no level
        self.stages = nn.ModuleList()
        for k, block in enumerate(blocks[1:], start=1):
            self.stages.append(block)
            self.add_level(WIDTHS[k], stride=2**k)
        self.stages.append(nn.Sequential(OrderedDict(pool=_max_pool())))  # pool5
        self.add_level(WIDTHS[-1], stride=32)

        self.weight_rules = {"torchvision": _torchvision_rules(cfg.depths, norm_layer is not None)}
        init_he_normal(self)
        self.finalize()


def _max_pool() -> nn.MaxPool2d:
    # ceil_mode: an odd size keeps its last row/column, so Ck is ceil(H / 2**k) as in every
    # family; on even sizes it is torchvision's floor-mode pool exactly.
    return nn.MaxPool2d(kernel_size=2, stride=2, ceil_mode=True)


def _torchvision_rules(depths: Sequence[int], has_norm: bool) -> Rules:
    """torchvision numbers `features` flat: conv, [norm], relu for each conv, then the pool."""
    rules = []
    index = 0
    for block, depth in enumerate(depths):
        prefix = "stem" if block == 0 else f"stages.{block - 1}"
        for i in range(depth):
            rules.append((rf"features\.{index}\.(\w+)", rf"backbone.{prefix}.{i}.conv.\1"))
            if has_norm:
                rules.append((rf"features\.{index + 1}\.(\w+)", rf"backbone.{prefix}.{i}.norm.\1"))
            index += 3 if has_norm else 2
        index += 1  # the max-pool
    rules += [
        (r"classifier\.0\.(\w+)", r"head.hidden.0.linear.\1"),
        (r"classifier\.3\.(\w+)", r"head.hidden.1.linear.\1"),
        (r"classifier\.6\.(\w+)", r"head.fc.\1"),
    ]
    return tuple(rules)


CFGS = {  # Simonyan & Zisserman 2014, Table 1: configurations A, B, D, E
    "vgg11": VGGCfg(depths=(1, 1, 2, 2, 2)),
    "vgg13": VGGCfg(depths=(2, 2, 2, 2, 2)),
    "vgg16": VGGCfg(depths=(2, 2, 3, 3, 3)),
    "vgg19": VGGCfg(depths=(2, 2, 4, 4, 4)),
    "vgg11_bn": VGGCfg(depths=(1, 1, 2, 2, 2), norm_layer=nn.BatchNorm2d),
    "vgg13_bn": VGGCfg(depths=(2, 2, 2, 2, 2), norm_layer=nn.BatchNorm2d),
    "vgg16_bn": VGGCfg(depths=(2, 2, 3, 3, 3), norm_layer=nn.BatchNorm2d),
    "vgg19_bn": VGGCfg(depths=(2, 2, 4, 4, 4), norm_layer=nn.BatchNorm2d),
}


@register_backbone()
def vgg11(**kwargs) -> VGG:
    return VGG(CFGS["vgg11"], **kwargs)


@register_backbone()
def vgg11_bn(**kwargs) -> VGG:
    return VGG(CFGS["vgg11_bn"], **kwargs)


@register_backbone()
def vgg13(**kwargs) -> VGG:
    return VGG(CFGS["vgg13"], **kwargs)


@register_backbone()
def vgg13_bn(**kwargs) -> VGG:
    return VGG(CFGS["vgg13_bn"], **kwargs)


@register_backbone()
def vgg16(**kwargs) -> VGG:
    return VGG(CFGS["vgg16"], **kwargs)


@register_backbone()
def vgg16_bn(**kwargs) -> VGG:
    return VGG(CFGS["vgg16_bn"], **kwargs)


@register_backbone()
def vgg19(**kwargs) -> VGG:
    return VGG(CFGS["vgg19"], **kwargs)


@register_backbone()
def vgg19_bn(**kwargs) -> VGG:
    return VGG(CFGS["vgg19_bn"], **kwargs)

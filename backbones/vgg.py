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
from functools import partial

from torch import nn

from .contract import DEFAULT_OUT_FEATURES, Backbone, ClassifierCfg, Rules
from .layers import ConvNormAct, LayerFn
from .registry import register_backbone

ReLU = partial(nn.ReLU, inplace=True)
WIDTHS = (64, 128, 256, 512, 512)  # channels of the five blocks


@dataclass(frozen=True)
class VGGCfg:
    depths: tuple[int, int, int, int, int]  # 3x3 convs in each block
    norm_layer: LayerFn | None = None  # after each conv: BatchNorm2d in the `_bn` variants


class VGG(Backbone):
    """VGG (Simonyan & Zisserman 2014): a stride-1 stem, pool + block for C1..C4, pool5 for C5.

    Args:
        cfg: the variant (convs per block, and whether each is followed by a norm).
        out_features: levels to return, any of C1..C5.
        in_chans: input channels.
        frozen_stages: -1 nothing, 0 the stem (conv1_x), k the stem and the first k stages
            (the convs up to the level Ck).
        norm_eval: keep every BatchNorm in eval mode while training.
        norm_layer: the norm after each conv, called with a channel count; None keeps the
            variant's (BatchNorm2d for the `_bn` variants, no norm for the others).
    """

    # torchvision's head: 7x7 average pool, flatten, two 4096-wide hidden layers with dropout.
    classifier_cfg = ClassifierCfg(pool_size=7, hidden_channels=(4096, 4096), dropout=0.5)

    def __init__(
        self,
        cfg: VGGCfg,
        *,
        out_features: Sequence[str] = DEFAULT_OUT_FEATURES,
        in_chans: int = 3,
        frozen_stages: int = -1,
        norm_eval: bool = False,
        norm_layer: LayerFn | None = None,
    ) -> None:
        super().__init__(
            out_features=out_features,
            in_chans=in_chans,
            frozen_stages=frozen_stages,
            norm_eval=norm_eval,
        )
        norm_layer = cfg.norm_layer if norm_layer is None else norm_layer
        blocks = []
        in_channels = in_chans
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
        self._init_weights()
        self.finalize()

    def _init_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.BatchNorm2d | nn.GroupNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)


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

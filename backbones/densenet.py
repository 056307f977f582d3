"""DenseNet-BC (Huang et al. 2016): every layer sees the concatenation of all earlier ones."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .contract import Backbone, Rules, keep_norm_stats_on_recompute
from .layers import ConvNormAct, LayerFn, ReLU, init_he_normal
from .registry import register_backbone


class DenseLayer(nn.Module):
    """norm-ReLU-1x1 conv to `bn_size * growth_rate`, then norm-ReLU-3x3 conv to `growth_rate`.

    With `memory_efficient`, the concatenation of the inputs and the 1x1 bottleneck on it are
    recomputed in the backward pass instead of stored (Pleiss et al. 2017): the stored
    concatenations grow quadratically with the depth of a block, the recomputation is cheap.
    """

    def __init__(
        self,
        in_channels: int,
        growth_rate: int,
        bn_size: int,
        norm_layer: LayerFn = nn.BatchNorm2d,
        memory_efficient: bool = False,
    ) -> None:
        super().__init__()
        width = bn_size * growth_rate
        self.norm1 = norm_layer(in_channels)
        self.act1 = ReLU()
        self.conv1 = nn.Conv2d(in_channels, width, 1, bias=False)
        self.norm2 = norm_layer(width)
        self.act2 = ReLU()
        self.conv2 = nn.Conv2d(width, growth_rate, 3, padding=1, bias=False)
        self.memory_efficient = memory_efficient

    def bottleneck(self, *features: torch.Tensor) -> torch.Tensor:
        x = torch.cat(features, dim=1)  # (B, sum of the inputs' channels, H, W)
        return self.conv1(self.act1(self.norm1(x)))  # (B, bn_size * growth_rate, H, W)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        if self.memory_efficient and torch.is_grad_enabled():
            # The recomputation runs norm1 in train mode again: keep its running statistics
            # from being updated twice for one batch.
            context_fn = partial(keep_norm_stats_on_recompute, self.norm1)
            x = checkpoint(self.bottleneck, *features, use_reentrant=False, context_fn=context_fn)
        else:
            x = self.bottleneck(*features)
        return self.conv2(self.act2(self.norm2(x)))  # (B, growth_rate, H, W)


class DenseBlock(nn.Module):
    """`num_layers` dense layers; the output concatenates the input and every layer's output."""

    def __init__(
        self,
        num_layers: int,
        in_channels: int,
        growth_rate: int,
        bn_size: int,
        norm_layer: LayerFn = nn.BatchNorm2d,
        memory_efficient: bool = False,
    ) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            DenseLayer(
                in_channels + i * growth_rate, growth_rate, bn_size, norm_layer, memory_efficient
            )
            for i in range(num_layers)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = [x]
        for layer in self.layers:
            features.append(layer(features))
        return torch.cat(features, dim=1)  # (B, C + num_layers * growth_rate, H, W)


class Transition(nn.Sequential):
    """norm-ReLU-1x1 conv halving the channels, then a 2x2 average pool halving the size."""

    def __init__(self, in_channels: int, out_channels: int, norm_layer: LayerFn) -> None:
        super().__init__()
        self.norm = norm_layer(in_channels)
        self.act = ReLU()
        self.conv = nn.Conv2d(in_channels, out_channels, 1, bias=False)
        # ceil_mode: an odd size keeps its last row/column (averaged over what is there), so
        # Ck is ceil(H / 2**k); on even sizes it is torchvision's floor-mode pool exactly.
        self.pool = nn.AvgPool2d(kernel_size=2, stride=2, ceil_mode=True)


@dataclass(frozen=True)
class DenseNetCfg:
    depths: tuple[int, int, int, int]  # dense layers per block
    growth_rate: int = 32  # channels each layer adds (k in the paper)
    stem_channels: int = 64
    bn_size: int = 4  # the 1x1 bottleneck has bn_size * growth_rate channels


class DenseNet(Backbone):
    """DenseNet-BC (Huang et al. 2016): a 7x7 stem (C1), then four dense blocks (C2..C5).

    Stage k is the max-pool (k = 1) or the transition before dense block k, then the block;
    the last stage ends with the final norm and ReLU, so C5 is what the classifier pools.

    Args:
        cfg: the variant (layers per block, growth rate, stem width, bottleneck factor).
        memory_efficient: recompute each layer's concatenation and bottleneck during backward
            (same outputs and gradients, about half the stored activations, more compute).
        **common: the contract's arguments (`Backbone`) but `drop_path_rate` and
            `output_stride`; levels C1..C5, BatchNorm2d by default.
    """

    # Dense blocks have no residual branch to drop, and no reference has a dilated DenseNet.
    unsupported = ("drop_path_rate", "output_stride")

    def __init__(self, cfg: DenseNetCfg, *, memory_efficient: bool = False, **common: Any) -> None:
        super().__init__(**common)
        norm_layer = self.norm_layer or nn.BatchNorm2d
        channels = cfg.stem_channels
        self.stem = ConvNormAct(
            self.in_chans, channels, 7, stride=2, norm_layer=norm_layer, act_layer=ReLU
        )
        self.add_level(channels, stride=2)

        self.stages = nn.ModuleList()
        for index, depth in enumerate(cfg.depths):
            layers: OrderedDict[str, nn.Module] = OrderedDict()
            if index == 0:  # C2 starts with the stem's max-pool
                layers["pool"] = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
            else:  # DenseNet-BC compression: transitions halve the channels
                layers["transition"] = Transition(channels, channels // 2, norm_layer)
                channels //= 2
            layers["block"] = DenseBlock(
                depth, channels, cfg.growth_rate, cfg.bn_size, norm_layer, memory_efficient
            )
            channels += depth * cfg.growth_rate
            if index == len(cfg.depths) - 1:
                layers["norm"] = norm_layer(channels)
                layers["act"] = ReLU()
            self.stages.append(nn.Sequential(layers))
            self.add_level(channels, stride=4 * 2**index)

        rules = _rules(cfg.depths)  # the layer count per block varies by variant
        self.weight_rules = {"torchvision": rules, "timm": rules}
        init_he_normal(self, mode="fan_in")
        self.finalize()


def _rules(depths: Sequence[int]) -> Rules:
    """torchvision's and timm's keys (the same) into ours; their blocks and layers count from 1.

    torchvision's published files still spell the layer norms and convs `norm.1`, `conv.2`
    (its loader renames them): both spellings are accepted.
    """
    rules: list[tuple[str, str | None]] = [
        (r"features\.conv0\.weight", "backbone.stem.conv.weight"),
        (r"features\.norm0\.(\w+)", r"backbone.stem.norm.\1"),
    ]
    for stage, depth in enumerate(depths):
        block = rf"features\.denseblock{stage + 1}\.denselayer"
        rules += [
            (
                rf"{block}{i + 1}\.(norm|conv)\.?([12])\.(\w+)",
                rf"backbone.stages.{stage}.block.layers.{i}.\1\2.\3",
            )
            for i in range(depth)
        ]
        if stage > 0:
            rules.append(
                (
                    rf"features\.transition{stage}\.(norm|conv)\.(\w+)",
                    rf"backbone.stages.{stage}.transition.\1.\2",
                )
            )
    rules += [
        (r"features\.norm5\.(\w+)", rf"backbone.stages.{len(depths) - 1}.norm.\1"),
        (r"classifier\.(\w+)", r"head.fc.\1"),
    ]
    return tuple(rules)


CFGS = {  # Huang et al. 2016, Table 1 (DenseNet-BC: bottleneck layers, compression 0.5)
    "densenet121": DenseNetCfg(depths=(6, 12, 24, 16)),
    "densenet161": DenseNetCfg(depths=(6, 12, 36, 24), growth_rate=48, stem_channels=96),
    "densenet169": DenseNetCfg(depths=(6, 12, 32, 32)),
    "densenet201": DenseNetCfg(depths=(6, 12, 48, 32)),
}


@register_backbone(timm="densenet121")
def densenet121(**kwargs) -> DenseNet:
    return DenseNet(CFGS["densenet121"], **kwargs)


@register_backbone(timm="densenet161")
def densenet161(**kwargs) -> DenseNet:
    return DenseNet(CFGS["densenet161"], **kwargs)


@register_backbone(timm="densenet169")
def densenet169(**kwargs) -> DenseNet:
    return DenseNet(CFGS["densenet169"], **kwargs)


@register_backbone(timm="densenet201")
def densenet201(**kwargs) -> DenseNet:
    return DenseNet(CFGS["densenet201"], **kwargs)

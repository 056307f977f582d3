"""Semantic segmentation: the Semantic FPN head and backbone + FPN + head as one model."""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from backbones import Backbone
from backbones.layers import ConvNormAct, GroupNorm, LayerFn, ReLU, init_he_normal

from ._levels import check_features, check_undilated, parse_levels
from .fpn import FPN


class SemanticFPNHead(nn.Module):
    """Panoptic FPN's semantic branch (Kirillov et al. 2019, "Panoptic Feature Pyramid Networks").

    Level k goes through k - f stages of 3x3 conv-norm-ReLU + bilinear upsampling to the
    finest level f (the finest level gets one conv and no upsampling); the levels are summed,
    a 1x1 conv gives class logits, and those are upsampled bilinearly to `size`. Each stage
    upsamples to the exact size of the next finer input level, not a blind 2x, so the sum
    lines up for any input size.

    Args:
        in_channels: pyramid level -> channels, fine to coarse, consecutive strides; pass
            `fpn.channels` (P2..P5 in the paper, where the finest level has stride 4).
        num_classes: number of logits per pixel.
        head_channels: width of the upsampling stages (128 in the paper).
        norm_layer: called with `head_channels`; GroupNorm with up to 32 groups, as the paper.
        act_layer: activation of the stages.
        dropout: dropout on the summed map, before the classifier.
    """

    def __init__(
        self,
        in_channels: Mapping[str, int],
        num_classes: int,
        head_channels: int = 128,
        norm_layer: LayerFn | None = GroupNorm,
        act_layer: LayerFn = ReLU,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        indices = parse_levels("SemanticFPNHead", in_channels)
        if num_classes < 1:
            raise ValueError(f"num_classes must be positive, got {num_classes}")
        self.in_channels = dict(in_channels)
        finest = indices[0]
        self.stages = nn.ModuleDict()
        for (name, in_ch), k in zip(self.in_channels.items(), indices, strict=True):
            self.stages[name] = nn.Sequential(
                *(
                    ConvNormAct(
                        in_ch if i == 0 else head_channels,
                        head_channels,
                        3,
                        norm_layer=norm_layer,
                        act_layer=act_layer,
                    )
                    for i in range(max(1, k - finest))
                )
            )
        self.drop = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.classifier = nn.Conv2d(head_channels, num_classes, 1)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # As Detectron2's semantic FPN head: He init (fan-out) for the stages, a near-zero
        # classifier so training starts from uniform class scores.
        init_he_normal(self.stages)
        nn.init.normal_(self.classifier.weight, std=0.001)
        nn.init.zeros_(self.classifier.bias)

    def forward(self, features: Mapping[str, torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
        check_features("SemanticFPNHead", self.in_channels, features)
        names = list(self.in_channels)
        out = None
        for index, name in enumerate(names):
            x = features[name]  # (B, C_k, H_k, W_k)
            for step, stage in enumerate(self.stages[name]):
                x = stage(x)
                if index - step > 0:  # up one level, to that level's exact size
                    finer = features[names[index - step - 1]].shape[-2:]
                    x = F.interpolate(x, size=finer, mode="bilinear", align_corners=False)
            out = x if out is None else out + x  # (B, head_channels, H_f, W_f)
        logits = self.classifier(self.drop(out))  # (B, num_classes, H_f, W_f)
        return F.interpolate(logits, size=tuple(size), mode="bilinear", align_corners=False)


class Segmenter(nn.Module):
    """Semantic FPN (Kirillov et al. 2019): backbone -> FPN -> `SemanticFPNHead`, logits at input size.

    The paper feeds C2..C5 (finest output at stride 4): create the backbone with
    `out_features=("C2", "C3", "C4", "C5")`. Any consecutive levels work: with the default
    C3..C5 the head works at stride 8, cheaper and coarser.

    Args:
        backbone: any registered backbone; its `channels` wire the FPN.
        num_classes: number of logits per pixel.
        fpn_channels: channels of the FPN levels.
        head_channels: width of the head's upsampling stages.
    """

    def __init__(
        self,
        backbone: Backbone,
        num_classes: int,
        fpn_channels: int = 256,
        head_channels: int = 128,
    ) -> None:
        super().__init__()
        check_undilated("Segmenter", backbone.strides)
        self.backbone = backbone
        self.neck = FPN(backbone.channels, fpn_channels)
        self.head = SemanticFPNHead(self.neck.channels, num_classes, head_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.neck(self.backbone(x))  # {"P<k>": (B, fpn_channels, H/2^k, W/2^k)}
        return self.head(features, size=x.shape[-2:])  # (B, num_classes, H, W)

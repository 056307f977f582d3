"""A backbone as timm's `features_only` models are: a list of maps and a `feature_info`."""

from __future__ import annotations

import torch
from torch import nn

from backbones import Backbone, FeatureInfoList


class FeatureList(nn.Module):
    """Wraps a backbone to return its levels as a list, fine to coarse, as timm's feature models.

    Code written for `timm.create_model(name, features_only=True)` reads
    `model.feature_info.channels()` / `.reduction()` and indexes the maps it returns; this
    gives it our backbone: `feature_info` is the backbone's (`FeatureInfoList`), with module
    paths in this model (`backbone.stages.<i>`), and `channels()[i]` and `reduction()[i]`
    describe `forward(x)[i]`. The backbone's `out_features` choose the maps, as timm's
    `out_indices` do; `import backbones.timm_models` builds one by timm name.

    Args:
        backbone: any registered backbone (`backbones.create(name, out_features=...)`).
    """

    def __init__(self, backbone: Backbone) -> None:
        super().__init__()
        if not isinstance(backbone, Backbone):
            raise TypeError(
                "FeatureList wraps a backbones.Backbone, e.g. FeatureList(create('resnet50')); "
                f"got {type(backbone).__name__}"
            )
        self.backbone = backbone
        self.feature_info: FeatureInfoList = backbone.feature_info.under("backbone")

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return list(self.backbone(x).values())  # [(B, C_k, H / 2**k, W / 2**k) per level]

"""Classification on the coarsest feature, and `build_classifier` = backbone + reference head."""

from __future__ import annotations

import warnings
from collections import OrderedDict
from dataclasses import asdict

import torch
from torch import nn

from backbones import Backbone, create
from backbones.layers import LayerFn
from backbones.weights import Pretrained, load_into, resolve

POOLS = {"avg": nn.AdaptiveAvgPool2d, "max": nn.AdaptiveMaxPool2d}


class ClassificationHead(nn.Module):
    """pool -> optional norm -> flatten -> hidden (linear, act, dropout)* -> dropout -> fc.

    Args:
        in_channels: channels of the feature map it classifies.
        num_classes: number of logits.
        pool: "avg" or "max" global pooling.
        pool_size: pooled spatial size (VGG's head pools to 7x7 and flattens).
        norm_layer: applied to the pooled map (ConvNeXt's LayerNorm2d), called with channels.
        hidden_channels: widths of hidden linear layers, each followed by `act_layer` and dropout.
        act_layer: activation of the hidden layers.
        dropout: dropout after each hidden layer, or before `fc` when there are none.
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        pool: str = "avg",
        pool_size: int = 1,
        norm_layer: LayerFn | None = None,
        hidden_channels: tuple[int, ...] = (),
        act_layer: LayerFn = nn.ReLU,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if pool not in POOLS:
            raise ValueError(f"pool must be one of {list(POOLS)}, got {pool!r}")
        if num_classes < 1:
            raise ValueError(f"num_classes must be positive, got {num_classes}")
        self.pool = POOLS[pool](pool_size)
        self.norm = norm_layer(in_channels) if norm_layer is not None else nn.Identity()
        self.flatten = nn.Flatten(1)
        width = in_channels * pool_size * pool_size
        hidden = []
        for channels in hidden_channels:
            hidden.append(
                nn.Sequential(
                    OrderedDict(
                        linear=nn.Linear(width, channels), act=act_layer(), drop=nn.Dropout(dropout)
                    )
                )
            )
            width = channels
        self.hidden = nn.Sequential(*hidden)
        self.drop = nn.Dropout(dropout) if not hidden_channels else nn.Identity()
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.flatten(self.norm(self.pool(x)))  # (B, C * pool_size**2)
        return self.fc(self.drop(self.hidden(x)))  # (B, num_classes)


class Classifier(nn.Module):
    """A backbone and a classification head on its coarsest level."""

    def __init__(self, backbone: Backbone, head: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.level = next(reversed(backbone.channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x)[self.level])


def build_classifier(
    name: str,
    num_classes: int = 1000,
    pretrained: Pretrained | None = None,
    strict: bool = True,
    **backbone_kwargs,
) -> Classifier:
    """Backbone + the family's reference head: with torchvision's weights, torchvision's model.

    With `pretrained` and a `num_classes` other than the checkpoint's, the final `fc` starts
    from scratch; everything else is loaded.
    """
    backbone_kwargs.setdefault("out_features", ("C5",))
    weights = resolve(name, pretrained) if pretrained is not None else None  # read once
    backbone = create(name, pretrained=weights, strict=strict, **backbone_kwargs)
    level = next(reversed(backbone.channels))
    head = ClassificationHead(
        backbone.channels[level], num_classes, **asdict(backbone.classifier_cfg)
    )
    model = Classifier(backbone, head)
    if weights is not None:
        head_sd = {k.removeprefix("head."): v for k, v in weights.items() if k.startswith("head.")}
        fc = head_sd.get("fc.weight")
        if not head_sd:
            warnings.warn(
                f"the pretrained {name} weights have no classifier; the head starts from "
                "random weights",
                stacklevel=2,
            )
        else:
            if fc is not None and fc.shape[0] != num_classes:  # a new task: a new last layer
                head_sd = {k: v for k, v in head_sd.items() if not k.startswith("fc.")}
                head_sd.update({f"fc.{k}": v for k, v in head.fc.state_dict().items()})
            load_into(head, head_sd, strict=strict, origin=f"pretrained {name} head weights")
    return model

"""Classification on one level or several pooled together; `build_classifier` puts it on a backbone."""

from __future__ import annotations

import warnings
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import asdict
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from backbones import Backbone, create
from backbones.layers import LayerFn
from backbones.weights import Pretrained, load_into, resolve

from ._levels import check_features, describe


class AvgMaxPool(nn.Module):
    """Adaptive average and max pooling, averaged ("avgmax") or concatenated ("catavgmax").

    The two pools as in timm's `adaptive_avgmax_pool2d` / `adaptive_catavgmax_pool2d`: the
    average keeps the extent of a response, the max its peak.
    """

    def __init__(self, output_size: int = 1, concat: bool = False) -> None:
        super().__init__()
        self.output_size = output_size
        self.concat = concat

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        avg = F.adaptive_avg_pool2d(x, self.output_size)  # (B, C, s, s)
        peak = F.adaptive_max_pool2d(x, self.output_size)  # (B, C, s, s)
        return torch.cat((avg, peak), dim=1) if self.concat else 0.5 * (avg + peak)

    def extra_repr(self) -> str:
        return f"output_size={self.output_size}, concat={self.concat}"


POOLS: dict[str, Callable[[int], nn.Module]] = {
    "avg": nn.AdaptiveAvgPool2d,
    "max": nn.AdaptiveMaxPool2d,
    "avgmax": AvgMaxPool,
    "catavgmax": partial(AvgMaxPool, concat=True),
}


class ClassificationHead(nn.Module):
    """pool -> optional norm -> flatten -> hidden (linear, act, dropout)* -> dropout -> fc.

    With an int `in_channels` it classifies one feature map (the backbone's coarsest level);
    with a dict of levels it pools each of them and concatenates the pooled features
    (multi-scale pooling), and `forward` takes the backbone's dict.

    Args:
        in_channels: channels of the feature map it classifies, or level -> channels (e.g.
            `backbone.channels`) to pool and concatenate several levels.
        num_classes: number of logits.
        pool: "avg" or "max" pooling, "avgmax" (their mean, as timm) or "catavgmax" (both,
            concatenated: twice the features).
        pool_size: pooled spatial size (VGG's head pools to 7x7 and flattens).
        norm_layer: applied to the pooled map (ConvNeXt's LayerNorm2d), called with its channels.
        hidden_channels: widths of hidden linear layers, each followed by `act_layer` and dropout.
        act_layer: activation of the hidden layers.
        dropout: dropout after each hidden layer, or before `fc` when there are none.
    """

    def __init__(
        self,
        in_channels: int | Mapping[str, int],
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
        if isinstance(in_channels, Mapping):
            if not in_channels or not all(
                isinstance(c, int) and c > 0 for c in in_channels.values()
            ):
                raise ValueError(
                    "ClassificationHead takes in_channels as an int or a non-empty dict of "
                    f"levels to positive channel counts, got {in_channels!r}"
                )
            in_channels = dict(in_channels)
            pooled_channels = sum(in_channels.values())
        else:
            pooled_channels = in_channels
        self.in_channels = in_channels
        self.pool = POOLS[pool](pool_size)
        if pool == "catavgmax":
            pooled_channels *= 2
        self.norm = norm_layer(pooled_channels) if norm_layer is not None else nn.Identity()
        self.flatten = nn.Flatten(1)
        width = pooled_channels * pool_size * pool_size
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

    @property
    def levels(self) -> tuple[str, ...] | None:
        """The levels a multi-scale head pools, or None for a single feature map."""
        return tuple(self.in_channels) if isinstance(self.in_channels, dict) else None

    def forward(self, x: torch.Tensor | Mapping[str, torch.Tensor]) -> torch.Tensor:
        if isinstance(self.in_channels, dict):
            check_features("ClassificationHead", self.in_channels, x)
            # pooled maps share pool_size x pool_size, so they concatenate along channels
            x = torch.cat([self.pool(x[level]) for level in self.in_channels], dim=1)
        else:
            if not isinstance(x, torch.Tensor) or x.ndim != 4 or x.shape[1] != self.in_channels:
                got = (
                    f"shape {tuple(x.shape)}"
                    if isinstance(x, torch.Tensor)
                    else f"{type(x).__name__} {list(x) if isinstance(x, Mapping) else ''}"
                )
                raise ValueError(
                    f"ClassificationHead was built for one (batch, {self.in_channels}, height, "
                    f"width) map, got {got}. Pass one level, or build the head with "
                    "in_channels=backbone.channels to pool several."
                )
            x = self.pool(x)  # (B, C, pool_size, pool_size)
        x = self.flatten(self.norm(x))  # (B, C * pool_size**2)
        return self.fc(self.drop(self.hidden(x)))  # (B, num_classes)


class Classifier(nn.Module):
    """A backbone and a classification head on its coarsest level, or on the levels it names.

    A head with `levels` (a multi-scale `ClassificationHead`) gets the backbone's dict; any
    other head gets the coarsest level's tensor.
    """

    def __init__(self, backbone: Backbone, head: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.level = next(reversed(backbone.channels))
        self.multi_scale = getattr(head, "levels", None) is not None
        expected = getattr(head, "in_channels", None)
        if self.multi_scale:
            produced = backbone.channels
            if any(produced.get(level) != c for level, c in expected.items()):
                raise ValueError(
                    f"the head was built for levels {describe(expected)} (name: channels) but "
                    f"the backbone returns {describe(produced)}; build the head with "
                    "in_channels=backbone.channels, or the backbone with those out_features"
                )
        elif isinstance(expected, int) and expected != backbone.channels[self.level]:
            raise ValueError(
                f"the head was built for {expected} channels but the backbone's coarsest level "
                f"{self.level} has {backbone.channels[self.level]}; build it with "
                f"in_channels=backbone.channels[{self.level!r}]"
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.backbone(x)
        return self.head(features if self.multi_scale else features[self.level])


def build_classifier(
    backbone: str | Backbone,
    num_classes: int = 1000,
    pretrained: Pretrained | None = None,
    strict: bool = True,
    **options: Any,
) -> Classifier:
    """A backbone and a classification head: the reference model by name, or a head you choose
    on a backbone you built.

    By name, the backbone is created with `pretrained`, `strict` and `options` (the arguments
    of `create`; `out_features` defaults to ("C5",)) and gets its family's reference head
    (`Backbone.classifier_cfg`) on its coarsest level: with torchvision's weights, the result
    is torchvision's classifier, logit for logit. With `pretrained` and a `num_classes` other
    than the checkpoint's, the final `fc` starts from scratch; everything else is loaded.

    A built `Backbone` gets a `ClassificationHead` with `options` (its arguments: `pool`,
    `hidden_channels`, `dropout`, ...) on the one level the backbone returns, or on all of
    them, pooled and concatenated, when it returns several (multi-scale). `head=classification`
    in the training configs builds its model this way.
    """
    if isinstance(backbone, str):
        return _reference_classifier(backbone, num_classes, pretrained, strict, **options)
    if not isinstance(backbone, Backbone):
        raise TypeError(
            f"backbone must be a registered name or a Backbone, got {type(backbone).__name__}"
        )
    if pretrained is not None:
        raise ValueError(
            "pretrained= loads weights into a backbone built by name; a built backbone has its "
            "weights already (create(name, pretrained=...))"
        )
    channels = backbone.channels
    in_channels = channels if len(channels) > 1 else next(iter(channels.values()))
    return Classifier(backbone, ClassificationHead(in_channels, num_classes, **options))


def _reference_classifier(
    name: str,
    num_classes: int,
    pretrained: Pretrained | None,
    strict: bool,
    **backbone_kwargs: Any,
) -> Classifier:
    """`build_classifier` by name: the family's reference head, loaded from `pretrained`."""
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
                stacklevel=3,  # the caller of build_classifier
            )
        else:
            if fc is not None and fc.shape[0] != num_classes:  # a new task: a new last layer
                head_sd = {k: v for k, v in head_sd.items() if not k.startswith("fc.")}
                head_sd.update({f"fc.{k}": v for k, v in head.fc.state_dict().items()})
            load_into(head, head_sd, strict=strict, origin=f"pretrained {name} head weights")
    return model

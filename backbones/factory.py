"""`create(name, pretrained=..., **kwargs)`: a registered backbone, optionally with weights."""

from __future__ import annotations

from .contract import Backbone
from .registry import check_arguments, get_entry
from .weights import Pretrained, load_pretrained


def create(
    name: str, *, pretrained: Pretrained | None = None, strict: bool = True, **kwargs
) -> Backbone:
    """Build a registered backbone, optionally with pretrained weights.

    Args:
        name: a registered name, e.g. "resnet50" (see `list_backbones()`).
        pretrained: "torchvision" or "timm" (downloaded through that library), a path to a
            .pth/.pt/.safetensors file (torchvision's, timm's or ours), or a state dict.
        strict: with False, load what matches and warn about the rest instead of raising.
        **kwargs: the family's constructor arguments (out_features, in_chans,
            frozen_stages, norm_eval, drop_path_rate, norm_layer, ...); one the family does
            not take is a TypeError that lists those it does.
    """
    check_arguments(name, kwargs)
    model = get_entry(name).fn(**kwargs)
    if pretrained is not None:
        load_pretrained(model, name, pretrained, strict=strict)
    return model

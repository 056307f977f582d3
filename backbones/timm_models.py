"""Every registered backbone in timm's registry as `zoo_<name>`: `import backbones.timm_models`.

Code that builds its backbone by timm name then takes ours with no glue:
segmentation_models_pytorch (`encoder_name="tu-zoo_resnet50"`), effdet
(`backbone_name="zoo_efficientnet_b0"`), mmdet's `TIMMBackbone`, or timm itself:

    timm.create_model("zoo_resnet50", features_only=True, out_indices=(2, 3, 4))
    # a list of C3, C4, C5 and a `feature_info`, as timm's feature extractors
    timm.create_model("zoo_resnet50", num_classes=10)   # the classifier (heads.build_classifier)

`out_indices` index the backbone's `feature_info`, every level it has, fine to coarse: timm's
numbering for every family but VGG (timm's VGG has a stride-1 map at index 0, which is no level
here; our index 0 is C1, its 1). `pretrained=True` loads torchvision's weights, or timm's where
torchvision has none; the tag chooses (`zoo_resnet50.timm`), and
`pretrained_cfg_overlay=dict(file=path)` loads a weights file, as with timm's own models.
"""

from __future__ import annotations

import functools

try:
    from timm.models import register_model
except ImportError:  # timm is an optional extra: the core install is torch + torchvision
    raise ImportError(
        "backbones.timm_models registers our backbones with timm, which is not installed: "
        "pip install 'backbone-zoo[timm]'"
    ) from None

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from heads import FeatureList, build_classifier

from .contract import COMMON_DEFAULTS
from .factory import create
from .registry import family_arguments, get_entry, list_backbones
from .weights import SOURCES, Pretrained

PREFIX = "zoo_"
# timm options that configure the classifier: a features_only model has none, and ignores them
# as timm's feature extractors do.
HEAD_OPTIONS = ("num_classes", "global_pool", "drop_rate")

# Read by timm's register_model: the input statistics each name's weights expect, so that timm's
# data config (`timm.data.resolve_model_data_config`) normalises as they were trained.
default_cfgs: dict[str, dict[str, Any]] = {}


def create_model(
    name: str,
    *,
    pretrained: bool = False,
    pretrained_cfg: str | None = None,
    pretrained_cfg_overlay: Mapping[str, Any] | None = None,
    cache_dir: str | None = None,
    features_only: bool = False,
    out_indices: Sequence[int] | None = None,
    feature_cfg: Mapping[str, Any] | None = None,
    **kwargs: Any,
) -> nn.Module:
    """What `timm.create_model(f"zoo_{name}", ...)` returns: a feature extractor or a classifier.

    `kwargs` are the backbone's arguments (`in_chans`, `output_stride`, `drop_path_rate`, ...);
    one the family does not have passes when it asks for nothing (0, None, False), and is
    refused with the family's options otherwise.
    """
    timm_name = f"{PREFIX}{name}"
    if cache_dir is not None:
        raise TypeError(
            f"{timm_name} takes no cache_dir: its weights download through torchvision or timm, "
            "into their caches (set TORCH_HOME or HF_HOME)"
        )
    if feature_cfg:
        raise TypeError(
            f"{timm_name} takes no feature_cfg: its feature extractor returns the levels "
            "out_indices choose, as timm's default one"
        )
    weights = _weights(name, pretrained, pretrained_cfg, pretrained_cfg_overlay)
    if features_only:
        kwargs = {k: v for k, v in kwargs.items() if k not in HEAD_OPTIONS}
        kwargs = _known(name, kwargs)
        if "out_features" in kwargs and out_indices is not None:
            raise TypeError(f"{timm_name}: pass out_indices (timm's) or out_features, not both")
        if "out_features" not in kwargs:  # every level unless out_indices choose
            kwargs["out_features"] = _levels(name, out_indices)
        model = FeatureList(create(name, pretrained=weights, **kwargs))
    else:
        if out_indices is not None:
            raise TypeError(
                f"{timm_name}: out_indices choose the maps of a feature extractor; pass "
                "features_only=True with them"
            )
        num_classes = kwargs.pop("num_classes", 1000)
        model = build_classifier(name, num_classes, pretrained=weights, **_known(name, kwargs))
    model.pretrained_cfg = dict(default_cfgs[timm_name], architecture=timm_name)
    return model


def _known(name: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    """`kwargs` without the options `name`'s family lacks that ask for nothing; `create` refuses
    the others, naming the family's options."""
    family = get_entry(name).family
    accepted = family_arguments(family) if family is not None else None
    if accepted is None:  # no signature to check against: `create` passes them all
        return kwargs
    return {k: v for k, v in kwargs.items() if k in accepted or not _asks_for_nothing(k, v)}


def _asks_for_nothing(key: str, value: object) -> bool:
    # how timm's callers spell "none": drop_path_rate=0.0, drop_block_rate=None, output_stride=32
    if key in COMMON_DEFAULTS and value == COMMON_DEFAULTS[key]:
        return True
    return value is None or (isinstance(value, bool | int | float) and not value)


def _levels(name: str, out_indices: Sequence[int] | int | None) -> tuple[str, ...]:
    """The level names that timm's `out_indices` choose: indices into every level, fine to coarse."""
    names = level_names(name)
    if out_indices is None:
        return names
    indices = [out_indices] if isinstance(out_indices, int) else list(out_indices)
    bad = [i for i in indices if not isinstance(i, int) or not -len(names) <= i < len(names)]
    if bad or not indices:
        levels = ", ".join(f"{i}: {level}" for i, level in enumerate(names))
        raise ValueError(
            f"{PREFIX}{name} has {len(names)} levels, {levels}; out_indices={out_indices!r} "
            f"asks for {bad or 'none'}. Use indices in {-len(names)}..{len(names) - 1} "
            "(negative ones count from the coarsest)."
        )
    return tuple(names[i] for i in sorted({i % len(names) for i in indices}))


@functools.cache
def level_names(name: str) -> tuple[str, ...]:
    """Every level `name` has, fine to coarse (the same for any of its arguments)."""
    with torch.device("meta"):  # names only: nothing is allocated
        return tuple(f.name for f in create(name).feature_info)


def _weights(
    name: str,
    pretrained: bool,
    pretrained_cfg: object,
    overlay: Mapping[str, Any] | None,
) -> Pretrained | None:
    """What `create(pretrained=...)` gets for timm's `pretrained`, tag and overlay."""
    sources = list(get_entry(name).sources)
    unknown = sorted(set(overlay or {}) - {"file"})
    if unknown:
        raise TypeError(
            f"{PREFIX}{name}: pretrained_cfg_overlay may only name a weights `file`, got {unknown}"
        )
    if pretrained_cfg is not None and pretrained_cfg not in sources:
        tags = ", ".join(f"{PREFIX}{name}.{source}" for source in sources) or "none"
        raise ValueError(
            f"{PREFIX}{name} has no {pretrained_cfg!r} weights; its tags choose where "
            f"pretrained weights come from: {tags}"
        )
    if not pretrained:
        return None
    if overlay and overlay.get("file"):
        return overlay["file"]
    if pretrained_cfg is None:  # torchvision's where it has the network, as `create` offers
        pretrained_cfg = next((s for s in SOURCES if s in sources), None)
    if pretrained_cfg is None:
        raise ValueError(f"{PREFIX}{name} has no pretrained weights to download")
    return pretrained_cfg


def _entrypoint(name: str) -> Callable[..., nn.Module]:
    def entrypoint(**kwargs: Any) -> nn.Module:
        return create_model(name, **kwargs)

    entrypoint.__name__ = entrypoint.__qualname__ = f"{PREFIX}{name}"
    entrypoint.__module__ = __name__
    entrypoint.__doc__ = f"Our {name} (`backbones.create({name!r})`), built the timm way."
    return entrypoint


for _name in list_backbones():
    _entry = get_entry(_name)
    default_cfgs[f"{PREFIX}{_name}"] = {"num_classes": 1000, "mean": _entry.mean, "std": _entry.std}
    # a module attribute too, as timm's entrypoints are (register_model lists it in __all__)
    globals()[f"{PREFIX}{_name}"] = register_model(_entrypoint(_name))
del _name, _entry

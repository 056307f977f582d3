"""Hand-written CNN backbones with multi-scale features and exact torchvision/timm weights.

from backbones import create, list_backbones
model = create("resnet50")                # returns {"C3": ..., "C4": ..., "C5": ...}
"""

from . import convnext, densenet, efficientnet, mobilenet, resnet, vgg  # noqa: F401  (register the families)
from .contract import Backbone, ClassifierCfg, FeatureInfo, FeatureInfoList
from .factory import create
from .fuse import fuse_batchnorm
from .registry import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    get_entry,
    input_normalization,
    list_backbones,
    register_backbone,
)
from .weights import WeightsError, convert

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "Backbone",
    "ClassifierCfg",
    "FeatureInfo",
    "FeatureInfoList",
    "WeightsError",
    "convert",
    "create",
    "fuse_batchnorm",
    "get_entry",
    "input_normalization",
    "list_backbones",
    "register_backbone",
]

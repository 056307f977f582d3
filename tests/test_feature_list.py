"""The timm bridge: `feature_info` answers timm's questions, `FeatureList` returns a list."""

from __future__ import annotations

from collections import OrderedDict

import pytest
import timm
import torch
import torchvision
from torch import nn

from backbones import FeatureInfo, FeatureInfoList, create
from heads import FeatureList


def _consumer(model: nn.Module, x: torch.Tensor) -> dict[str, list]:
    """What code written for timm's `features_only` models does (EfficientDet, mmdet's and
    segmentation_models_pytorch's timm encoders): read `feature_info`, build a neck from its
    channels, run it on the list of maps."""
    info = model.feature_info
    fpn = torchvision.ops.FeaturePyramidNetwork(info.channels(), out_channels=32)
    maps = model(x)
    pyramid = fpn(OrderedDict((str(i), m) for i, m in enumerate(maps)))
    return {
        "channels": info.channels(),
        "reduction": info.reduction(),
        "dicts": info.get_dicts(keys=["num_chs", "reduction"]),
        "maps": [tuple(m.shape) for m in maps],
        "pyramid": [tuple(p.shape) for p in pyramid.values()],
    }


def _materialize(model: nn.Module) -> nn.Module:
    """A model built on the meta device, with random weights and unit norm statistics.

    Only shapes are compared, and timm's VGG would otherwise draw a 100M-parameter head
    that its feature extractor drops."""
    model.to_empty(device="cpu")
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.05)
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.reset_running_stats()
    return model.eval()


@pytest.mark.parametrize(
    ("name", "out_indices", "out_features"),
    [
        ("resnet50", (2, 3, 4), ("C3", "C4", "C5")),
        ("vgg16", (1, 2, 3, 4, 5), ("C1", "C2", "C3", "C4", "C5")),  # timm's 0 is stride 1
        ("densenet121", (0, 1, 2, 3, 4), ("C1", "C2", "C3", "C4", "C5")),
        ("convnext_tiny", (1, 2, 3), ("C3", "C4", "C5")),
    ],
)
def test_timm_consumer_takes_ours(name: str, out_indices: tuple, out_features: tuple) -> None:
    with torch.device("meta"):
        theirs = timm.create_model(name, features_only=True, out_indices=out_indices)
        ours = FeatureList(create(name, out_features=out_features))
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        expected = _consumer(_materialize(theirs), x)
        got = _consumer(_materialize(ours), x)
    assert got == expected
    if name == "vgg16":  # conv2_2, conv3_3, conv4_3, conv5_3 (+ ReLU), pool5
        assert got["channels"] == [128, 256, 512, 512, 512]


def test_answers_equal_timms_for_every_index_form() -> None:
    with torch.device("meta"):
        theirs = timm.create_model("resnet50", features_only=True).feature_info  # C1..C5
        ours = create("resnet50", out_features=("C1", "C2", "C3", "C4", "C5")).feature_info
    for idx in (None, 0, 3, -1, [1, 4], (0, 2)):
        assert ours.channels(idx) == theirs.channels(idx), idx
        assert ours.reduction(idx) == theirs.reduction(idx), idx
        assert ours.get_dicts(["num_chs", "reduction"], idx) == theirs.get_dicts(
            ["num_chs", "reduction"], idx
        )
    assert ours.get_dicts(idx=2) == {
        "num_chs": 512,
        "reduction": 8,
        "module": "stages.1",
        "name": "C3",
    }
    assert ours[2]["num_chs"] == theirs[2]["num_chs"] and ours[2] == FeatureInfo("C3", 512, 8)
    assert ours.module_name() == ["stem", "stages.0", "stages.1", "stages.2", "stages.3"]
    with pytest.raises(KeyError, match=r"no \['stage'\]; its keys are \['num_chs', 'reduction', "):
        ours.get_dicts(keys=["stage"])
    with pytest.raises(KeyError, match=r"FeatureInfo has no 'index'; its keys are \['num_chs'"):
        ours[0]["index"]


def test_feature_info_describes_what_forward_returns() -> None:
    # mobilenet_v3_small records C5 twice (last block, then the 1x1 head conv, which replaces
    # it); out of order, C3 still comes first, as forward returns it. Every registered
    # backbone's channels() and reduction() are checked against its outputs in test_levels.
    model = create("mobilenet_v3_small", out_features=("C5", "C3"))
    maps = FeatureList(model)(torch.randn(2, 3, 64, 64))
    info = model.feature_info
    assert isinstance(info, FeatureInfoList) and all(isinstance(f, FeatureInfo) for f in info)
    assert info == [
        FeatureInfo("C1", 16, 2),
        FeatureInfo("C2", 16, 4),
        FeatureInfo("C3", 24, 8),
        FeatureInfo("C4", 48, 16),
        FeatureInfo("C5", 576, 32),
    ]
    assert info.channels() == [24, 576] == [m.shape[1] for m in maps]
    assert info.reduction() == [8, 32] == [64 // m.shape[-1] for m in maps]
    assert [d["name"] for d in info.get_dicts()] == ["C3", "C5"]
    assert info.channels(0) == 16 and info.reduction(-1) == 32


def test_feature_list_wraps_only_backbones() -> None:
    with pytest.raises(TypeError, match=r"wraps a backbones\.Backbone.* got Conv2d"):
        FeatureList(nn.Conv2d(3, 8, 3))

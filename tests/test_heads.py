"""Classification head: options and the reference classifiers it rebuilds."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from heads import ClassificationHead, build_classifier

from .conftest import num_params


def test_rebuilds_a_torchvision_mlp_classifier() -> None:
    # MobileNetV3's classifier: pool, linear 960->1280, hardswish, dropout, linear.
    reference = torchvision.models.mobilenet_v3_large(num_classes=10)
    head = ClassificationHead(960, 10, hidden_channels=(1280,), act_layer=nn.Hardswish, dropout=0.2)
    head.load_state_dict(
        {
            "hidden.0.linear.weight": reference.classifier[0].weight,
            "hidden.0.linear.bias": reference.classifier[0].bias,
            "fc.weight": reference.classifier[3].weight,
            "fc.bias": reference.classifier[3].bias,
        }
    )
    x = torch.randn(4, 960, 7, 7)

    def reference_head(x: torch.Tensor) -> torch.Tensor:
        return reference.classifier(torch.flatten(reference.avgpool(x), 1))

    for train in (False, True):  # train: same dropout masks from the same seed
        head.train(train), reference.train(train)
        torch.manual_seed(0)
        ours = head(x)
        torch.manual_seed(0)
        torch.testing.assert_close(ours, reference_head(x))


def test_pool_size_and_max_pool() -> None:
    head = ClassificationHead(8, 3, pool="max", pool_size=2)
    x = torch.randn(2, 8, 6, 6)
    expected = head.fc(torch.nn.functional.adaptive_max_pool2d(x, 2).flatten(1))
    torch.testing.assert_close(head(x), expected)
    assert head.fc.in_features == 8 * 2 * 2


def test_head_rejects_bad_options() -> None:
    with pytest.raises(ValueError, match=r"pool must be one of \['avg', 'max'\], got 'mean'"):
        ClassificationHead(8, 3, pool="mean")
    with pytest.raises(ValueError, match="num_classes must be positive, got 0"):
        ClassificationHead(8, 0)


def test_build_classifier() -> None:
    model = build_classifier("resnet18", num_classes=7)
    assert model.backbone.out_features == ("C5",)
    assert model(torch.randn(2, 3, 64, 64)).shape == (2, 7)
    assert num_params(model) == num_params(torchvision.models.resnet18(num_classes=7))

"""Classification head: options, the reference classifiers it rebuilds, `build_classifier`."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from backbones import create
from backbones.layers import LayerNorm2d
from heads import ClassificationHead, Classifier, build_classifier

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
    with pytest.raises(
        ValueError,
        match=r"pool must be one of \['avg', 'max', 'avgmax', 'catavgmax'\], got 'mean'",
    ):
        ClassificationHead(8, 3, pool="mean")
    with pytest.raises(ValueError, match="num_classes must be positive, got 0"):
        ClassificationHead(8, 0)


def test_build_classifier() -> None:
    model = build_classifier("resnet18", num_classes=7)
    assert model.backbone.out_features == ("C5",)
    assert model(torch.randn(2, 3, 64, 64)).shape == (2, 7)
    assert num_params(model) == num_params(torchvision.models.resnet18(num_classes=7))


def test_build_classifier_on_a_built_backbone() -> None:
    """The head `options` describe, not the family's reference: on the one level, or on all."""
    single = build_classifier(create("vgg11_bn", out_features=("C5",)), num_classes=5, dropout=0.1)
    # VGG's reference head would pool to 7x7 and have a 4096-4096 MLP
    assert single.head.fc.in_features == 512 and len(single.head.hidden) == 0
    assert single.head.levels is None and single.head.drop.p == 0.1

    backbone = create("resnet18", out_features=("C4", "C5"))
    multi = build_classifier(backbone, num_classes=5, pool="catavgmax")
    assert multi.backbone is backbone and multi.head.levels == ("C4", "C5")
    assert multi.head.fc.in_features == 2 * (256 + 512)
    by_hand = Classifier(backbone, ClassificationHead(backbone.channels, 5, pool="catavgmax"))
    by_hand.load_state_dict(multi.state_dict())
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(multi.eval()(x), by_hand.eval()(x))

    with pytest.raises(
        ValueError, match=r"pretrained= loads weights into a backbone built by name"
    ):
        build_classifier(backbone, num_classes=5, pretrained="torchvision")
    with pytest.raises(TypeError, match="a registered name or a Backbone, got Linear"):
        build_classifier(nn.Linear(2, 2), num_classes=5)


@pytest.mark.parametrize("pool_size", [1, 2])
def test_avgmax_pools(pool_size: int) -> None:
    x = torch.randn(2, 8, 7, 5)
    avg, peak = F.adaptive_avg_pool2d(x, pool_size), F.adaptive_max_pool2d(x, pool_size)
    mean_head = ClassificationHead(8, 3, pool="avgmax", pool_size=pool_size)
    torch.testing.assert_close(mean_head(x), mean_head.fc(((avg + peak) / 2).flatten(1)))
    cat_head = ClassificationHead(8, 3, pool="catavgmax", pool_size=pool_size)
    assert cat_head.fc.in_features == 2 * 8 * pool_size**2
    torch.testing.assert_close(cat_head(x), cat_head.fc(torch.cat((avg, peak), 1).flatten(1)))


def test_multi_scale_pooling_concatenates_levels() -> None:
    levels = {"C3": 8, "C4": 16, "C5": 32}
    features = {
        name: torch.randn(2, c, 12 // i, 10 // i) for i, (name, c) in enumerate(levels.items(), 1)
    }
    head = ClassificationHead(
        levels, 4, pool="catavgmax", norm_layer=LayerNorm2d, hidden_channels=(20,)
    )
    assert head.levels == ("C3", "C4", "C5") and head.norm.normalized_shape == (2 * 56,)
    pooled = torch.cat(
        [torch.cat((f.mean((2, 3)), f.amax((2, 3))), 1) for f in features.values()], 1
    )  # (B, 2 * 56): C3, C4, C5 in order, each avg then max
    expected = head.fc(head.hidden(head.norm(pooled[..., None, None]).flatten(1)))
    torch.testing.assert_close(head({"C2": torch.randn(2, 4, 24, 20), **features}), expected)
    assert ClassificationHead(8, 3).levels is None


def test_classifier_feeds_what_the_head_needs() -> None:
    backbone = create("resnet18", out_features=("C4", "C5"))
    x = torch.randn(2, 3, 64, 64)
    multi = Classifier(backbone, ClassificationHead(backbone.channels, 5, pool="avgmax"))
    assert multi(x).shape == (2, 5)
    single = Classifier(backbone, ClassificationHead(512, 5))
    assert single.level == "C5" and single(x).shape == (2, 5)
    with pytest.raises(
        ValueError,
        match=r"head was built for levels \{C3: 128, C4: 256\} .* backbone returns "
        r"\{C4: 256, C5: 512\}",
    ):
        Classifier(backbone, ClassificationHead({"C3": 128, "C4": 256}, 5))
    with pytest.raises(ValueError, match=r"built for 2048 channels but .* C5 has 512"):
        Classifier(backbone, ClassificationHead(2048, 5))


def test_head_rejects_bad_input() -> None:
    head = ClassificationHead(8, 3)
    with pytest.raises(
        ValueError, match=r"built for one \(batch, 8, height, width\) map, got shape \(2, 4, 3, 3\)"
    ):
        head(torch.randn(2, 4, 3, 3))
    with pytest.raises(ValueError, match=r"got dict \['C5'\]. Pass one level"):
        head({"C5": torch.randn(2, 8, 3, 3)})
    multi = ClassificationHead({"C4": 4, "C5": 8}, 3)
    with pytest.raises(ValueError, match=r"\{C4: 4, C5: 8\} .* but got \{C5: 8\}: missing C4"):
        multi({"C5": torch.randn(2, 8, 3, 3)})
    with pytest.raises(ValueError, match="non-empty dict of levels to positive channel counts"):
        ClassificationHead({}, 3)

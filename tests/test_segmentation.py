"""Semantic FPN head: the paper's stage layout, exact output sizes, GroupNorm widths, bad input."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from backbones import create
from backbones.layers import ConvNormAct, GroupNorm
from heads import FPN, Segmenter, SemanticFPNHead


def _pyramid(levels: dict[str, int], size: tuple[int, int], batch: int = 2) -> dict:
    return {
        name: torch.randn(
            batch,
            channels,
            math.ceil(size[0] / 2 ** int(name[1:])),
            math.ceil(size[1] / 2 ** int(name[1:])),
        )
        for name, channels in levels.items()
    }


@pytest.mark.parametrize(
    ("channels", "groups"), [(128, 32), (256, 32), (48, 24), (40, 20), (37, 1), (8, 8)]
)
def test_group_norm_picks_a_dividing_group_count(channels: int, groups: int) -> None:
    norm = GroupNorm(channels)
    assert (norm.num_groups, norm.num_channels) == (groups, channels)
    assert GroupNorm(channels, max_groups=4).num_groups == max(
        g for g in (1, 2, 3, 4) if channels % g == 0
    )
    x = torch.randn(2, channels, 3, 3)
    torch.testing.assert_close(norm(x), F.group_norm(x, groups, norm.weight, norm.bias))


def test_stages_follow_the_paper() -> None:
    # P2: one conv, no upsampling; P3: 1 conv + up; P4: 2; P5: 3 (Kirillov et al. 2019, Fig. 3)
    head = SemanticFPNHead(dict.fromkeys(["P2", "P3", "P4", "P5"], 64), num_classes=5)
    assert {name: len(stage) for name, stage in head.stages.items()} == {
        "P2": 1,
        "P3": 1,
        "P4": 2,
        "P5": 3,
    }
    conv = head.stages["P5"][0]
    assert isinstance(conv, ConvNormAct) and conv.conv.kernel_size == (3, 3)
    assert isinstance(conv.norm, nn.GroupNorm) and conv.norm.num_groups == 32
    assert head.classifier.kernel_size == (1, 1) and head.classifier.out_channels == 5


def test_matches_a_hand_computed_branch() -> None:
    torch.manual_seed(0)
    head = SemanticFPNHead({"P3": 8, "P4": 8}, num_classes=3, head_channels=16).eval()
    nn.init.normal_(head.classifier.weight)  # not the near-zero init: a real comparison
    p3, p4 = torch.randn(1, 8, 13, 17), torch.randn(1, 8, 7, 9)
    up4 = F.interpolate(head.stages["P4"][0](p4), size=(13, 17), mode="bilinear")
    expected = head.classifier(head.stages["P3"][0](p3) + up4)
    expected = F.interpolate(expected, size=(101, 135), mode="bilinear")
    torch.testing.assert_close(head({"P3": p3, "P4": p4}, size=(101, 135)), expected)


@pytest.mark.parametrize("size", [(224, 224), (225, 289), (97, 33)])
def test_logits_at_exact_size_for_any_input(size: tuple[int, int]) -> None:
    levels = dict.fromkeys(["P2", "P3", "P4", "P5"], 16)
    head = SemanticFPNHead(levels, num_classes=4, head_channels=24, dropout=0.1)
    logits = head(_pyramid(levels, size), size=size)
    assert logits.shape == (2, 4, *size) and torch.isfinite(logits).all()


def test_options_and_init() -> None:
    head = SemanticFPNHead({"C3": 40, "C4": 80}, num_classes=2, norm_layer=nn.BatchNorm2d)
    assert isinstance(head.stages["C3"][0].norm, nn.BatchNorm2d)  # C levels: straight on a backbone
    assert head.stages["C3"][0].conv.in_channels == 40
    assert head.classifier.weight.std() < 0.01 and not head.classifier.bias.any()
    no_norm = SemanticFPNHead({"P4": 8}, 2, head_channels=8, norm_layer=None)
    assert no_norm.stages["P4"][0].conv.bias is not None


def test_segmenter_uses_the_backbone_levels() -> None:
    model = Segmenter(create("resnet18"), num_classes=3, fpn_channels=32, head_channels=16)
    assert model.neck.in_channels == model.backbone.channels  # default C3..C5
    assert list(model.head.in_channels) == ["P3", "P4", "P5"]
    assert isinstance(model.neck, FPN) and model.neck.extra is None
    assert model(torch.randn(1, 3, 75, 61)).shape == (1, 3, 75, 61)
    with pytest.raises(ValueError, match=r"consecutive levels.*C2 \(stride 4\), C4 \(stride 16\)"):
        Segmenter(create("resnet18", out_features=("C2", "C4")), num_classes=3)


def test_bad_input() -> None:
    with pytest.raises(ValueError, match=r"consecutive levels.*P2 \(stride 4\), P4 \(stride 16\)"):
        SemanticFPNHead({"P2": 8, "P4": 8}, 3)
    with pytest.raises(ValueError, match=r"same letter.*\['C3', 'P4'\]"):
        SemanticFPNHead({"C3": 8, "P4": 8}, 3)
    with pytest.raises(ValueError, match="num_classes must be positive, got 0"):
        SemanticFPNHead({"P3": 8}, 0)
    head = SemanticFPNHead({"P3": 8, "P4": 8, "P5": 8}, 3, head_channels=8)
    features = _pyramid({"P3": 8, "P4": 8, "P5": 8}, (64, 64))
    with pytest.raises(
        ValueError,
        match=r"SemanticFPNHead was built for levels \{P3: 8, P4: 8, P5: 8\} \(name: channels\) "
        r"but got \{P4: 8, P5: 8\}: missing P3",
    ):
        head({"P4": features["P4"], "P5": features["P5"]}, size=(64, 64))
    with pytest.raises(ValueError, match=r"P4 has 16 channels"):
        head({**features, "P4": torch.randn(2, 16, 4, 4)}, size=(64, 64))

"""Shared layers: the numerics later families rely on."""

from __future__ import annotations

import math
from functools import partial

import pytest
import torch
from torch import nn
from torchvision.models.convnext import LayerNorm2d as TorchvisionLayerNorm2d
from torchvision.models.mobilenetv2 import InvertedResidual as TorchvisionInvertedResidual
from torchvision.models.mobilenetv3 import InvertedResidual as TorchvisionV3InvertedResidual
from torchvision.models.mobilenetv3 import InvertedResidualConfig

from backbones.layers import (
    ConvNormAct,
    DropPath,
    InvertedResidual,
    LayerNorm2d,
    SqueezeExcite,
    drop_path_rates,
    make_divisible,
)

from .conftest import randomize_norms


@pytest.mark.parametrize(
    ("value", "expected"),
    [(32 * 0.35, 16), (16 * 0.5, 8), (24 * 1.4, 32), (96 * 0.75, 72), (1280 * 1.4, 1792), (3.0, 8)],
)
def test_make_divisible(value: float, expected: int) -> None:
    assert make_divisible(value) == expected
    assert make_divisible(value) % 8 == 0 and make_divisible(value) >= 0.9 * value


@pytest.mark.parametrize("kernel_size", [1, 3, 5, 7])
@pytest.mark.parametrize("stride", [1, 2])
def test_conv_norm_act_keeps_ceil_size(kernel_size: int, stride: int) -> None:
    layer = ConvNormAct(3, 8, kernel_size, stride)
    out = layer(torch.randn(1, 3, 33, 20))
    assert out.shape == (1, 8, math.ceil(33 / stride), math.ceil(20 / stride))
    assert layer.conv.bias is None and isinstance(layer.norm, nn.BatchNorm2d)
    assert (out >= 0).all()  # ReLU


def test_conv_norm_act_without_norm_has_bias() -> None:
    layer = ConvNormAct(4, 4, 3, groups=4, norm_layer=None, act_layer=None)
    assert layer.conv.bias is not None and layer.conv.groups == 4
    assert isinstance(layer.norm, nn.Identity) and isinstance(layer.act, nn.Identity)


def test_squeeze_excite_scales_channels() -> None:
    se = SqueezeExcite(8, 2)
    x = torch.randn(2, 8, 5, 5)
    scale = torch.sigmoid(se.fc2(torch.relu(se.fc1(x.mean((2, 3), keepdim=True)))))
    torch.testing.assert_close(se(x), x * scale)


def test_drop_path() -> None:
    x = torch.ones(4000, 3, 2, 2)
    layer = DropPath(0.25)
    assert torch.equal(layer.eval()(x), x)
    out = layer.train()(x)
    per_sample = out.flatten(1)
    dropped = (per_sample == 0).all(1)
    assert torch.all(per_sample[~dropped] == 1 / 0.75)  # survivors rescaled, whole samples dropped
    assert abs(dropped.float().mean().item() - 0.25) < 0.03
    with pytest.raises(ValueError, match=r"DropPath probability must be in \[0, 1\), got 1.0"):
        DropPath(1.0)


def test_drop_path_rates_are_linear() -> None:
    rates = drop_path_rates(0.3, (1, 2, 1))
    assert [len(r) for r in rates] == [1, 2, 1]
    assert [r for stage in rates for r in stage] == pytest.approx([0.0, 0.1, 0.2, 0.3])
    assert drop_path_rates(0.0, (2,)) == [[0.0, 0.0]]
    with pytest.raises(ValueError, match=r"drop_path_rate must be in \[0, 1\), got -0.1"):
        drop_path_rates(-0.1, (2,))
    # EfficientNet's convention: block i of n gets rate * i / n
    rates = drop_path_rates(0.2, (2, 2), endpoint=False)
    assert [r for stage in rates for r in stage] == pytest.approx([0.0, 0.05, 0.1, 0.15])


def load_in_order(ours: nn.Module, reference: nn.Module) -> None:
    """Copy `reference`'s (randomised) tensors into `ours`, which registers the same tensors in
    the same order under other names; the shapes are checked pair by pair."""
    theirs = list(randomize_norms(reference).state_dict().values())
    keys = list(ours.state_dict())
    assert [ours.state_dict()[k].shape for k in keys] == [t.shape for t in theirs]
    ours.load_state_dict(dict(zip(keys, theirs, strict=True)))


def test_inverted_residual_without_expansion_is_torchvisions() -> None:
    """MobileNetV2's block with expand ratio 1: depthwise + linear projection + identity."""
    torch.manual_seed(0)
    reference = TorchvisionInvertedResidual(16, 16, stride=1, expand_ratio=1).eval()
    block = InvertedResidual(16, 16, expanded_channels=16, act_layer=nn.ReLU6).eval()
    assert isinstance(block.expand, nn.Identity) and block.has_shortcut
    load_in_order(block, reference)
    x = torch.randn(2, 16, 8, 8)
    before = x.clone()
    torch.testing.assert_close(block(x), reference(x), rtol=1e-5, atol=1e-6)
    assert torch.equal(x, before), "the in-place residual add must not touch the input"


def test_inverted_residual_with_expansion_and_squeeze_excite_is_torchvisions() -> None:
    """MobileNetV3's block: expand, 5x5 depthwise at stride 2, squeeze-excite, Hardswish."""
    torch.manual_seed(0)
    config = InvertedResidualConfig(16, 5, 96, 24, True, "HS", 2, 1, 1.0)
    reference = TorchvisionV3InvertedResidual(config, nn.BatchNorm2d).eval()
    se_layer = partial(SqueezeExcite, squeeze_channels=24, gate_layer=nn.Hardsigmoid)
    block = InvertedResidual(
        16, 24, 96, kernel_size=5, stride=2, act_layer=nn.Hardswish, se_layer=se_layer
    ).eval()
    assert not block.has_shortcut
    load_in_order(block, reference)
    x = torch.randn(2, 16, 9, 9)
    expected = reference(x)
    assert expected.shape == (2, 24, 5, 5)
    torch.testing.assert_close(block(x), expected, rtol=1e-5, atol=1e-6)


def test_layer_norm_2d_matches_torchvision() -> None:
    ours, reference = LayerNorm2d(16, eps=1e-6), TorchvisionLayerNorm2d(16, eps=1e-6)
    with torch.no_grad():
        ours.weight.normal_(), ours.bias.normal_()
    reference.load_state_dict(ours.state_dict())
    x = torch.randn(2, 16, 7, 5)
    torch.testing.assert_close(ours(x), reference(x))

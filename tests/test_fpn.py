"""FPN: exact parity with torchvision's FeaturePyramidNetwork, odd sizes, and bad input."""

from __future__ import annotations

import math
from functools import partial

import pytest
import torch
from torch import nn
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool, LastLevelP6P7

from backbones.layers import GroupNorm
from heads import FPN

from .conftest import max_rel_error, randomize_norms

IN_CHANNELS = {"C2": 16, "C3": 24, "C4": 40, "C5": 48}
OUT = 32


def _features(in_channels: dict[str, int], size: tuple[int, int] = (97, 131)) -> dict:
    # a backbone's ceil(H / stride) sizes for an image that is not a multiple of 32
    generator = torch.Generator().manual_seed(1)
    return {
        name: torch.randn(
            2,
            channels,
            math.ceil(size[0] / 2 ** int(name[1:])),
            math.ceil(size[1] / 2 ** int(name[1:])),
            generator=generator,
        )
        for name, channels in in_channels.items()
    }


def _randomize_biases(model: nn.Module) -> nn.Module:
    # torchvision zeroes the conv biases: a wrongly mapped bias would pass unnoticed
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Conv2d) and module.bias is not None:
                module.bias.uniform_(-0.5, 0.5)
    return model


EXTRA_VARIANTS = {
    "none": lambda: None,
    "maxpool": LastLevelMaxPool,
    "p6p7_from_C5": lambda: LastLevelP6P7(IN_CHANNELS["C5"], OUT),
    "p6p7_from_P5": lambda: LastLevelP6P7(OUT, OUT),
}


@pytest.mark.parametrize("extra", list(EXTRA_VARIANTS))
@pytest.mark.parametrize("norm", ["none", "batchnorm", "groupnorm"])
def test_parity_with_torchvision(extra: str, norm: str) -> None:
    torch.manual_seed(0)
    norm_layer = {"none": None, "batchnorm": nn.BatchNorm2d, "groupnorm": partial(nn.GroupNorm, 8)}
    reference = FeaturePyramidNetwork(
        list(IN_CHANNELS.values()),
        OUT,
        extra_blocks=EXTRA_VARIANTS[extra](),
        norm_layer=norm_layer[norm],
    )
    reference = randomize_norms(_randomize_biases(reference)).eval()
    ours = FPN.from_torchvision(reference)
    assert ours.in_channels == IN_CHANNELS and not ours.training
    expected_extra = {"none": None, "maxpool": "MaxPoolLevel"}.get(extra, "P6P7")
    assert (type(ours.extra).__name__ if ours.extra else None) == expected_extra
    if extra.startswith("p6p7"):
        assert ours.extra.from_output == extra.endswith("P5")

    features = _features(IN_CHANNELS)
    with torch.no_grad():
        expected = reference(dict(zip("0123", features.values(), strict=True)))
        actual = ours(features)
    extra_levels = {"none": [], "maxpool": ["P6"]}.get(extra, ["P6", "P7"])
    levels = ["P2", "P3", "P4", "P5", *extra_levels]
    assert list(actual) == levels
    for (level, out), ref in zip(actual.items(), expected.values(), strict=True):
        assert out.shape == ref.shape, level
        assert max_rel_error(out, ref) <= 1e-6, level


def test_from_torchvision_level_names_and_rejects() -> None:
    reference = FeaturePyramidNetwork([8, 16, 32], 16)
    assert list(FPN.from_torchvision(reference).in_channels) == ["C3", "C4", "C5"]
    named = FPN.from_torchvision(reference, levels=["C2", "C3", "C4"])
    assert named.in_channels == {"C2": 8, "C3": 16, "C4": 32}
    assert named.levels == ("P2", "P3", "P4")
    with pytest.raises(ValueError, match=r"has 3 input levels; got 2 names \['C4', 'C5'\]"):
        FPN.from_torchvision(reference, levels=["C4", "C5"])
    with pytest.raises(
        TypeError, match=r"takes a torchvision\.ops\.FeaturePyramidNetwork, got FPN"
    ):
        FPN.from_torchvision(named)


@pytest.mark.parametrize(
    ("extra", "extra_levels"), [(None, []), ("maxpool", ["P6"]), ("p6p7", ["P6", "P7"])]
)
@pytest.mark.parametrize("p6p7_from", ["P", "C"])
def test_levels_and_sizes(extra: str | None, extra_levels: list[str], p6p7_from: str) -> None:
    in_channels = {"C3": 24, "C4": 40, "C5": 48}
    fpn = FPN(in_channels, OUT, extra_blocks=extra, p6p7_from=p6p7_from)
    levels = ["P3", "P4", "P5", *extra_levels]
    assert fpn.out_channels == OUT
    assert fpn.levels == ("P3", "P4", "P5") and fpn.extra_levels == tuple(extra_levels)
    assert fpn.channels == dict.fromkeys(levels, OUT)
    assert fpn.strides == {level: 2 ** int(level[1:]) for level in levels}
    size = (225, 289)  # C5 is 8x10: P6 and P7 round up to 4x5 and 2x3
    features = _features({"C2": 16, **in_channels}, size)  # C2 is not an input: ignored
    outputs = fpn(features)
    assert list(outputs) == levels
    for level, out in outputs.items():
        stride = fpn.strides[level]
        assert out.shape == (2, OUT, math.ceil(size[0] / stride), math.ceil(size[1] / stride))


def test_any_consecutive_levels_from_c1() -> None:
    fpn = FPN({"C1": 8, "C2": 16}, OUT, extra_blocks="maxpool")
    assert fpn.strides == {"P1": 2, "P2": 4, "P3": 8}
    outputs = fpn(_features({"C1": 8, "C2": 16}, (33, 47)))
    assert {k: tuple(v.shape[-2:]) for k, v in outputs.items()} == {
        "P1": (17, 24),
        "P2": (9, 12),
        "P3": (5, 6),
    }


def test_norm_layer_drops_the_conv_bias() -> None:
    fpn = FPN({"C4": 40, "C5": 48}, 48, norm_layer=GroupNorm)
    assert fpn.lateral_convs["C4"].conv.bias is None
    assert isinstance(fpn.output_convs["P5"].norm, nn.GroupNorm)
    assert FPN({"C5": 48}).output_convs["P5"].conv.bias is not None


def test_single_level_and_gradients() -> None:
    fpn = FPN({"C5": 48}, OUT, extra_blocks="p6p7", p6p7_from="C")
    feature = torch.randn(1, 48, 5, 7, requires_grad=True)
    outputs = fpn({"C5": feature})
    assert [tuple(o.shape[-2:]) for o in outputs.values()] == [(5, 7), (3, 4), (2, 2)]
    sum(o.sum() for o in outputs.values()).backward()
    assert all(p.grad is not None for p in fpn.parameters())
    assert feature.grad.abs().sum() > 0


def test_bad_construction() -> None:
    with pytest.raises(ValueError, match=r"consecutive levels.*C3 \(stride 8\), C5 \(stride 32\)"):
        FPN({"C3": 8, "C5": 16})
    with pytest.raises(ValueError, match=r"consecutive levels.*C5 \(stride 32\), C4 \(stride 16\)"):
        FPN({"C5": 8, "C4": 16})  # coarse to fine
    with pytest.raises(ValueError, match=r"levels named C<k>.*\['P3', 'P4'\]"):
        FPN({"P3": 8, "P4": 16})
    with pytest.raises(ValueError, match="non-empty dict of levels to channels"):
        FPN([8, 16])
    with pytest.raises(ValueError, match="positive int channel counts"):
        FPN({"C4": 0, "C5": 16})
    with pytest.raises(
        ValueError, match=r"extra_blocks must be one of \(None, 'maxpool', 'p6p7'\)"
    ):
        FPN({"C5": 8}, extra_blocks="p6")
    with pytest.raises(ValueError, match="p6p7_from must be 'P'"):
        FPN({"C5": 8}, extra_blocks="p6p7", p6p7_from="C5")


def test_bad_features() -> None:
    fpn = FPN({"C3": 8, "C4": 16, "C5": 32}, OUT)
    features = _features({"C3": 8, "C4": 16, "C5": 32})
    with pytest.raises(
        ValueError,
        match=r"built for levels \{C3: 8, C4: 16, C5: 32\} .* but got \{C4: 16, C5: 32\}: "
        r"missing C3\.",
    ):
        fpn({"C4": features["C4"], "C5": features["C5"]})
    with pytest.raises(
        ValueError, match=r"but got \{C3: 8, C4: 16, C5: 64\}: C5 has 64 channels\."
    ):
        fpn({**features, "C5": torch.randn(2, 64, 4, 5)})
    with pytest.raises(ValueError, match="takes a dict of feature maps"):
        fpn(features["C5"])

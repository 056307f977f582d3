"""Each backbone's Ck is its reference network's: the last module's output at stride 2**k.

The reference levels come from walking torchvision's network itself (not from our module
list), on random weights and norm statistics converted with `backbones.convert`, eval mode.
"""

from __future__ import annotations

import math

import pytest
import torch
import torchvision
from torch import nn
from torchvision import models as tvm

from backbones import convert, create, get_entry, list_backbones
from backbones.weights import backbone_part

from .conftest import max_rel_error, randomize_weights

SIZE = 64  # C5 is 2x2: the smallest power of two at which every level has more than one pixel
TOLERANCE = 1e-5
# 1-2 s of one core each (drawing their weights, mostly); the others take 0.1-1 s.
HEAVY = {"convnext_large", "wide_resnet101_2", "efficientnet_b7", "efficientnet_b6", "resnet152"}


def _walk(model: nn.Module) -> list[nn.Module]:
    """The modules torchvision's `forward` runs one after another, up to the global pool."""
    if isinstance(model, tvm.ResNet):
        stem = [model.conv1, model.bn1, model.relu, model.maxpool]
        return [*stem, model.layer1, model.layer2, model.layer3, model.layer4]
    if isinstance(model, tvm.DenseNet):
        return [*model.features, nn.ReLU()]  # its forward applies the last ReLU functionally
    if isinstance(model, tvm.VGG | tvm.MobileNetV2 | tvm.MobileNetV3 | tvm.EfficientNet):
        return list(model.features)  # then the global pool and the classifier
    if isinstance(model, tvm.ConvNeXt):
        return list(model.features)  # its final LayerNorm is in `classifier`, after the pool
    raise AssertionError(f"no reference walk for torchvision's {type(model).__name__}: add one")


@torch.no_grad()
def _random_reference(name: str) -> tuple[nn.Module, list[nn.Module]]:
    """torchvision's network with random weights and norm statistics in the modules walked.

    It is built on the meta device and only the walked modules get memory, so that VGG's
    100M-parameter classifier, which no level depends on, costs nothing.
    """
    with torch.device("meta"):
        reference = torchvision.models.get_model(get_entry(name).sources["torchvision"])
    walk = _walk(reference)
    for module in walk:
        module.to_empty(device="cpu")
        for buffer in module.buffers():
            buffer.zero_()
    randomize_weights(nn.ModuleList(walk))
    return reference.eval(), walk


def _reference_levels(walk: list[nn.Module], x: torch.Tensor) -> dict[str, torch.Tensor]:
    """`Ck` = the output of the last walked module whose output has stride 2**k, k in 1..5."""
    levels = {}
    for module in walk:
        x = module(x)
        stride = SIZE // x.shape[-1]
        k = int(math.log2(stride))
        assert x.shape[-2:] == (SIZE // 2**k, SIZE // 2**k), type(module).__name__
        if 1 <= k <= 5:
            levels[f"C{k}"] = x.clone()  # a later in-place op (ReLU) must not change it
    return levels


@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=pytest.mark.slow) if n in HEAVY else n for n in list_backbones()]
)
def test_levels_are_the_reference_networks(name: str) -> None:
    if "torchvision" not in get_entry(name).sources:
        pytest.fail(f"{name} has no torchvision counterpart: give the test its reference walk")
    reference, walk = _random_reference(name)
    x = torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = _reference_levels(walk, x)
    with torch.device("meta"):
        ours = create(name, out_features=tuple(expected))
    assert [f.name for f in ours.feature_info] == list(expected), "levels at other strides"
    backbone = backbone_part(convert(name, reference.state_dict()))
    ours.load_state_dict(backbone, assign=True)  # strict: every key of ours, real tensors
    with torch.no_grad():
        got = ours.eval()(x)
    # what code written for timm reads (`heads.FeatureList` returns the maps as a list)
    assert ours.feature_info.channels() == [t.shape[1] for t in got.values()]
    assert ours.feature_info.reduction() == [SIZE // t.shape[-1] for t in got.values()]
    for level, want in expected.items():
        assert got[level].shape == want.shape, level
        assert max_rel_error(got[level], want) <= TOLERANCE, level
        # The two images give different maps, so a wrong module would not pass unnoticed.
        assert max_rel_error(want[0], want[1]) > 1e3 * TOLERANCE, level

"""Exact parity with torchvision and timm: random reference weights, converted, same logits."""

from __future__ import annotations

import pytest
import timm
import torch
import torchvision

from backbones import convert, get_entry, list_backbones
from heads import build_classifier

from .conftest import (
    assert_same_train_step,
    match_timm_dropout,
    max_rel_error,
    num_params,
    randomize_norms,
)

# torchvision's published parameter counts (its model docs), as an independent check.
PUBLISHED_PARAMS = {
    "resnet18": 11_689_512,
    "resnet34": 21_797_672,
    "resnet50": 25_557_032,
    "resnet101": 44_549_160,
    "resnet152": 60_192_808,
    "resnext50_32x4d": 25_028_904,
    "resnext101_32x8d": 88_791_336,
    "resnext101_64x4d": 83_455_272,
    "wide_resnet50_2": 68_883_240,
    "wide_resnet101_2": 126_886_696,
    "vgg11": 132_863_336,
    "vgg11_bn": 132_868_840,
    "vgg13": 133_047_848,
    "vgg13_bn": 133_053_736,
    "vgg16": 138_357_544,
    "vgg16_bn": 138_365_992,
    "vgg19": 143_667_240,
    "vgg19_bn": 143_678_248,
    "densenet121": 7_978_856,
    "densenet161": 28_681_000,
    "densenet169": 14_149_480,
    "densenet201": 20_013_928,
    "convnext_tiny": 28_589_128,
    "convnext_small": 50_223_688,
    "convnext_base": 88_591_464,
    "convnext_large": 197_767_336,
    "mobilenet_v2": 3_504_872,
    "mobilenet_v3_large": 5_483_032,
    "mobilenet_v3_small": 2_542_856,
    "efficientnet_b0": 5_288_548,
    "efficientnet_b1": 7_794_184,
    "efficientnet_b2": 9_109_994,
    "efficientnet_b3": 12_233_232,
    "efficientnet_b4": 19_341_616,
    "efficientnet_b5": 30_389_784,
    "efficientnet_b6": 43_040_704,
    "efficientnet_b7": 66_347_960,
}

# Reference constructor arguments other than the library's defaults: torchvision's ConvNeXt
# and EfficientNet drop residual branches in train mode by default (stochastic depth), which
# the SGD step below could not replay; ours default to none. Stochastic depth is compared on
# its own in tests/test_convnext.py and tests/test_parity_mobile.py.
REFERENCE_KWARGS = {
    ("torchvision", name): {"stochastic_depth_prob": 0.0}
    for name in (
        *(f"convnext_{size}" for size in ("tiny", "small", "base", "large")),
        *(f"efficientnet_b{i}" for i in range(8)),
    )
}


def names_from(source: str) -> list[str]:
    return [n for n in list_backbones() if source in get_entry(n).sources]


def _reference(source: str, name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    library_name = get_entry(name).sources[source]
    kwargs = REFERENCE_KWARGS.get((source, name), {})
    if source == "torchvision":
        model = torchvision.models.get_model(library_name, **kwargs)
    else:
        model = timm.create_model(library_name, **kwargs)
    return randomize_norms(model).eval()


def _ours(name: str, reference: torch.nn.Module, source: str) -> torch.nn.Module:
    # Built on the meta device, as its random init would be overwritten anyway; the converted
    # tensors are copies, so that a training step on one model leaves the other alone.
    with torch.device("meta"):
        model = build_classifier(name)
    converted = convert(name, reference.state_dict(), source=source)
    model.load_state_dict({k: v.clone() for k, v in converted.items()}, assign=True)  # strict
    return model.eval()


@pytest.mark.parametrize("name", names_from("torchvision"))
def test_torchvision_parity(name: str) -> None:
    reference = _reference("torchvision", name)
    ours = _ours(name, reference, "torchvision")
    assert num_params(ours) == num_params(reference)
    if name in PUBLISHED_PARAMS:
        assert num_params(ours) == PUBLISHED_PARAMS[name]

    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert max_rel_error(ours(x), reference(x)) <= 1e-5

    # One SGD step in train mode: BatchNorm batch statistics and gradients behave the same.
    assert_same_train_step(ours, reference, lambda sd: convert(name, sd, source="torchvision"))


@pytest.mark.parametrize("name", names_from("timm"))
def test_timm_parity(name: str) -> None:
    reference = _reference("timm", name)
    ours = _ours(name, reference, "timm")
    assert num_params(ours) == num_params(reference)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert max_rel_error(ours(x), reference(x)) <= 1e-5


# In eval mode, MobileNet's and EfficientNet's logits barely show the input (see
# `assert_same_train_step`); the other families' do, and their torchvision parity takes the step.
@pytest.mark.parametrize(
    "name", [n for n in names_from("timm") if n.startswith(("mobilenet", "efficientnet"))]
)
def test_timm_parity_in_train_mode(name: str) -> None:
    reference = _reference("timm", name)
    ours = _ours(name, reference, "timm")
    match_timm_dropout(ours, reference)
    assert_same_train_step(ours, reference, lambda sd: convert(name, sd, source="timm"))

"""Exact parity with torchvision and timm: random reference weights, converted, same logits."""

from __future__ import annotations

import pytest
import timm
import torch
import torchvision

from backbones import convert, list_backbones
from backbones._base import get_entry
from heads import build_classifier

from .conftest import max_rel_error, num_params, randomize_norms

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

# Reference arguments other than the library's defaults. torchvision's EfficientNet drops
# residual branches in train mode by default (stochastic_depth_prob=0.2), which the SGD step
# below could not replay; tests/test_parity_mobile.py compares stochastic depth on its own.
REFERENCE_KWARGS = {f"efficientnet_b{i}": {"stochastic_depth_prob": 0.0} for i in range(8)}


def names_from(source: str) -> list[str]:
    return [n for n in list_backbones() if source in get_entry(n).sources]


def _reference(source: str, name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    library_name = get_entry(name).sources[source]
    if source == "torchvision":
        model = torchvision.models.get_model(library_name, **REFERENCE_KWARGS.get(name, {}))
    else:
        model = timm.create_model(library_name)
    return randomize_norms(model).eval()


def _ours(name: str, reference: torch.nn.Module, source: str) -> torch.nn.Module:
    model = build_classifier(name).eval()
    model.load_state_dict(convert(name, reference.state_dict(), source=source))  # strict
    return model


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
    ours.train(), reference.train()
    for model in (ours, reference):
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        torch.manual_seed(1)  # same dropout masks, where the head has dropout
        model(x).logsumexp(dim=1).mean().backward()
        optimizer.step()
    updated = convert(name, reference.state_dict(), source="torchvision")
    for key, value in ours.state_dict().items():
        if value.is_floating_point():
            assert max_rel_error(value, updated[key]) <= 1e-5, key
        else:
            assert torch.equal(value, updated[key]), key


@pytest.mark.parametrize("name", names_from("timm"))
def test_timm_parity(name: str) -> None:
    reference = _reference("timm", name)
    ours = _ours(name, reference, "timm")
    assert num_params(ours) == num_params(reference)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert max_rel_error(ours(x), reference(x)) <= 1e-5

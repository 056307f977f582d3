"""The tiny-map weight-gradient path: same forward, same gradients, same state dict."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from backbones import create
from training import small_convs
from training.small_convs import TinyMapConv2d, use_tiny_map_weight_grads


def _grads(module: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    x = x.clone().requires_grad_()
    out = module(x)
    (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
    return out.detach(), [x.grad, *(p.grad for p in module.parameters())]


def _assert_close(a: torch.Tensor, b: torch.Tensor) -> None:
    scale = a.abs().max().clamp_min(1e-12)
    assert ((a - b).abs().max() / scale).item() < 1e-5


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize(
    ("conv", "size"),
    [
        (nn.Conv2d(16, 24, 3, padding=1), 2),  # 3x3 on a 2x2 map: the GEMM path
        (nn.Conv2d(16, 24, 3, stride=2, padding=1, bias=False), 4),  # strided, 2x2 out
        (nn.Conv2d(16, 24, 1, stride=2, bias=False), 3),  # 1x1 stride 2 (a shortcut)
        (nn.Conv2d(16, 16, 5, padding=2, groups=16), 2),  # depthwise: per-offset sums
        (nn.Conv2d(16, 16, 5, stride=2, padding=2, groups=16, bias=False), 4),
        (nn.Conv2d(16, 16, 3, padding=2, dilation=2, groups=16), 2),  # dilated depthwise
        (nn.Conv2d(8, 8, (3, 1), padding=(1, 0)), 2),  # non-square kernel
    ],
)
def test_gradients_match_the_native_convolution(
    conv: nn.Conv2d, size: int, channels_last: bool
) -> None:
    torch.manual_seed(0)
    conv = copy.deepcopy(conv)  # the parametrized instance is shared between cases
    fast = copy.deepcopy(conv)
    assert use_tiny_map_weight_grads(fast) == 1 and type(fast) is TinyMapConv2d
    x = torch.randn(3, conv.in_channels, size, size)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
        conv, fast = (m.to(memory_format=torch.channels_last) for m in (conv, fast))
    calls = []
    original = small_convs._TinyMapConv.apply
    small_convs._TinyMapConv.apply = lambda *a: calls.append(1) or original(*a)
    try:
        out_fast, grads_fast = _grads(fast, x)
    finally:
        small_convs._TinyMapConv.apply = original
    out_ref, grads_ref = _grads(conv, x)
    assert calls, "the tiny-map path was not taken"
    assert torch.equal(out_fast, out_ref)  # the forward is PyTorch's own
    for a, b in zip(grads_ref, grads_fast, strict=True):
        _assert_close(a, b)


def test_which_convolutions_are_swapped() -> None:
    model = nn.Sequential(
        nn.Conv2d(4, 8, 3),  # yes
        nn.Conv2d(8, 8, 1),  # 1x1 stride 1: oneDNN is fast already
        nn.Conv2d(8, 16, 3, groups=2),  # grouped, not depthwise
        nn.Conv2d(16, 16, 3, padding=1, padding_mode="reflect"),
        nn.Conv2d(16, 16, 3, padding="same"),
        nn.Conv2d(16, 16, 3, groups=16),  # depthwise: yes
    )
    assert use_tiny_map_weight_grads(model) == 2
    assert [type(m) is TinyMapConv2d for m in model] == [True, False, False, False, False, True]


def test_large_maps_eval_and_frozen_weights_keep_the_native_path(monkeypatch) -> None:
    conv = nn.Conv2d(4, 4, 3, padding=1)
    use_tiny_map_weight_grads(conv)
    taken = []
    monkeypatch.setattr(small_convs._TinyMapConv, "apply", lambda *a: taken.append(a))
    conv(torch.randn(2, 4, 3, 3))  # 9 output positions > MAX_POSITIONS
    with torch.no_grad():
        conv(torch.randn(2, 4, 2, 2))
    conv.requires_grad_(False)
    conv(torch.randn(2, 4, 2, 2))
    assert not taken


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v3_small"])
def test_a_whole_backbone_trains_the_same(name: str) -> None:
    torch.manual_seed(0)
    reference = create(name, out_features=("C4", "C5"))
    fast = copy.deepcopy(reference)
    assert use_tiny_map_weight_grads(fast) > 0
    assert list(fast.state_dict()) == list(reference.state_dict())

    class Sum(nn.Module):
        def __init__(self, backbone: nn.Module) -> None:
            super().__init__()
            self.backbone = backbone

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return sum(f.mean((2, 3)).sum(1) for f in self.backbone(x).values())

    x = torch.randn(4, 3, 64, 64)
    out_ref, grads_ref = _grads(Sum(reference), x)
    out_fast, grads_fast = _grads(Sum(fast), x)
    assert torch.equal(out_ref, out_fast)
    for a, b in zip(grads_ref, grads_fast, strict=True):
        _assert_close(a, b)

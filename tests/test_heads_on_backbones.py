"""Every head on every registered backbone: shapes at even and odd sizes, finite values, gradients.

Each backbone is built once per module and run once per input size (inside `Segmenter`, with
its features captured); every other head reuses those features, so adding a big backbone
costs two forwards and one small backward here.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from backbones import create
from heads import FPN, ClassificationHead, Segmenter, SemanticFPNHead

from .conftest import randomize_norms

SIZES = [(128, 128), (129, 161)]  # even, and odd off the /32 grid
GRAD_SIZE = (35, 51)  # small and odd: C5 is 2x2
NUM_CLASSES = 5
# Small widths keep the heads cheap next to the backbone; 48 is not a multiple of 32, so
# the head's GroupNorm has to pick its group count.
FPN_CHANNELS, HEAD_CHANNELS = 32, 48
Features = dict[str, torch.Tensor]


def _run_capturing(model: Segmenter, x: torch.Tensor) -> tuple[torch.Tensor, Features, Features]:
    """The segmenter's logits plus what its backbone and FPN returned on the way."""
    seen: list[Features] = []

    def keep(module: nn.Module, args: tuple, output: Features) -> None:
        seen.append(output)

    hooks = [model.backbone.register_forward_hook(keep), model.neck.register_forward_hook(keep)]
    try:
        logits = model(x)
    finally:
        for hook in hooks:
            hook.remove()
    return logits, seen[0], seen[1]


@pytest.fixture(scope="module")
def segmenter(name: str) -> Segmenter:
    """The backbone with C2..C5 (the paper's Semantic FPN input), built once per name."""
    torch.manual_seed(0)
    backbone = randomize_norms(create(name, out_features=("C2", "C3", "C4", "C5")))
    return Segmenter(backbone, NUM_CLASSES, FPN_CHANNELS, HEAD_CHANNELS).eval()


@pytest.fixture(scope="module")
def runs(segmenter: Segmenter) -> dict[tuple[int, int], tuple[torch.Tensor, Features, Features]]:
    """One forward per size: logits, backbone features, FPN outputs."""
    with torch.no_grad():
        return {size: _run_capturing(segmenter, torch.randn(1, 3, *size)) for size in SIZES}


def _assert_finite(tensors: dict[str, torch.Tensor]) -> None:
    bad = [key for key, t in tensors.items() if not torch.isfinite(t).all()]
    assert not bad, f"non-finite values in {bad}"


@pytest.mark.parametrize("size", SIZES)
def test_segmenter(segmenter: Segmenter, runs: dict, size: tuple[int, int]) -> None:
    logits, features, pyramid = runs[size]
    assert logits.shape == (1, NUM_CLASSES, *size)  # exactly the input size
    assert list(features) == ["C2", "C3", "C4", "C5"]
    assert list(pyramid) == ["P2", "P3", "P4", "P5"]
    for level, feature in features.items():
        p = pyramid[f"P{level[1:]}"]
        assert p.shape == (1, FPN_CHANNELS, *feature.shape[-2:])
    _assert_finite({"logits": logits, **pyramid})


# FPN inputs, fine to coarse, and the extra block: every out_features choice an FPN takes
FPN_CASES = [
    (("C2", "C3", "C4", "C5"), "maxpool"),
    (("C3", "C4", "C5"), "p6p7"),
    (("C3", "C4"), None),
    (("C5",), "p6p7"),
]


@pytest.mark.parametrize("size", SIZES)
def test_fpn_and_semantic_head_on_level_subsets(
    segmenter: Segmenter, runs: dict, size: tuple[int, int]
) -> None:
    _, features, _ = runs[size]
    channels = segmenter.backbone.channels
    torch.manual_seed(0)
    for levels, extra in FPN_CASES:
        fpn = FPN({level: channels[level] for level in levels}, FPN_CHANNELS, extra).eval()
        head = SemanticFPNHead(fpn.channels, NUM_CLASSES, HEAD_CHANNELS).eval()
        with torch.no_grad():
            pyramid = fpn(features)  # levels it was not built for are ignored
            logits = head(pyramid, size)
        assert list(pyramid) == list(fpn.channels), levels
        expected = {f"P{level[1:]}": features[level].shape[-2:] for level in levels}
        for extra_level in fpn.extra_levels:  # each extra level halves, rounding up
            h, w = expected[f"P{int(extra_level[1:]) - 1}"]
            expected[extra_level] = (math.ceil(h / 2), math.ceil(w / 2))
        assert {k: tuple(v.shape) for k, v in pyramid.items()} == {
            k: (1, FPN_CHANNELS, *hw) for k, hw in expected.items()
        }, levels
        assert logits.shape == (1, NUM_CLASSES, *size), levels
        _assert_finite({**pyramid, "logits": logits})


def _classification_heads(channels: dict[str, int]) -> dict[str, ClassificationHead]:
    coarsest = channels["C5"]
    multi = {level: channels[level] for level in ("C3", "C4", "C5")}
    return {
        "avg": ClassificationHead(coarsest, NUM_CLASSES),
        "max": ClassificationHead(coarsest, NUM_CLASSES, pool="max", pool_size=2),
        "avgmax": ClassificationHead(coarsest, NUM_CLASSES, pool="avgmax", hidden_channels=(16,)),
        "catavgmax": ClassificationHead(coarsest, NUM_CLASSES, pool="catavgmax", dropout=0.1),
        "multi_scale": ClassificationHead(multi, NUM_CLASSES, pool="catavgmax"),
    }


def _classify(head: ClassificationHead, features: Features) -> torch.Tensor:
    return head(features if head.levels else features["C5"])


@pytest.mark.parametrize("size", SIZES)
def test_classification_heads(segmenter: Segmenter, runs: dict, size: tuple[int, int]) -> None:
    _, features, _ = runs[size]
    heads = _classification_heads(segmenter.backbone.channels)
    with torch.no_grad():
        logits = {kind: _classify(head.eval(), features) for kind, head in heads.items()}
    assert {kind: tuple(out.shape) for kind, out in logits.items()} == dict.fromkeys(
        heads, (1, NUM_CLASSES)
    )
    _assert_finite(logits)


def test_gradients_reach_the_stem(segmenter: Segmenter) -> None:
    """One backward at a small odd size; each head is first checked to reach the levels it reads."""
    torch.manual_seed(0)
    heads = _classification_heads(segmenter.backbone.channels)
    try:
        logits, features, _ = _run_capturing(segmenter, torch.randn(1, 3, *GRAD_SIZE))
        assert logits.shape == (1, NUM_CLASSES, *GRAD_SIZE)
        outputs: dict[str, tuple[torch.Tensor, tuple[str, ...]]] = {
            "segmenter": (logits, ("C2", "C3", "C4", "C5")),
            **{
                kind: (_classify(head, features), head.levels or ("C5",))
                for kind, head in heads.items()
            },
        }
        for kind, (out, levels) in outputs.items():
            grads = torch.autograd.grad(
                out.square().mean(), [features[level] for level in levels], retain_graph=True
            )
            dead = [level for level, g in zip(levels, grads, strict=True) if not g.abs().sum() > 0]
            assert not dead, f"{kind}: no gradient reaches {dead}"
        sum(out.square().mean() for out, _ in outputs.values()).backward()
        stem = segmenter.backbone.get_submodule(segmenter.backbone.input_conv_name())
        assert stem.weight.grad is not None and stem.weight.grad.abs().sum() > 0
        models: dict[str, nn.Module] = {"segmenter": segmenter, **heads}
        missing = [
            f"{kind}.{n}"
            for kind, model in models.items()
            for n, p in model.named_parameters()
            if p.requires_grad and p.grad is None
        ]
        assert not missing, f"parameters without gradient: {missing[:5]}"
    finally:
        segmenter.zero_grad(set_to_none=True)  # the module-scoped model stays clean

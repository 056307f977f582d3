"""MobileNetV2/V3 and EfficientNet beyond the registry-wide parity: widths, drop path, levels."""

from __future__ import annotations

import pytest
import timm
import torch
import torchvision
from torch import nn
from torchvision.ops import StochasticDepth

from backbones import WeightsError, convert, create
from heads import build_classifier

from .conftest import (
    assert_same_train_step,
    match_timm_dropout,
    max_rel_error,
    num_params,
    randomize_norms,
)

# Width 1.0, the default, is covered with the registry in test_parity.py.
WIDTHS = (0.35, 0.5, 0.75, 1.4)


def assert_same_logits(
    ours: torch.nn.Module, reference: torch.nn.Module, name: str, **convert_kwargs: object
) -> None:
    """Same eval logits, and the same logits and update in a train-mode step, where the
    input shows (in eval mode it barely does: see `assert_same_train_step`)."""
    assert num_params(ours) == num_params(reference)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert max_rel_error(ours(x), reference(x)) <= 1e-5
    assert_same_train_step(ours, reference, lambda sd: convert(name, sd, **convert_kwargs))


@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize("name", ["mobilenet_v2", "mobilenet_v3_large", "mobilenet_v3_small"])
def test_width_mult_torchvision_parity(name: str, width: float) -> None:
    torch.manual_seed(0)
    reference = randomize_norms(torchvision.models.get_model(name, width_mult=width)).eval()
    ours = build_classifier(name, width_mult=width).eval()
    ours.load_state_dict(convert(name, reference.state_dict(), width_mult=width))
    assert_same_logits(ours, reference, name, width_mult=width)


@pytest.mark.parametrize("width", WIDTHS)
def test_width_mult_timm_parity(width: float) -> None:
    torch.manual_seed(0)
    reference = randomize_norms(timm.create_model(f"mobilenetv2_{round(width * 100):03d}")).eval()
    ours = build_classifier("mobilenet_v2", width_mult=width).eval()
    ours.load_state_dict(
        convert("mobilenet_v2", reference.state_dict(), source="timm", width_mult=width)
    )
    match_timm_dropout(ours, reference)
    assert_same_logits(ours, reference, "mobilenet_v2", source="timm", width_mult=width)


def test_convert_checks_the_width() -> None:
    state_dict = torchvision.models.mobilenet_v2(width_mult=0.5).state_dict()
    with pytest.raises(WeightsError, match=r"do not fit mobilenet_v2: .* of the wrong shape"):
        convert("mobilenet_v2", state_dict)


@pytest.mark.parametrize("width", [0, -1.0, "1.0"])
def test_rejects_bad_width(width: object) -> None:
    with (
        pytest.raises(ValueError, match=rf"width_mult must be a positive number, got {width!r}"),
        torch.device("meta"),
    ):
        create("mobilenet_v3_small", width_mult=width)


def assert_drops_the_same_branches(ours: nn.Module, reference: nn.Module) -> None:
    """In train mode the same seed drops the same residual branches of the same samples."""
    x = torch.randn(8, 3, 32, 32)
    outputs = []
    for model in (ours.train(), reference.train()):
        torch.manual_seed(1)
        outputs.append(model(x))
    assert max_rel_error(*outputs) <= 1e-5


@pytest.mark.parametrize(
    ("name", "channels"),
    [
        ("mobilenet_v2", {"C1": 16, "C2": 24, "C3": 32, "C4": 96, "C5": 1280}),
        ("mobilenet_v3_large", {"C1": 16, "C2": 24, "C3": 40, "C4": 112, "C5": 960}),
        ("mobilenet_v3_small", {"C1": 16, "C2": 16, "C3": 24, "C4": 48, "C5": 576}),
        ("efficientnet_b0", {"C1": 16, "C2": 24, "C3": 40, "C4": 112, "C5": 1280}),
        ("efficientnet_b7", {"C1": 32, "C2": 48, "C3": 80, "C4": 224, "C5": 2560}),
    ],
)
def test_levels(name: str, channels: dict[str, int]) -> None:
    # C3/C4 end the last block at strides 8/16; C5 includes the 1x1 head conv, as
    # torchvision's `features` do.
    with torch.device("meta"):
        model = create(name)
    assert {f.name: f.channels for f in model.feature_info} == channels


def test_drop_path_rate_is_torchvision_stochastic_depth() -> None:
    torch.manual_seed(0)
    reference = randomize_norms(torchvision.models.efficientnet_b0(stochastic_depth_prob=0.2))
    ours = build_classifier("efficientnet_b0", drop_path_rate=0.2)
    ours.load_state_dict(convert("efficientnet_b0", reference.state_dict()))
    rates = [block.drop_path.p for stage in ours.backbone.stages[:-1] for block in stage]
    assert rates == [m.p for m in reference.modules() if isinstance(m, StochasticDepth)]
    assert rates[0] == 0.0 and rates[-1] == pytest.approx(0.2 * 15 / 16)

    assert_drops_the_same_branches(ours, reference)


def test_mobilenet_v2_drop_path_rate_is_timms() -> None:
    torch.manual_seed(0)
    reference = randomize_norms(timm.create_model("mobilenetv2_100", drop_path_rate=0.2))
    ours = build_classifier("mobilenet_v2", drop_path_rate=0.2)
    ours.load_state_dict(convert("mobilenet_v2", reference.state_dict(), source="timm"))
    match_timm_dropout(ours, reference)
    rates = [block.drop_path.p for stage in ours.backbone.stages[:-1] for block in stage]
    assert rates == [0.2 * i / 17 for i in range(17)]
    assert rates == [
        getattr(block.drop_path, "drop_prob", 0.0)  # timm's rate-0 blocks have an Identity
        for row in reference.blocks
        for block in row
    ]
    assert_drops_the_same_branches(ours, reference)


@pytest.mark.parametrize(
    ("name", "blocks"), [("mobilenet_v3_large", 15), ("mobilenet_v3_small", 11)]
)
def test_mobilenet_v3_drop_path_rate(name: str, blocks: int) -> None:
    """As EfficientNet's: block i of n gets rate * i / n; with 0, torchvision's network."""
    torch.manual_seed(0)
    plain = randomize_norms(create(name, out_features=("C5",)))
    dropping = create(name, out_features=("C5",), drop_path_rate=0.3)
    dropping.load_state_dict(plain.state_dict())  # DropPath holds no state: same keys
    rates = [block.drop_path.p for stage in dropping.stages[:-1] for block in stage]
    assert rates == [0.3 * i / blocks for i in range(blocks)]
    x = torch.randn(8, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(dropping.eval()(x)["C5"], plain.eval()(x)["C5"])
        torch.manual_seed(1)
        trained = dropping.train()(x)["C5"]
        torch.manual_seed(1)
        assert max_rel_error(trained, plain.train()(x)["C5"]) > 1e-3  # branches were dropped

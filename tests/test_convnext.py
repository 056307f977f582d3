"""ConvNeXt: stochastic depth and layer scale as torchvision has them."""

from __future__ import annotations

import pytest
import torch
import torchvision

from backbones import convert, create
from heads import build_classifier

from .conftest import max_rel_error, randomize_norms


def test_drop_path_matches_torchvision_stochastic_depth() -> None:
    # torchvision's convnext_tiny trains with stochastic depth 0.1 by default. With the same
    # seed, the same per-block rates and the same draws, train-mode logits and gradients agree.
    torch.manual_seed(0)
    reference = randomize_norms(torchvision.models.convnext_tiny()).train()
    ours = build_classifier("convnext_tiny", drop_path_rate=0.1).train()
    ours.load_state_dict(convert("convnext_tiny", reference.state_dict()))
    x = torch.randn(4, 3, 32, 32)
    logits = []
    for model in (ours, reference):
        torch.manual_seed(1)
        logits.append(model(x))
        logits[-1].logsumexp(dim=1).mean().backward()
    assert max_rel_error(logits[0], logits[1]) <= 1e-5
    torch.manual_seed(2)
    assert max_rel_error(ours(x), logits[0]) > 1e-2, "another seed drops other blocks"

    reference_grads = convert("convnext_tiny", {k: p.grad for k, p in reference.named_parameters()})
    for key, param in ours.named_parameters():
        assert max_rel_error(param.grad, reference_grads[key]) <= 1e-4, key


def test_drop_path_and_layer_scale_settings() -> None:
    with torch.device("meta"):
        model = create("convnext_small", drop_path_rate=0.4, layer_scale_init=0.5)
    blocks = [block for stage in model.stages for block in stage.blocks]
    rates = [block.drop_path.p for block in blocks]
    assert rates == pytest.approx([0.4 * i / 35 for i in range(36)])  # 3 + 3 + 27 + 3 blocks
    model = create("convnext_tiny", layer_scale_init=0.5)
    assert all(
        torch.equal(b.layer_scale, torch.full_like(b.layer_scale, 0.5))
        for b in model.stages[0].blocks
    )


@pytest.mark.parametrize("drop_path_rate", [-0.1, 1.0, float("nan")])
def test_rejects_bad_drop_path_rate(drop_path_rate: float) -> None:
    with (
        pytest.raises(ValueError, match=r"drop_path_rate must be in \[0, 1\)"),
        torch.device("meta"),
    ):
        create("convnext_tiny", drop_path_rate=drop_path_rate)


def test_pretrained_layer_scale_is_reshaped() -> None:
    # torchvision stores the layer scale as (C, 1, 1), timm and we as (C,).
    reference = torchvision.models.convnext_tiny().state_dict()
    model = create("convnext_tiny", pretrained=reference, out_features=("C2",))
    expected = reference["features.1.2.layer_scale"]
    assert expected.shape == (96, 1, 1)
    torch.testing.assert_close(model.stages[0].blocks[2].layer_scale, expected.flatten())

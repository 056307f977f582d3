"""The backbone contract, for every registered backbone (a new variant is tested by registering it)."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from backbones import Backbone, FeatureInfo, create
from backbones.weights import adapt_input_conv

from .conftest import randomize_norms


@pytest.fixture(scope="module")
def model(name: str) -> Backbone:
    """The default backbone, built once per name; tests that change it work on a copy."""
    torch.manual_seed(0)
    return randomize_norms(create(name)).eval()


def rebuild(name: str, weights: Backbone, **kwargs) -> Backbone:
    """`create(name, **kwargs)` holding a copy of `weights`' tensors, in train mode.

    Random init is most of the time it takes to build a big backbone, and these tests need
    the model that the arguments build, not new random numbers: build it on the meta device
    and fill it. The stem conv is fitted to `in_chans` as it is for pretrained weights.
    """
    with torch.device("meta"):
        model = create(name, **kwargs)
    source = weights.state_dict()
    state = {key: source[key].clone() for key in model.state_dict()}
    adapt_input_conv(model, state)
    model.load_state_dict(state, assign=True)
    return model.train()


def test_feature_info(name: str, model: Backbone) -> None:
    info = model.feature_info
    assert all(isinstance(f, FeatureInfo) for f in info)
    names = [f.name for f in info]
    assert {"C2", "C3", "C4", "C5"} <= set(names)
    assert names == sorted(names, key=lambda n: int(n[1:])), "fine to coarse"
    assert [f.stride for f in info] == [2 ** int(n[1:]) for n in names]
    assert model.out_features == ("C3", "C4", "C5")
    assert model.channels == {f.name: f.channels for f in info if f.name in ("C3", "C4", "C5")}
    assert model.strides == {"C3": 8, "C4": 16, "C5": 32}


@pytest.mark.parametrize("size", [(128, 128), (127, 161)])  # even, and odd off the /32 grid
def test_output_shapes(name: str, model: Backbone, size: tuple[int, int]) -> None:
    with torch.no_grad():
        features = model(torch.randn(1, 3, *size))
    assert list(features) == ["C3", "C4", "C5"]
    for level, feature in features.items():
        stride = model.strides[level]
        expected = (
            1,
            model.channels[level],
            math.ceil(size[0] / stride),
            math.ceil(size[1] / stride),
        )
        assert tuple(feature.shape) == expected, level
        assert torch.isfinite(feature).all(), level


def test_gradients_reach_the_stem(name: str, model: Backbone) -> None:
    trained = copy.deepcopy(model).train()
    features = trained(torch.randn(2, 3, 64, 64))
    sum(f.float().pow(2).mean() for f in features.values()).backward()
    stem_conv = trained.get_submodule(trained.input_conv_name())
    assert stem_conv.weight.grad is not None and stem_conv.weight.grad.abs().sum() > 0
    missing = [n for n, p in trained.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, f"parameters without gradient: {missing[:5]}"


def test_out_features_subsets(name: str, model: Backbone) -> None:
    levels = [f.name for f in model.feature_info]
    subset = (levels[0], "C4")  # the finest level, a gap, and no C5
    x = torch.randn(1, 3, 64, 64)
    everything = rebuild(name, model, out_features=levels).eval()
    sub_model = rebuild(name, model, out_features=subset).eval()
    with torch.no_grad():
        reference, features = everything(x), sub_model(x)
    assert list(reference) == levels
    assert list(features) == list(subset)
    for level in subset:
        torch.testing.assert_close(features[level], reference[level], rtol=0, atol=0)
    # Stages past the coarsest requested level are neither run nor kept.
    assert len(sub_model.stages) < len(everything.stages)
    assert sub_model.channels == {level: everything.channels[level] for level in subset}


def test_frozen_stages(name: str, model: Backbone) -> None:
    model = rebuild(name, model, frozen_stages=2)
    frozen = [model.stem, *model.stages[:2]]
    trainable = model.stages[2:]
    before = copy.deepcopy(model.state_dict())
    frozen_names = {k for k in before if k.startswith(("stem.", "stages.0.", "stages.1."))}
    assert all(not p.requires_grad for m in frozen for p in m.parameters())
    assert all(p.requires_grad for m in trainable for p in m.parameters())
    assert all(
        not m.training for m in frozen for m in m.modules() if isinstance(m, torch.nn.BatchNorm2d)
    )

    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    sum(f.mean() for f in model(torch.randn(2, 3, 64, 64)).values()).backward()
    optimizer.step()

    after = model.state_dict()
    for key in before:
        if key in frozen_names:  # weights and BatchNorm running stats
            assert torch.equal(before[key], after[key]), key
    changed = [k for k in before if k not in frozen_names and not torch.equal(before[k], after[k])]
    assert changed, "the trainable stages did not change"


def test_norm_eval(name: str) -> None:
    with torch.device("meta"):
        model = create(name, norm_eval=True).train()
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    if not norms:
        pytest.skip(f"{name} has no BatchNorm (plain VGG, ConvNeXt's LayerNorms): nothing to hold")
    assert not any(m.training for m in norms)
    assert all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("in_chans", [1, 4])
def test_in_chans(name: str, model: Backbone, in_chans: int) -> None:
    model = rebuild(name, model, in_chans=in_chans).eval()
    with torch.no_grad():
        features = model(torch.randn(1, in_chans, 64, 64))
    assert list(features) == ["C3", "C4", "C5"]
    with pytest.raises(ValueError, match=rf"expects a \(batch, {in_chans}, height, width\) tensor"):
        model(torch.randn(1, 3, 64, 64))


def test_grad_checkpointing_is_exact(name: str, model: Backbone) -> None:
    plain = copy.deepcopy(model).train()
    checkpointed = copy.deepcopy(model).train()
    checkpointed.set_grad_checkpointing(True)
    x = torch.randn(2, 3, 48, 48)
    losses = []
    for net in (plain, checkpointed):
        torch.manual_seed(0)  # same drop-path masks, where the family has stochastic depth
        features = net(x)
        loss = sum(f.pow(2).mean() for f in features.values())
        loss.backward()
        losses.append(loss.detach())
    torch.testing.assert_close(losses[1], losses[0], rtol=0, atol=0)
    for (key, p), q in zip(plain.named_parameters(), checkpointed.parameters(), strict=True):
        torch.testing.assert_close(q.grad, p.grad, rtol=0, atol=0, msg=key)
    # The recomputation in backward must not update BatchNorm statistics a second time.
    for (key, a), b in zip(plain.named_buffers(), checkpointed.buffers(), strict=True):
        torch.testing.assert_close(b, a, rtol=0, atol=0, msg=key)


def test_rejects_bad_input_shapes(name: str, model: Backbone) -> None:
    with pytest.raises(
        ValueError, match=r"expects a \(batch, 3, height, width\) tensor, got shape \(3, 64, 64\)"
    ):
        model(torch.randn(3, 64, 64))
    with pytest.raises(ValueError, match=r"got shape \(1, 1, 64, 64\)"):
        model(torch.randn(1, 1, 64, 64))


def test_rejects_unknown_levels(name: str) -> None:
    with (
        pytest.raises(ValueError, match=r"out_features=\('C3', 'C9'\) asks for \['C9'\]"),
        torch.device("meta"),
    ):
        create(name, out_features=("C3", "C9"))


def test_grad_checkpointing_replays_drop_path_masks() -> None:
    torch.manual_seed(0)
    plain = create("resnet18", drop_path_rate=0.5).train()
    checkpointed = copy.deepcopy(plain)
    checkpointed.set_grad_checkpointing(True)
    x = torch.randn(4, 3, 32, 32)
    for net in (plain, checkpointed):
        torch.manual_seed(1)
        sum(f.pow(2).mean() for f in net(x).values()).backward()
    for (key, p), q in zip(plain.named_parameters(), checkpointed.parameters(), strict=True):
        torch.testing.assert_close(q.grad, p.grad, rtol=0, atol=0, msg=key)

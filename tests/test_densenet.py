"""DenseNet: memory-efficient mode and torchvision's published key spelling."""

from __future__ import annotations

import copy
import re

import pytest
import torch
import torchvision

from backbones import Backbone, convert, create

from .conftest import randomize_norms


@pytest.fixture(scope="module")
def densenet() -> Backbone:
    torch.manual_seed(0)
    return randomize_norms(create("densenet121", out_features=("C3", "C5")))


def _train_step(model: Backbone, x: torch.Tensor) -> tuple[dict[str, torch.Tensor], int]:
    """Forward + backward in train mode; returns the features and the activation bytes stored."""
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    stored: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in weights:
            stored[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        features = model.train()(x)
    sum(f.pow(2).mean() for f in features.values()).backward()
    return features, sum(stored.values())


@pytest.mark.parametrize("grad_checkpointing", [False, True])
def test_memory_efficient_is_exact(densenet: Backbone, grad_checkpointing: bool) -> None:
    plain = copy.deepcopy(densenet)
    efficient = create("densenet121", out_features=("C3", "C5"), memory_efficient=True)
    efficient.load_state_dict(densenet.state_dict())
    efficient.set_grad_checkpointing(grad_checkpointing)  # nested checkpoints, too
    x = torch.randn(2, 3, 32, 32)
    expected, plain_bytes = _train_step(plain, x)
    features, efficient_bytes = _train_step(efficient, x)
    for level in expected:
        torch.testing.assert_close(features[level], expected[level], rtol=0, atol=0)
    for (key, p), q in zip(plain.named_parameters(), efficient.parameters(), strict=True):
        torch.testing.assert_close(q.grad, p.grad, rtol=0, atol=0, msg=key)
    # The recomputation must not update BatchNorm running statistics a second time.
    for (key, a), b in zip(plain.named_buffers(), efficient.buffers(), strict=True):
        torch.testing.assert_close(b, a, rtol=0, atol=0, msg=key)
    # The concatenations are recomputed, not stored: about half the activations are gone.
    assert efficient_bytes < 0.6 * plain_bytes


def test_memory_efficient_without_gradients(densenet: Backbone) -> None:
    efficient = create("densenet121", out_features=("C3", "C5"), memory_efficient=True).eval()
    efficient.load_state_dict(densenet.state_dict())
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected = copy.deepcopy(densenet).eval()(x)
        features = efficient(x)
    for level in expected:
        torch.testing.assert_close(features[level], expected[level], rtol=0, atol=0)


def test_published_key_spelling_converts() -> None:
    # torchvision's weight files predate its module renames: `denselayer1.norm.1.weight`
    # where its modules (and timm's) say `denselayer1.norm1.weight`.
    with torch.device("meta"):
        reference = torchvision.models.densenet121().state_dict()
    published = {
        re.sub(r"(denselayer\d+\.(?:norm|conv))([12])", r"\1.\2", k): v
        for k, v in reference.items()
    }
    assert any(".norm.1." in k for k in published)
    assert convert("densenet121", published).keys() == convert("densenet121", reference).keys()


def test_memory_efficient_is_densenet_only() -> None:
    with pytest.raises(
        TypeError,
        match=r"resnet50 got an unexpected keyword argument 'memory_efficient'\. "
        r"'memory_efficient' is an argument of DenseNet, not of ResNet\. ResNet takes: out_features",
    ):
        create("resnet50", memory_efficient=True)

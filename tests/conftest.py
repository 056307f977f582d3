"""Shared test helpers: reference models with random (not default) norm statistics."""

from __future__ import annotations

import math
import os
import shutil
from collections.abc import Callable, Iterator

import pytest
import torch
from torch import nn

from backbones import list_backbones

if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs one pytest-xdist worker per core: one intra-op thread each (and in the
    # subprocesses they start), so that the workers do not fight over the cores.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)

# Parameter names of per-channel layer scales: torchvision's and ours, timm's.
LAYER_SCALES = ("layer_scale", "gamma")


def randomize_norms(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every norm non-trivial affine parameters and running statistics, and every layer
    scale values near 1.

    Default BatchNorm (weight 1, bias 0, mean 0, var 1) is the identity in eval mode, which
    would let a wrongly mapped norm key pass a parity test; so would ConvNeXt's layer scale
    of 1e-6, which hides its blocks' branches from the output.
    """
    generator = torch.Generator().manual_seed(seed)

    def uniform(t: torch.Tensor, low: float, high: float) -> None:
        t.copy_(torch.rand(t.shape, generator=generator) * (high - low) + low)

    with torch.no_grad():
        for module in model.modules():
            if (
                isinstance(module, nn.BatchNorm2d | nn.LayerNorm | nn.GroupNorm)
                and module.weight is not None
            ):
                uniform(module.weight, 0.5, 1.5)
                uniform(module.bias, -0.2, 0.2)
            if isinstance(module, nn.BatchNorm2d) and module.running_mean is not None:
                uniform(module.running_mean, -0.2, 0.2)
                uniform(module.running_var, 0.5, 1.5)
        for name, param in model.named_parameters():
            if name.rsplit(".", 1)[-1] in LAYER_SCALES:
                uniform(param, 0.5, 1.5)
    return model


def randomize_weights(model: nn.Module, seed: int = 0) -> nn.Module:
    """He-normal (fan-in) weights, small random biases, then `randomize_norms`.

    Under the libraries' own init (fan-out) and random norm statistics, a deep MobileNet's or
    EfficientNet's eval-mode output barely depends on its input (~1e-6 relative between two
    images), so an eval-mode comparison could not tell a wrong conv from a right one; fan-in
    keeps the activations' scale through the depth, and the input shows.
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.ndim > 1:  # conv / linear weights
                param.normal_(0.0, math.sqrt(2.0 / param[0].numel()), generator=generator)
            else:
                param.uniform_(-0.1, 0.1, generator=generator)
    return randomize_norms(model, seed)


def max_rel_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected|, with one temporary (VGG's fc is 100M floats)."""
    low, high = torch.aminmax(expected)
    return ((actual - expected).abs_().max() / torch.maximum(-low, high)).item()


def num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.fixture(scope="module", params=list_backbones())
def name(request: pytest.FixtureRequest) -> str:
    """Every registered backbone; module scope groups a module's tests by backbone."""
    return request.param


@pytest.fixture(scope="module", autouse=True)
def _module_tmp_cleanup(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[None]:
    """Removes what a module's module-scoped fixtures made under the worker's base temp
    directory once the module is done, unless one of its tests failed (then it stays to look
    at). Trained runs hold checkpoints of 100+ MB each: kept to the session's end, the suite
    filled 9 GB of /tmp. Passing tests' own `tmp_path`s go at once
    (`tmp_path_retention_policy = "failed"` in pyproject.toml)."""
    base = tmp_path_factory.getbasetemp()
    before = set(base.iterdir())
    failed = request.session.testsfailed
    yield
    if request.session.testsfailed == failed:
        for path in set(base.iterdir()) - before:
            shutil.rmtree(path, ignore_errors=True)


CLEANUP = _module_tmp_cleanup.__name__  # every module uses it: it groups nothing


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist reads the groups
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The tests of a module that share its module-scoped fixtures form one xdist group (one per
    parameter of those fixtures: per backbone for `name`), so one worker builds each fixture
    once. Load scheduling would deal them out to both workers, and each would build it: a
    trained model, a sweep, every backbone. A test marked `xdist_group` keeps its own group."""
    for item in items:
        if item.get_closest_marker("xdist_group") is not None:
            continue
        definitions = item._fixtureinfo.name2fixturedefs  # the fixtures the test uses
        shared = [
            n
            for n in item.fixturenames
            if n in definitions and definitions[n][-1].scope == "module" and n != CLEANUP
        ]
        if not shared:
            continue
        params = getattr(item, "callspec", None)
        values = sorted(f"{n}={params.params[n]}" for n in shared if params and n in params.params)
        item.add_marker(pytest.mark.xdist_group(":".join([item.module.__name__, *values])))


def assert_same_train_step(
    ours: nn.Module,
    reference: nn.Module,
    ours_from_reference: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]],
    tolerance: float = 1e-5,
) -> None:
    """One SGD step in train mode gives the same logits and the same updated state.

    In eval mode, randomised BatchNorm statistics can make a deep network's logits nearly
    independent of its input (MobileNet, EfficientNet: ~1e-7 relative between two images),
    so eval-mode logit parity cannot tell which image the model saw. Train mode normalises by
    the batch's statistics: the input shows, which is asserted first.
    """
    x, other = torch.randn(2, 2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    ours.train(), reference.train()
    buffers = {k: v.clone() for k, v in reference.named_buffers()}  # the probe moves BN stats
    with torch.no_grad():
        torch.manual_seed(1)
        seen = reference(x)
        torch.manual_seed(1)
        assert max_rel_error(reference(other), seen) > 100 * tolerance, "the input does not show"
    reference.load_state_dict(buffers, strict=False)
    logits = {}
    for key, model in (("ours", ours), ("reference", reference)):
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        torch.manual_seed(1)  # same dropout masks, where the head has dropout
        logits[key] = model(x)
        logits[key].logsumexp(dim=1).mean().backward()
        optimizer.step()
    assert max_rel_error(logits["ours"].detach(), logits["reference"].detach()) <= tolerance
    updated = ours_from_reference(reference.state_dict())
    for key, value in ours.state_dict().items():
        if value.is_floating_point():
            assert max_rel_error(value, updated[key]) <= tolerance, key
        else:
            assert torch.equal(value, updated[key]), key


def match_timm_dropout(ours: nn.Module, reference: nn.Module) -> None:
    """timm's EfficientNet/MobileNet classifiers default to no dropout, torchvision's (and so
    our heads) to 0.2-0.5: give the timm reference our rate, so that a train-mode step compares
    like with like (the same seed then draws the same mask)."""
    rates = [m.p for m in ours.modules() if isinstance(m, nn.Dropout)]
    if hasattr(reference, "drop_rate") and rates:
        reference.drop_rate = rates[0]

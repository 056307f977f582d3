"""fuse(): every BatchNorm that only reads a conv's output is folded into that conv; the
outputs stay the same up to float rounding; eval only."""

from __future__ import annotations

from functools import partial

import pytest
import torch
from torch import nn

from backbones import Backbone, create, fuse_batchnorm
from backbones.densenet import DenseLayer, DenseNet
from backbones.fuse import FoldedBatchNorm
from backbones.layers import ConvNormAct

from .conftest import max_rel_error, randomize_norms


def _all_levels(name: str) -> tuple[str, ...]:
    with torch.device("meta"):
        return tuple(f.name for f in create(name, out_features=("C5",)).feature_info)


def test_fused_outputs_match(name: str) -> None:
    torch.manual_seed(0)
    model = randomize_norms(create(name, out_features=_all_levels(name))).eval()
    keys = set(model.state_dict())
    x = torch.randn(2, 3, 48, 48)  # C5 is 2x2 (1x1 would hide a spatial mix-up)
    with torch.no_grad():
        expected = model(x)
        assert model.fuse() is model
        actual = model(x)
    for level, feature in expected.items():
        assert max_rel_error(actual[level], feature) <= 1e-5, level
    remaining = [n for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]
    folded = [n for n, m in model.named_modules() if isinstance(m, FoldedBatchNorm)]
    if isinstance(model, DenseNet):
        # the stem's norm and each layer's norm2 follow a conv; norm1, the transitions' norm
        # and the final norm read a concatenation or a pool: they stay
        layers = [m for m in model.modules() if isinstance(m, DenseLayer)]
        assert len(folded) == 1 + len(layers)
        assert all(n.endswith(".norm2") for n in folded[1:])
        assert len(remaining) == len(layers) + len(model.stages)
    else:
        assert remaining == []
    # the folded norms' entries are gone, and their convs may have gained a bias: nothing else
    after = set(model.state_dict())
    assert {k.rsplit(".", 1)[0] for k in keys - after} == set(folded)
    assert all(k.endswith(".bias") for k in after - keys) and len(after - keys) <= len(folded)
    conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d) and m.kernel_size != (1, 1))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)


def test_fuse_needs_eval_mode_and_forbids_training() -> None:
    model = create("resnet18", out_features=("C3",))
    with pytest.raises(RuntimeError, match=r"only valid for inference: call \.eval\(\) first"):
        model.fuse()
    model.eval().fuse()
    with pytest.raises(
        RuntimeError, match=r"ResNet was fuse\(\)d for inference.*cannot be trained"
    ):
        model.train()
    assert not any(m.training for m in model.modules())  # the refusal changed nothing


class _UsedTwice(nn.Module):
    """A conv whose output feeds its norm and, again, a sum: the norm cannot be folded."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.norm = nn.BatchNorm2d(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return self.norm(y) + y


class _TwoNorms(nn.Module):
    """One conv output read by two norms: neither is its only reader."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.norm1 = nn.BatchNorm2d(8)
        self.norm2 = nn.BatchNorm2d(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return self.norm1(y) * self.norm2(y)


class _SharedConv(nn.Module):
    """One conv module run twice, each output read by its own norm: one weight, two foldings."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.norm1 = nn.BatchNorm2d(8)
        self.norm2 = nn.BatchNorm2d(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm2(self.conv(self.norm1(self.conv(x))))


class _Tiny(Backbone):
    """A backbone that is `stem` (C1) and optionally one more stage (C2)."""

    def __init__(self, stem: nn.Module, stage: nn.Module | None = None, in_chans: int = 8) -> None:
        super().__init__(out_features=("C1", "C2") if stage else ("C1",), in_chans=in_chans)
        self.stem = stem
        self.add_level(8, stride=2)
        self.stages = nn.ModuleList([stage] if stage else [])
        if stage:
            self.add_level(8, stride=4)
        self.finalize()


@pytest.mark.parametrize(
    ("model", "kept"),
    [
        (_Tiny(nn.Sequential(ConvNormAct(8, 8, 3, stride=2), _UsedTwice())), ["stem.1.norm"]),
        (_Tiny(_TwoNorms()), ["stem.norm1", "stem.norm2"]),
        (_Tiny(_SharedConv()), ["stem.norm1", "stem.norm2"]),
        # the stem's conv output is C1 and the next stage's norm input: C1 must not change
        (
            _Tiny(nn.Conv2d(8, 8, 3, 2, 1), nn.Sequential(nn.BatchNorm2d(8), nn.MaxPool2d(2))),
            ["stages.0.0"],
        ),
        (
            _Tiny(
                ConvNormAct(
                    8, 8, 3, 2, norm_layer=partial(nn.BatchNorm2d, track_running_stats=False)
                )
            ),
            ["stem.norm"],
        ),
    ],
    ids=["read_twice", "two_norms", "conv_run_twice", "conv_output_returned", "no_running_stats"],
)
def test_only_norms_that_alone_read_a_conv_output_are_folded(
    model: Backbone, kept: list[str]
) -> None:
    model = randomize_norms(model).eval()
    x = torch.randn(2, 8, 16, 16)
    with torch.no_grad():
        expected = model(x)
        model.fuse()
        actual = model(x)
    remaining = [n for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]
    assert remaining == kept
    for level, feature in expected.items():
        assert max_rel_error(actual[level], feature) <= 1e-5, level


def test_the_free_function_takes_any_module_with_an_example() -> None:
    torch.manual_seed(0)
    model = randomize_norms(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU()))
    model.eval()
    x = torch.randn(2, 3, 10, 10)
    with torch.no_grad():
        expected = model(x)
        with pytest.raises(TypeError, match="has no `in_chans`; pass an example input"):
            fuse_batchnorm(model)
        assert fuse_batchnorm(model, x[:1]) is model
        actual = model(x)
    assert isinstance(model[1], FoldedBatchNorm) and model[0].bias is not None
    assert max_rel_error(actual, expected) <= 1e-5
    with pytest.raises(RuntimeError, match=r"this model was fuse\(\)d for inference"):
        model.train()

"""The Backbone base class on a toy family: what every family builder relies on."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from backbones import Backbone, FeatureInfo, register_backbone
from backbones.layers import ConvNormAct


class Toy(Backbone):
    """stem /2, then stages at /4, /4 again (a second block at the same stride), /8."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.stem = ConvNormAct(self.in_chans, 4, stride=2)
        self.add_level(4, stride=2)
        self.stages = nn.ModuleList()
        for channels, stride, total in [(8, 2, 4), (12, 1, 4), (16, 2, 8)]:
            self.stages.append(
                ConvNormAct(
                    self.stages[-1].conv.out_channels if self.stages else 4, channels, stride=stride
                )
            )
            self.add_level(channels, total)
        self.finalize()


def test_a_later_module_at_the_same_stride_replaces_the_level() -> None:
    toy = Toy(out_features=("C1", "C2", "C3"))
    assert toy.feature_info == [
        FeatureInfo("C1", 4, 2),
        FeatureInfo("C2", 12, 4),
        FeatureInfo("C3", 16, 8),
    ]
    features = toy(torch.randn(1, 3, 16, 16))
    assert {k: tuple(v.shape) for k, v in features.items()} == {
        "C1": (1, 4, 8, 8),
        "C2": (1, 12, 4, 4),
        "C3": (1, 16, 2, 2),
    }


def test_only_the_needed_stages_are_kept() -> None:
    assert len(Toy(out_features=("C1",)).stages) == 0
    assert len(Toy(out_features=("C2",)).stages) == 2
    assert len(Toy(out_features="C3").stages) == 3


def test_strides_must_be_powers_of_two() -> None:
    toy = Toy(out_features=("C3",))
    with pytest.raises(ValueError, match="level strides must be powers of two, got 12"):
        toy.add_level(8, stride=12)


def test_names_register_once() -> None:
    with pytest.raises(ValueError, match="backbone 'resnet18' is already registered"):

        @register_backbone()
        def resnet18(**kwargs) -> Backbone:
            return Toy(**kwargs)

"""Registry and constructor arguments: names, filters and clear errors."""

from __future__ import annotations

import re

import pytest
import torch

from backbones import create, list_backbones
from backbones.__main__ import main

RESNETS = [
    "resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "resnext50_32x4d",
    "resnext101_32x8d", "resnext101_64x4d", "wide_resnet50_2", "wide_resnet101_2",
]  # fmt: skip


VGGS = ["vgg11", "vgg11_bn", "vgg13", "vgg13_bn", "vgg16", "vgg16_bn", "vgg19", "vgg19_bn"]
DENSENETS = ["densenet121", "densenet161", "densenet169", "densenet201"]
CONVNEXTS = ["convnext_tiny", "convnext_small", "convnext_base", "convnext_large"]


def test_list_backbones() -> None:
    assert set(RESNETS + VGGS + DENSENETS + CONVNEXTS) <= set(list_backbones())
    assert list_backbones("densenet*") == DENSENETS
    assert list_backbones("resnet*") == [
        "resnet18",
        "resnet34",
        "resnet50",
        "resnet101",
        "resnet152",
    ]
    assert list_backbones("no_such_*") == []


def test_unknown_name_lists_close_matches() -> None:
    with pytest.raises(ValueError, match=r"unknown backbone 'resnet05'\. Did you mean: resnet50"):
        create("resnet05")


def test_unknown_argument() -> None:
    with pytest.raises(
        TypeError,
        match=r"resnet18 got an unexpected keyword argument 'out_feature'\. Did you mean "
        r"'out_features'\? ResNet takes: out_features, in_chans, frozen_stages, norm_eval, ",
    ):
        create("resnet18", out_feature=("C5",))


@pytest.mark.parametrize("name", list_backbones())
def test_family_options_are_checked_or_refused(name: str) -> None:
    with pytest.raises(TypeError, match=rf"^{name} got an unexpected keyword argument 'no_such'"):
        create(name, no_such=1)
    # Every family either has stochastic depth and checks the rate, or says it has none.
    with torch.device("meta"):
        try:
            create(name, drop_path_rate=0.1)
        except TypeError as e:
            assert re.fullmatch(
                rf"{name} got an unexpected keyword argument 'drop_path_rate'\. 'drop_path_rate' "
                r"is an argument of [\w, ]+, not of \w+\. \w+ takes: (\w+, )*out_features, .*\.",
                str(e),
            ), str(e)
            return
        for rate in (1.0, -0.5, float("nan")):
            with pytest.raises(
                ValueError, match=rf"drop_path_rate must be in \[0, 1\), got {rate}"
            ):
                create(name, drop_path_rate=rate)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"drop_path_rate": 1.0}, r"drop_path_rate must be in \[0, 1\), got 1.0"),
        ({"frozen_stages": 5}, r"frozen_stages=5 but ResNet has 4 stages; use -1..4"),
        ({"frozen_stages": -2}, r"frozen_stages must be -1 \(nothing frozen\)"),
        ({"in_chans": 0}, "in_chans must be a positive int, got 0"),
        ({"out_features": ("C3", "C3")}, r"out_features has duplicates"),
        ({"out_features": ()}, r"asks for nothing"),
    ],
)
def test_bad_arguments(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message), torch.device("meta"):
        create("resnet18", **kwargs)


def test_drop_path_rate_is_linear_over_blocks() -> None:
    model = create("resnet50", drop_path_rate=0.2)
    rates = [
        block.drop_path.p
        for stage in model.stages
        for block in stage
        if hasattr(block, "drop_path")
    ]
    assert len(rates) == 16 and rates[0] == 0.0 and rates[-1] == pytest.approx(0.2)
    assert rates == sorted(rates)


def test_cli_list(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["list", "resnet5*"]) == 0
    out = capsys.readouterr().out
    assert "resnet50" in out and "512" in out and "1024" in out and "2048" in out
    assert "resnet18" not in out
    assert main(["list", "densenet1[26]1"]) == 0  # C3, C4, C5 channels of both
    out = capsys.readouterr().out
    assert "│ densenet121 │ 512 │ 1024 │ 1024 │" in out
    assert "│ densenet161 │ 768 │ 2112 │ 2208 │" in out


def test_cli_demo(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "resnet18", "--size", "64", "--batch", "1"]) == 0
    out = capsys.readouterr().out
    assert "(1, 128, 8, 8)" in out and "(1, 256, 4, 4)" in out and "(1, 512, 2, 2)" in out


def test_cli_reports_errors(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "resnet05"]) == 1
    assert "Did you mean: resnet50" in capsys.readouterr().out

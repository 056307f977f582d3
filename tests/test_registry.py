"""Registry and constructor arguments: names, filters and clear errors."""

from __future__ import annotations

import pytest
import torch

from backbones import create, list_backbones
from backbones.__main__ import main

RESNETS = [
    "resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "resnext50_32x4d",
    "resnext101_32x8d", "resnext101_64x4d", "wide_resnet50_2", "wide_resnet101_2",
]  # fmt: skip


def test_list_backbones() -> None:
    assert set(RESNETS) <= set(list_backbones())
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
    with pytest.raises(TypeError, match="unexpected keyword argument 'out_feature'"):
        create("resnet18", out_feature=("C5",))


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


def test_cli_demo(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "resnet18", "--size", "64", "--batch", "1"]) == 0
    out = capsys.readouterr().out
    assert "(1, 128, 8, 8)" in out and "(1, 256, 4, 4)" in out and "(1, 512, 2, 2)" in out


def test_cli_reports_errors(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "resnet05"]) == 1
    assert "Did you mean: resnet50" in capsys.readouterr().out

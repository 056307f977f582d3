"""export: ONNX and torch.export .pt2 with dynamic batch and size, verified against eager."""

from __future__ import annotations

import importlib.util
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from backbones import convnext, create, densenet, get_entry, list_backbones, resnet, vgg
from backbones.__main__ import main
from backbones.convnext import ConvNeXt
from backbones.densenet import DenseNet
from backbones.efficientnet import EFFICIENTNET_B0, EfficientNet
from backbones.mobilenet import MOBILENET_V2, MOBILENET_V3_SMALL, MobileNetV2, MobileNetV3
from backbones.resnet import ResNet
from backbones.tools.export import ExportError, export, export_program, require_onnx
from backbones.vgg import VGG


def _shallow(cfg, **changes):
    return replace(cfg, **changes)


# Each family's own class with one block per stage: tracing takes seconds per hundred ops
# (registered convnext_tiny: about 60 s for pt2 + ONNX on one core), and the code exported is
# the same. One entry per family class; the test below checks that none is missing.
SHALLOW = {
    ResNet: lambda: ResNet(_shallow(resnet.CFGS["resnet50"], depths=(1, 1, 1, 1))),
    VGG: lambda: VGG(_shallow(vgg.CFGS["vgg11_bn"], depths=(1, 1, 1, 1, 1))),
    DenseNet: lambda: DenseNet(_shallow(densenet.CFGS["densenet121"], depths=(2, 2, 2, 2))),
    ConvNeXt: lambda: ConvNeXt(_shallow(convnext.CFGS["convnext_tiny"], depths=(1, 1, 1, 1))),
    MobileNetV2: lambda: MobileNetV2(
        _shallow(MOBILENET_V2, stages=tuple(replace(s, depth=1) for s in MOBILENET_V2.stages))
    ),
    MobileNetV3: lambda: MobileNetV3(  # the first block of each row keeps every stride
        _shallow(
            MOBILENET_V3_SMALL,
            blocks=tuple(
                b
                for i, b in enumerate(MOBILENET_V3_SMALL.blocks)
                if i == 0 or b.out_channels != MOBILENET_V3_SMALL.blocks[i - 1].out_channels
            ),
        )
    ),
    EfficientNet: lambda: EfficientNet(
        _shallow(EFFICIENTNET_B0, stages=tuple(replace(s, depth=1) for s in EFFICIENTNET_B0.stages))
    ),
}


# ONNX conversion costs 5-13 s per family on one core, so it runs for the families that
# together hold every op kind (conv, BatchNorm, ReLU, floor and ceil max-pools, ceil avg-pool,
# concat, pad, LayerNorm, Linear, GELU, SiLU, Hardswish, Hardsigmoid, the squeeze-excite
# mean, in-place residual adds). ResNet adds nothing to them and MobileNetV2 only ReLU6
# (ONNX Clip): pt2 only for those two (both passed ONNX when the exporter was added).
ONNX_FAMILIES = {VGG, DenseNet, ConvNeXt, MobileNetV3, EfficientNet}


def test_every_family_is_exported() -> None:
    assert {get_entry(name).family for name in list_backbones()} == set(SHALLOW)


@pytest.mark.slow
@pytest.mark.parametrize("family", SHALLOW, ids=lambda f: f.__name__)
def test_export_pt2_and_onnx(family: type, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = SHALLOW[family]().eval()
    example = torch.randn(2, 3, 64, 64)
    program = export_program(model, example)
    for format in ("pt2", "onnx") if family in ONNX_FAMILIES else ("pt2",):
        checks = export(model, tmp_path / f"model.{format}", example, format, program=program)
        assert (tmp_path / f"model.{format}").stat().st_size > 0
        # the traced shape and another batch and non-square size: the dims are dynamic
        assert [c.shape for c in checks] == [(2, 3, 64, 64), (3, 3, 96, 112)]
        assert all(c.max_rel_diff <= 1e-4 for c in checks), checks


def test_export_refuses_train_mode() -> None:
    with pytest.raises(ExportError, match=r"ResNet is in train mode.*Call model\.eval\(\) first"):
        export_program(create("resnet18", out_features=("C3",)), torch.randn(2, 3, 32, 32))


def test_missing_onnxruntime(monkeypatch: pytest.MonkeyPatch, capsys, tmp_path: Path) -> None:
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a: None if n == "onnxruntime" else find_spec(n, *a)
    )
    message = r"onnxruntime is not installed\. Install them with `pip install onnx onnxscript onnxruntime`"
    with pytest.raises(ExportError, match=message):
        require_onnx()
    assert main(["export", "resnet18", "--out", str(tmp_path / "m.onnx")]) == 1
    assert "pip install onnx onnxscript onnxruntime" in capsys.readouterr().out


def test_export_command_errors(capsys, tmp_path: Path) -> None:
    assert main(["export", "mobilenet_v3_larg", "--out", str(tmp_path / "m.pt2")]) == 1
    assert "unknown backbone 'mobilenet_v3_larg'. Did you mean: mobilenet_v3_large" in (
        capsys.readouterr().out
    )
    assert main(["export", "resnet18", "--format", "pt2", "--out", "m.pt2", "--size", "0"]) == 1
    assert "resnet18 needs inputs of at least 1x1 pixels" in capsys.readouterr().out
    with pytest.raises(ExportError, match="unknown export format 'tflite'"):
        export(create("resnet18").eval(), tmp_path / "m.tflite", torch.randn(1, 3, 32, 32))


@pytest.mark.slow
def test_export_command(capsys, tmp_path: Path) -> None:
    out = tmp_path / "m.pt2"
    args = ["export", "resnet18", "--format", "pt2", "--out", str(out), "--size", "64", "--fuse"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "input (1, 3, 64, 64): max abs diff" in printed
    assert "input (2, 3, 96, 112): max abs diff" in printed
    program = torch.export.load(out)
    # the norms are folded into the convs: standard convs, no batch norm left in the graph
    targets = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert "aten.conv2d.default" in targets and not any("batch_norm" in t for t in targets)
    assert set(program.module()(torch.randn(1, 3, 70, 50))) == {"C3", "C4", "C5"}

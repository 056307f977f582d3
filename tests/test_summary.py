"""summary: shapes, parameters, FLOPs and receptive fields of every backbone (on meta)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from backbones import Backbone, create
from backbones.__main__ import main
from backbones.tools.summary import meta_backbone, minimum_size, receptive_field, summarize


def test_summary_matches_the_contract(name: str) -> None:
    levels = summarize(name, 64, 96)
    model = meta_backbone(name)
    assert [lv.name for lv in levels] == [f.name for f in model.feature_info]
    for level, info in zip(levels, model.feature_info, strict=True):
        stride = info.stride
        assert level.shape == (1, info.channels, math.ceil(64 / stride), math.ceil(96 / stride))
        assert level.effective_stride == (stride, stride)
        assert level.flops > 0 if level.params else level.flops == 0  # VGG's C5: pool5 alone
    assert sum(lv.params for lv in levels) == sum(p.numel() for p in model.parameters())
    fields = [lv.receptive_field[0] for lv in levels]
    assert fields == sorted(fields) and len(set(fields)) == len(fields)


def test_known_receptive_fields() -> None:
    with torch.device("meta"):
        three = nn.Sequential(*(nn.Conv2d(3, 3, 3, padding=1) for _ in range(3)))
        assert receptive_field(three, 32, 32).size == (7, 7)
        dilated = nn.Sequential(nn.Conv2d(3, 3, 3, padding=2, dilation=2), nn.MaxPool2d(2))
        assert receptive_field(dilated, 32, 32).size == (6, 6)  # 5, then +1 by the pool
        vgg = create("vgg16")
    # VGG16's conv5_3 (Simonyan & Zisserman 2014), our C4, sees 196 pixels; C5 is after pool5.
    conv5_3 = nn.Sequential(vgg.stem, *vgg.stages[:4])
    assert receptive_field(conv5_3, 224, 224).size == (196, 196)
    assert [lv.receptive_field[0] for lv in summarize("vgg16", 224)] == [14, 40, 92, 196, 212]
    # ResNet-50 v1.5 (stride in the 3x3 conv): C5 sees 427 pixels
    assert [lv.receptive_field[0] for lv in summarize("resnet50", 224)] == [7, 35, 91, 267, 427]


@torch.no_grad()
def _gradient_field(name: str, level: str, size: int) -> int:
    """The exact receptive field: how many input rows the centre output pixel depends on,
    with positive weights, identity norms, and max-pools swapped for average pools (whose
    gradient reaches every pixel of the window, where a max-pool's reaches only one)."""
    model = create(name, out_features=(level,)).double().eval()
    for module in list(model.modules()):
        for key, child in module.named_children():
            if isinstance(child, nn.MaxPool2d):
                pool = nn.AvgPool2d(child.kernel_size, child.stride, child.padding, child.ceil_mode)
                setattr(module, key, pool)
        if isinstance(module, nn.Conv2d):
            module.weight.fill_(1.0 / module.weight[0].numel())
    x = torch.ones(1, 3, size, size, dtype=torch.double, requires_grad=True)
    with torch.enable_grad():
        out = model(x)[level]
        out[0, :, out.shape[2] // 2, out.shape[3] // 2].sum().backward()
    rows = x.grad[0].abs().sum(dim=(0, 2)).nonzero()
    assert rows.min() > 0 and rows.max() < size - 1, "field clipped: use a larger input"
    return int(rows.max() - rows.min() + 1)


@pytest.mark.parametrize(
    ("name", "level", "size"), [("resnet18", "C3", 192), ("densenet121", "C2", 128)]
)
def test_receptive_field_equals_the_gradient_support(name: str, level: str, size: int) -> None:
    computed = next(lv for lv in summarize(name, size) if lv.name == level).receptive_field
    assert computed == (_gradient_field(name, level, size),) * 2


def test_squeeze_excite_is_global_context() -> None:
    levels = {lv.name: lv for lv in summarize("mobilenet_v3_large", 64)}
    assert not levels["C2"].global_context  # no squeeze-excite in the first blocks
    assert levels["C3"].global_context
    assert not any(lv.global_context for lv in summarize("resnet18", 64))


class _FloorPools(Backbone):
    """Five floor-mode 2x2 max-pools: levels vanish below 32x32."""

    def __init__(self) -> None:
        super().__init__(out_features=("C5",))
        self.stem = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.MaxPool2d(2))
        self.add_level(4, stride=2)
        self.stages = nn.ModuleList()
        for k in range(2, 6):
            self.stages.append(nn.MaxPool2d(2))
            self.add_level(4, stride=2**k)
        self.finalize()


def test_minimum_size() -> None:
    with torch.device("meta"):
        assert minimum_size(_FloorPools()) == 32
    assert minimum_size(meta_backbone("resnet18")) == 1  # ceil-mode levels: any size runs
    with pytest.raises(
        ValueError, match=r"resnet18 needs inputs of at least 1x1 pixels .* got 0x5"
    ):
        summarize("resnet18", 0, 5)


def test_summary_command(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["summary", "resnet18", "--size", "64x96"]) == 0
    out = capsys.readouterr().out
    assert "receptive field" in out and "C5" in out and "512x2x3" in out
    assert main(["summary", "resnet05"]) == 1
    assert "unknown backbone 'resnet05'. Did you mean: resnet50" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["summary", "resnet18", "--size", "big"])
    assert "expected SIZE or HxW" in capsys.readouterr().err

"""bench: the command runs every variant and writes the table and the plot (no timed asserts)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from backbones import create
from backbones.__main__ import main
from backbones.tools.bench import _like_ours, _PeakMemory, _WithReLU, build_implementations


def test_bench_command_writes_results(tmp_path: Path) -> None:
    args = ["bench", "--models", "mobilenet_v3_small", "--batch", "1", "--size", "32"]
    assert main([*args, "--repeats", "2", "--warmup", "1", "--out-dir", str(tmp_path)]) == 0
    table = (tmp_path / "RESULTS.md").read_text()
    assert "mallopt(M_MMAP_MAX=0" in table
    for setting in ("contiguous", "channels_last", "fused channels_last"):
        assert f"| mobilenet_v3_small | ours | {setting} |" in table
    assert "| mobilenet_v3_small | torchvision | channels_last |" in table
    assert "| mobilenet_v3_small | ours fused / torchvision's best |" in table
    assert (tmp_path / "throughput_cpu.png").read_bytes()[:4] == b"\x89PNG"


def test_peak_memory_counts_live_tensors() -> None:
    def run() -> None:
        a = torch.ones(1024, 256)  # 1 MiB
        b = a * 2  # 1 MiB more while a lives
        del a, b
        torch.ones(1024, 256)  # reuses the freed budget

    mode = _PeakMemory()
    with mode:
        run()
    assert mode.peak == 2 * 2**20


def test_torchvision_side_computes_our_c5() -> None:
    # torchvision's DenseNet applies the final ReLU in forward, outside `features`: the bench
    # adds it, so both sides do the same work (and the outputs are checked to agree)
    implementations = build_implementations("densenet121")
    assert isinstance(implementations["torchvision"], _WithReLU)
    x = torch.randn(1, 3, 64, 64)
    with torch.inference_mode():
        ours = implementations["ours"](x)["C5"]
        torch.testing.assert_close(implementations["torchvision"](x), ours)


def test_different_computation_is_refused() -> None:
    ours = create("resnet18", out_features=("C5",)).eval()
    with pytest.raises(RuntimeError, match="do not compute our C5"):
        _like_ours(nn.Conv2d(3, 512, 32, stride=32), ours, "resnet18")

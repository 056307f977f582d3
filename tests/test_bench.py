"""bench: every variant is checked against ours eager, then timed; the table and the plot are
written (structure and numerical checks asserted, never timings)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from backbones import create
from backbones.__main__ import main
from backbones.tools import bench
from backbones.tools.bench import BenchError, Row, build_implementations, variants
from backbones.tools.export import Check

LABELS = list(bench.VARIANTS.values())


def _table_rows(text: str, model: str) -> dict[str, list[str]]:
    """variant label -> the cells of its row in the Markdown table."""
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if cells[0] == model:
            rows[cells[1]] = cells
    return rows


@pytest.mark.slow
def test_bench_command_writes_results(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # the compiler's own backend would take minutes here; dynamo with the eager backend still
    # traces our model and goes through the same check and timing
    monkeypatch.setattr(bench, "compile_model", lambda m: torch.compile(m, backend="eager"))
    args = ["bench", "--models", "resnet18", "--batch", "1", "--size", "64", "--clock", "cpu"]
    assert main([*args, "--repeats", "1", "--warmup", "0", "--out-dir", str(tmp_path)]) == 0
    text = (tmp_path / "RESULTS.md").read_text()
    assert "mallopt(M_MMAP_MAX=0" in text and "## cpu" in text and "; cpu clock" in text
    assert "| model | variant | input | ms / batch | img/s | vs torchvision eager |" in text
    rows = _table_rows(text, "resnet18")
    assert list(rows) == LABELS
    assert rows["torchvision eager"][5] == "1.00x"
    assert rows["ours ONNX Runtime"][2] == "fp32 NCHW"
    assert all(rows[label][2] == "fp32 channels_last" for label in LABELS[:4])
    for cells in rows.values():
        assert cells[5].endswith("x") and float(cells[5][:-1]) > 0
        assert float(cells[6]) <= bench.TOLERANCE[torch.float32]  # checked against ours eager
    assert (tmp_path / "throughput_cpu.png").read_bytes()[:4] == b"\x89PNG"


class _Off(nn.Module):
    """A model whose C5 is 1% off ours."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"C5": self.model(x)["C5"] * 1.01}


def test_a_variant_that_disagrees_stops_the_bench(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bench, "compile_model", _Off)
    with pytest.raises(BenchError, match=r"resnet18: ours torch.compile differs from ours eager"):
        variants("resnet18", 1, 32, torch.device("cpu"), ["eager", "compile"])


def test_an_onnx_export_that_disagrees_stops_the_bench(monkeypatch: pytest.MonkeyPatch) -> None:
    off = Check(shape=(1, 3, 32, 32), max_abs_diff=0.5, max_rel_diff=0.01)
    monkeypatch.setattr(bench, "export", lambda *args, **kwargs: [off])
    with pytest.raises(BenchError, match=r"ONNX export of ResNet differs from eager"):
        variants("resnet18", 1, 32, torch.device("cpu"), ["eager", "onnxruntime"])


def test_unknown_variants_are_refused(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "--models", "resnet18", "--variants", "eager,tensorrt"]) == 1
    printed = " ".join(capsys.readouterr().out.split())  # rich wraps long lines
    assert (
        "--variants: tensorrt not available on cpu; choose from "
        "torchvision,eager,fused,compile,onnxruntime"
    ) in printed


def test_results_keep_the_other_devices_section(tmp_path: Path) -> None:
    def rows(model: str) -> list[Row]:
        return [Row(model, "ours eager", "fp32 channels_last", 2.0, 1.0, 3.0, 4.0, None, 0.0)]

    markdown, plot = tmp_path / "RESULTS.md", tmp_path / "plot.png"
    bench.write_results(rows("resnet50"), ["on the GPU"], markdown, plot, "cuda")
    bench.write_results(rows("resnet18"), ["on the CPU"], markdown, plot, "cpu")
    bench.write_results(rows("resnet34"), ["on the CPU again"], markdown, plot, "cpu")
    text = markdown.read_text()
    assert text.index("## cpu") < text.index("## cuda")
    assert "on the GPU" in text and "| resnet50 | ours eager |" in text
    assert "on the CPU again" in text and "| resnet34 | ours eager |" in text
    assert "| resnet18 |" not in text and "| 2.0 [1.0-3.0] | 4.0 | - | 0.0e+00 |" in text


def test_torchvision_side_computes_our_c5() -> None:
    # torchvision's DenseNet applies the final ReLU in forward, outside `features`: the bench
    # adds it, so both sides do the same work (and the outputs are checked to agree)
    implementations = build_implementations("densenet121")
    assert isinstance(implementations["torchvision"], bench.WithReLU)
    x = torch.randn(1, 3, 64, 64)
    with torch.inference_mode():
        ours = implementations["eager"](x)["C5"]
        torch.testing.assert_close(implementations["torchvision"](x), ours)


def test_different_computation_is_refused() -> None:
    ours = create("resnet18", out_features=("C5",)).eval()
    with pytest.raises(RuntimeError, match="do not compute our C5"):
        bench.like_ours(nn.Conv2d(3, 512, 32, stride=32), ours, "resnet18")

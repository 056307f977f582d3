"""The training benchmark and the GPU script, run on CPU with tiny settings."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

from backbones.tools.bench import TRAINING_SECTION, Row, write_results
from benchmarks.training import update_results

ROOT = Path(__file__).resolve().parents[1]
TINY = "trainer.accelerator=cpu data.image_size=16 data.batch_size=2 trainer.log_every_n_steps=1"


def test_both_benchmarks_keep_their_sections_of_results_md(tmp_path: Path) -> None:
    results = tmp_path / "RESULTS.md"
    rows = [Row("resnet18", "ours eager", "fp32 channels_last", 10, 9, 11, 800, 1.0, 0.0)]
    write_results(rows, ["- inference run"], results, tmp_path / "plot.png", "cpu")
    update_results(results, ["| first training table |"])
    update_results(results, ["| second training table |"])  # replaces the first
    write_results(rows, ["- inference rerun"], results, tmp_path / "plot.png", "cpu")
    text = results.read_text()
    assert text.startswith("# Backbone inference benchmark") and "inference rerun" in text
    assert text.count(TRAINING_SECTION) == 1 and "first training" not in text
    assert text.rstrip().endswith("| second training table |")


@pytest.mark.slow
def test_the_gpu_script_runs_every_step_on_cpu(tmp_path: Path) -> None:
    """benchmarks/gpu.sh with tiny settings: every step exits 0, within the 8 files it may write."""
    out = tmp_path / "out"
    env = {
        **os.environ,
        "OUT": str(out),
        "PYTHON": str(Path(os.sys.executable)),
        "R50": "backbone=resnet18",
        "MBV3": "backbone=mobilenetv3 head=fpn",
        "BENCH_FLAGS": "--rounds 1 --warmup 1 --steps 1",
        "TRAIN_ARGS": "trainer.max_epochs=1 data.num_train=4 data.num_val=2 data.num_test=2 "
        f"paths.outputs={tmp_path}/outputs",  # not the checkout's outputs/
        "COMPILE_ARGS": "--help",  # compiling on CPU takes minutes; the step's plumbing is tested
        "EXTRA": TINY + " trainer.enable_progress_bar=false",
        "PYTHONPATH": str(ROOT),
        "OMP_NUM_THREADS": "1",  # a timing-free check: no thread contention on a busy machine
        "FOLDER_FILES": "1000",  # 9 JPEGs a class in train, 1 in val, 100 classes
        "FOLDER_PHOTOS": "2",  # links to 8 x 3 generated photographs
        "FOLDER_ARGS": "backbone=resnet18 trainer.max_epochs=1 +trainer.limit_train_batches=2 "
        f"+trainer.limit_val_batches=1 pictures=false paths.outputs={tmp_path}/outputs",
        **{f"T_{step}": "600" for step in ("BENCH_R50", "TRAIN", "BENCH_MBV3", "COMPILE", "JPEGS")},
    }
    subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu.sh")], env=env, check=True, timeout=900)
    files = sorted(p.name for p in out.iterdir())
    assert len(files) <= 8 and {"summary.txt", "logs.txt", "bench_resnet50.md"} <= set(files)
    summary = (out / "summary.txt").read_text()
    steps = re.findall(r"^-- (\w+): exit (\d+)", summary, re.MULTILINE)
    assert steps == [
        ("bench_resnet50", "0"),
        ("train_defaults", "0"),
        ("bench_mobilenetv3_fpn", "0"),
        ("train_compile", "0"),
        ("make_jpegs", "0"),
        ("jpegs_decode_worker", "0"),
        ("jpegs_decode_device", "0"),
    ], summary
    # The tables, with the bare loop making no host sync and each Lightning run one per step
    # (log_every_n_steps=1 here).
    rows = [line for line in summary.splitlines() if line.startswith(("| resnet50", "| mobilenet"))]
    assert len(rows) == 2, summary
    for row in rows:
        assert row.rstrip(" |").endswith("0.00 / 1.00 / 1.00"), row
    assert summary.count("best val/acc") == 1
    # train_defaults and both JPEG epochs (one with the batch decoded where the model runs)
    assert len(re.findall(r"^fit: [\d.]+ s, [\d.]+ train img/s$", summary, re.MULTILINE)) == 3

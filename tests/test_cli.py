"""train.py and eval.py as commands: --help without torch, errors without traceback, train.log."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "lightning", "torchvision", "torchmetrics", "backbones", "heads")


def run(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=300
    )


def imported(importtime: str) -> set[str]:
    """The modules a `python -X importtime` run imported, from its stderr."""
    return {
        line.rsplit("|", 1)[1].strip()
        for line in importtime.splitlines()
        if line.startswith("import time:") and "|" in line
    }


@pytest.mark.parametrize(
    "command", [("train.py", "--help"), ("eval.py", "--help"), ("train.py", "-sc", "install=bash")]
)
def test_help_and_completion_import_no_torch(command: tuple[str, ...]) -> None:
    """`--help` and tab completion compose the config and stop: Lightning and torch (seconds to
    import) are never loaded for them."""
    done = run("-X", "importtime", *command)
    assert done.returncode == 0, done.stderr[-2000:]
    heavy = sorted(m for m in imported(done.stderr) if m.split(".")[0] in HEAVY)
    assert heavy == [], heavy[:10]
    assert "hydra" in imported(done.stderr)


def test_a_user_error_is_one_line_in_the_terminal_and_in_train_log(tmp_path: Path) -> None:
    done = run(
        str(ROOT / "train.py"), "data.batch_size=0", f"paths.outputs={tmp_path}", cwd=tmp_path
    )
    assert done.returncode == 1
    assert "Traceback" not in done.stderr + done.stdout
    assert done.stderr == (
        "error: data.batch_size=0 cannot work: it is the number of images per batch (per "
        "device), an integer >= 1\n"
    )
    (log,) = tmp_path.glob("resnet18-classification/*/train.log")
    assert "[ERROR] - error: data.batch_size=0 cannot work" in log.read_text()


@pytest.mark.slow
def test_train_log_holds_the_run(tmp_path: Path) -> None:
    """Lightning's messages and the final metrics reach <run dir>/train.log, and are printed once."""
    done = run(
        str(ROOT / "train.py"),
        "data.image_size=32",
        "data.num_train=8",
        "data.num_val=8",
        "data.num_test=8",
        "data.batch_size=4",
        "trainer.fast_dev_run=true",
        "trainer.accelerator=cpu",
        "trainer.enable_progress_bar=false",
        "trainer.enable_model_summary=false",
        "callbacks=none",
        f"paths.outputs={tmp_path}",
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    (log,) = tmp_path.glob("resnet18-classification/*/train.log")
    text = log.read_text()
    assert "[lightning.pytorch.utilities.rank_zero][INFO] - GPU available:" in text
    assert "Running in `fast_dev_run` mode" in text
    assert "final metrics" in text and "val/acc" in text
    printed = done.stdout + done.stderr
    assert printed.count("GPU available:") == 1  # Lightning's own handler does not print it again

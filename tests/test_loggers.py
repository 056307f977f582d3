"""zootrain.loggers.CSVLogger: a run resumed in its own directory keeps its metric history."""

from __future__ import annotations

import csv
from pathlib import Path

from zootrain.checkpoints import load_checkpoint
from zootrain.loggers import ROWS_KEY
from zootrain.run import train

from .test_training import TINY, config


def rows(run: Path) -> list[dict[str, str]]:
    with (run / "metrics.csv").open(newline="") as f:
        return list(csv.DictReader(f))


def layout(table: list[dict[str, str]]) -> list[tuple[str, str, tuple[str, ...]]]:
    """Each row's epoch, step and the metrics it holds (not their values)."""
    return [(r["epoch"], r["step"], tuple(k for k, v in r.items() if v)) for r in table]


def test_resumed_fit_keeps_the_rows_before_its_checkpoint(tmp_path: Path) -> None:
    """1 epoch, then resumed to 2 in the same directory: epoch 0's rows exactly as first written
    (its training mean, logged after the checkpoint, kept), then epoch 1's, each once."""
    first = config(tmp_path, *TINY, "scheduler=none", "trainer.max_epochs=1")
    run = Path(train(first).output_dir)
    before = rows(run)
    last = run / "checkpoints" / "last.ckpt"
    saved_rows = load_checkpoint(last).get(ROWS_KEY)
    resumed = config(tmp_path, *TINY, "scheduler=none", "trainer.max_epochs=2", f"ckpt_path={last}")
    train(resumed)
    after = rows(run)
    assert after[: len(before)] == before
    # Epoch 1 logs what epoch 0 did, 4 steps on (TINY: 128 images in batches of 32).
    again = [("1", str(int(step) + 4), keys) for _, step, keys in layout(before)]
    assert layout(after) == layout(before) + again
    assert saved_rows == len(before) - 1  # epoch 0's training mean was logged after last.ckpt
    history = load_checkpoint(last)["callbacks"]["MetricsPlot"]["history"]  # the plot's
    assert [epoch for epoch, _ in history["train/loss"]] == [0, 1]


def test_fit_from_scratch_starts_a_new_file(tmp_path: Path) -> None:
    """The same run directory trained again without a checkpoint: no rows of the earlier fit."""
    cfg = config(tmp_path, *TINY, "trainer.max_epochs=1")
    run = Path(train(cfg).output_dir)
    once = rows(run)
    train(cfg)
    assert layout(rows(run)) == layout(once)

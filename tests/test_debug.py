"""configs/debug/: each preset composes and runs (on tiny data), and does what it says."""

from __future__ import annotations

import csv
from pathlib import Path

from zootrain.checkpoints import load_checkpoint
from zootrain.result import RunResult
from zootrain.run import train

from .test_cli import run
from .test_training import LEARNABLE, config

TINY = ["data.image_size=32", "data.num_val=32", "data.num_test=32", "data.batch_size=16"]
TINY += ["trainer.enable_progress_bar=false", "trainer.enable_model_summary=false"]
TINY += ["callbacks=none", "test_after_fit=false"]


def debug_run(tmp_path: Path, preset: str, *overrides: str) -> tuple[RunResult, Path]:
    cfg = config(tmp_path, f"debug={preset}", *TINY, *overrides, run=preset)
    assert cfg.run_name == "debug-resnet18-classification"  # apart from real runs
    assert (cfg.trainer.accelerator, cfg.trainer.deterministic) == ("cpu", True)
    assert (cfg.pictures, cfg.data.num_workers) == (False, 0)
    result = train(cfg)
    return result, Path(result.output_dir)


def rows(run: Path) -> list[dict[str, str]]:
    with (run / "metrics.csv").open(newline="") as f:
        return list(csv.DictReader(f))


def test_default_is_one_deterministic_epoch_without_pictures(tmp_path: Path) -> None:
    result, run = debug_run(tmp_path, "default", "data.num_train=32")
    assert [epoch for epoch, _ in result.monitor_history] == [0]
    assert sorted(p.name for p in run.glob("*.png")) == ["metrics.png"]  # no predictions


def test_fdr_runs_one_batch_and_writes_no_checkpoint(tmp_path: Path) -> None:
    result, run = debug_run(tmp_path, "fdr", "data.num_train=64")
    assert result.best_model_path is None and result.best_score is None
    assert not (run / "checkpoints").exists()


def test_overfit_makes_the_training_loss_fall(tmp_path: Path) -> None:
    """The same 48 images (3 batches of 16) again and again, 6 epochs here (20 in the preset):
    the training loss falls to a fraction of the first epoch's."""
    # mobilenet_v3_small: a 6 MB checkpoint an epoch, not resnet18's 45 MB
    small = ["backbone=mobilenetv3_small", *LEARNABLE[:2], "trainer.max_epochs=6"]
    cfg = config(tmp_path, "debug=overfit", *TINY, *small)
    assert (cfg.data.num_train, cfg.data.batch_size, cfg.data.augment) == (48, 16, False)
    assert cfg.scheduler.name == "none"
    cfg.trainer.deterministic = False  # twice as fast; what this test checks does not need it
    run = Path(train(cfg).output_dir)
    losses = [float(r["train/loss_epoch"]) for r in rows(run) if r["train/loss_epoch"]]
    assert len(losses) == 6
    assert min(losses[-3:]) < 0.5 * losses[0], losses


def test_limit_runs_two_short_epochs(tmp_path: Path) -> None:
    _, run = debug_run(tmp_path, "limit", "data.num_train=128")
    last = load_checkpoint(run / "checkpoints" / "last.ckpt")
    assert (last["epoch"], last["global_step"]) == (1, 6)  # 2 epochs of 3 batches (of 8)


def test_profiler_writes_its_report_into_the_run_directory(tmp_path: Path) -> None:
    _, run = debug_run(tmp_path, "profiler", "data.num_train=32")
    report = (run / "fit-profiler.txt").read_text()
    assert "Profiler Report" in report and "run_training_epoch" in report
    # A profiled run's checkpoint is read back (eval.py, resume): its profiler is allowed.
    config_stored = load_checkpoint(run / "checkpoints" / "last.ckpt")["hyper_parameters"]
    assert "SimpleProfiler" in config_stored["config"]["trainer"]["profiler"]["_target_"]


def test_help_documents_every_preset() -> None:
    done = run("train.py", "--help")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "debug: default, fdr, limit, overfit, profiler" in done.stdout  # Hydra's group list
    for preset in ("default", "fdr", "overfit", "limit", "profiler"):
        assert f"debug={preset}:" in done.stdout, preset  # what each does

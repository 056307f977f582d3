"""zootrain/sweep.py: each job's result file, and the summary gathered from a sweep directory."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from zootrain.sweep import JobResult, SweepSummary, one_line, read_results, write_job_result

from .test_plots import assert_drawn

COMMON = ["data.image_size=32", "trainer.max_epochs=3"]


def job(sweep: Path, number: int, result: JobResult | None, overrides: list[str]) -> Path:
    """A job directory as Hydra leaves it, with or without the job's result file."""
    directory = sweep / f"{number}-resnet18-classification"
    (directory / ".hydra").mkdir(parents=True)
    (directory / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    if result is not None:
        write_job_result(directory, result)
    return directory


def ok(number: int, lr: str, score: float, best_epoch: int) -> JobResult:
    history = [(e, score * (e + 1) / best_epoch) for e in range(best_epoch)]
    return JobResult(
        job=number,
        status="ok",
        overrides=[*COMMON, f"optim.lr={lr}"],
        seconds=12.5,
        monitor="val/acc",
        mode="max",
        best_score=score,
        best_epoch=best_epoch,
        best_checkpoint=f"/sweep/{number}/checkpoints/best.ckpt",
        history=history,
    )


@pytest.fixture()
def sweep(tmp_path: Path) -> Path:
    """Five jobs: two finished, one failed, one killed before it could write its result, one
    finished without a score."""
    sweep = tmp_path / "sweep"
    job(sweep, 0, ok(0, "0.001", 0.62, 3), [*COMMON, "optim.lr=0.001"])
    failed = JobResult(
        job=1,
        status="failed",
        overrides=[*COMMON, "optim.lr=-1"],
        seconds=0.7,
        error=one_line(ValueError("Invalid learning rate: -1\nmore lines")),
    )
    job(sweep, 1, failed, failed.overrides)
    job(sweep, 2, ok(2, "0.0012345678901", 0.81, 2), [*COMMON, "optim.lr=0.0012345678901"])
    job(sweep, 3, None, [*COMMON, "optim.lr=0.1"])
    unscored = JobResult(  # e.g. trainer.fast_dev_run: no checkpoint, so no best score
        job=4, status="ok", overrides=[*COMMON, "optim.lr=0.01"], seconds=2.0, monitor="val/acc"
    )
    job(sweep, 4, unscored, unscored.overrides)
    (sweep / "multirun.yaml").write_text("{}")  # files beside the job directories are skipped
    return sweep


def test_results_are_read_back_from_every_job_directory(sweep: Path) -> None:
    results = {r.job: r for r in read_results(sweep)}
    assert sorted(results) == [0, 1, 2, 3, 4]
    assert results[2].history == [(0, 0.405), (1, 0.81)]
    assert results[1].error == "ValueError: Invalid learning rate: -1"
    assert results[3].status == "failed" and "no result.json" in results[3].error


@pytest.mark.parametrize("optuna", [False, True])
def test_summary_ranks_the_jobs_best_first_and_failed_last(
    sweep: Path, optuna: bool, capsys: pytest.CaptureFixture
) -> None:
    callback = SweepSummary()
    sweeper = "hydra_plugins.hydra_optuna_sweeper.optuna_sweeper.OptunaSweeper" if optuna else ""
    config = {"hydra": {"sweep": {"dir": str(sweep)}, "sweeper": {"_target_": sweeper}}}
    callback.on_multirun_start(OmegaConf.create(config))
    callback.on_multirun_end(OmegaConf.create(config))

    with (sweep / "summary.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [(r["job"], r["status"]) for r in rows] == [
        ("2", "ok"),
        ("0", "ok"),
        ("4", "ok"),
        ("1", "failed"),
        ("3", "failed"),
    ]
    assert rows[0]["overrides"] == "optim.lr=0.0012345678901"  # only what differs
    assert (float(rows[0]["best_score"]), int(rows[0]["best_epoch"])) == (0.81, 2)
    assert rows[3]["error"] == "ValueError: Invalid learning rate: -1"
    markdown = (sweep / "summary.md").read_text()
    assert "Every job: `data.image_size=32 trainer.max_epochs=3`" in markdown
    assert "| 2 | ok | optim.lr=0.001235 | 0.8100 | 2 | 12 s |" in markdown  # Optuna's floats cut
    assert (
        markdown.index("| 0 | ok") < markdown.index("| 1 | failed") < markdown.index("| 3 | failed")
    )
    assert_drawn(sweep / "summary.png", panels=3 if optuna else 2)
    printed = capsys.readouterr().out
    assert "Invalid learning rate" in printed and "summary.md" in printed

"""A summary of every multirun: one result file per job, gathered when the sweep ends.

Each job of a multirun writes `<job dir>/result.json` (`write_job_result`, called by
`zootrain.launch.multirun_job`), failed jobs too. `SweepSummary`, a Hydra callback
(configs/hydra/default.yaml), reads them back from the sweep directory when the multirun
ends, so it works whichever node each job ran on: `summary.csv`, `summary.md` (one row per
job, best first, failed last), `summary.png` (the jobs compared; under Optuna also the
optimisation history) and the same table on the console.

Hydra skips `on_multirun_end` when a job failed (the basic and submitit launchers re-raise
the job's error first), so the summary is also written at interpreter exit in that case.
"""

from __future__ import annotations

import atexit
import csv
import json
import math
import os
import textwrap
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from backbones.files import atomic_path

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from .result import RunResult

RESULT_FILE = "result.json"
FILES = ("summary.csv", "summary.md", "summary.png")
LEGEND = 10  # jobs drawn in the per-epoch panel


@dataclass
class JobResult:
    """What one job of a sweep reports; `best_epoch` counts from 1."""

    job: int
    status: str  # "ok" or "failed"
    overrides: list[str]
    seconds: float
    monitor: str | None = None
    mode: str = "max"
    best_score: float | None = None
    best_epoch: int | None = None
    best_checkpoint: str | None = None
    error: str | None = None
    history: list[tuple[int, float]] = field(default_factory=list)  # monitor by epoch (from 0)

    @classmethod
    def of_run(cls, run: RunResult, job: int, overrides: list[str], seconds: float) -> JobResult:
        """The row of a job whose run returned `run`."""
        return cls(
            job=job,
            status="ok",
            overrides=overrides,
            seconds=seconds,
            monitor=run.monitor,
            mode=run.mode,
            best_score=run.best_score,
            best_epoch=run.best_epoch,
            best_checkpoint=run.best_model_path,
            history=list(run.monitor_history),
        )


def one_line(error: BaseException) -> str:
    """The error's type and the first line of its message."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__


def write_job_result(directory: str | os.PathLike, result: JobResult) -> Path:
    """`<directory>/result.json`, written atomically."""
    path = Path(directory) / RESULT_FILE
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(asdict(result), indent=1))
    return path


def read_results(sweep_dir: str | os.PathLike) -> list[JobResult]:
    """Every job of the sweep: its result file, or, for a job that started and left none (it
    was killed, or is still running), a failed row with its overrides."""
    results = []
    for job_dir in sorted(Path(sweep_dir).iterdir()):
        overrides_file = job_dir / ".hydra" / "overrides.yaml"
        result_file = job_dir / RESULT_FILE
        if result_file.is_file():
            data = json.loads(result_file.read_text())
            data["history"] = [tuple(p) for p in data.get("history", [])]
            results.append(JobResult(**data))
        elif overrides_file.is_file():
            number = job_dir.name.split("-", 1)[0]
            results.append(
                JobResult(
                    job=int(number) if number.isdigit() else -1,
                    status="failed",
                    overrides=list(yaml.safe_load(overrides_file.read_text()) or []),
                    seconds=float("nan"),
                    error=f"no {RESULT_FILE} in {job_dir.name}: the job was killed or is running",
                )
            )
    return results


def ranked(results: list[JobResult]) -> list[JobResult]:
    """Best first (each by its own monitor's direction), then jobs without a score, failed last."""

    def key(result: JobResult) -> tuple:
        score = result.best_score
        if result.status != "ok" or score is None or not math.isfinite(score):
            return (result.status != "ok", 1, 0.0, result.job)
        return (False, 0, -score if result.mode == "max" else score, result.job)

    return sorted(results, key=key)


def shared_overrides(results: list[JobResult]) -> list[str]:
    """The overrides every job has: the tables show each job's others, what it varies."""
    if not results:
        return []
    return sorted(set.intersection(*(set(r.overrides) for r in results)))


def short(override: str) -> str:
    """`key=value` with long floats (Optuna's samples) cut to 4 significant digits."""
    key, _, value = override.partition("=")
    try:
        number = float(value)
    except ValueError:
        return override
    return f"{key}={number:.4g}" if len(value) > 8 else override


def table_rows(
    results: list[JobResult], sweep_dir: Path | None = None
) -> tuple[list[str], list[list[str]]]:
    """The summary table for people (header, rows), ranked, with the overrides that differ;
    checkpoint paths relative to `sweep_dir` when they are inside it."""
    shared = shared_overrides(results)
    monitors = {r.monitor for r in results if r.monitor}
    score_name = f"best {next(iter(monitors))}" if len(monitors) == 1 else "best score"
    header = ["job", "status", "overrides", score_name, "best epoch", "time", "best checkpoint"]
    header.append("error")
    rows = []
    for r in ranked(results):
        score = "" if r.best_score is None else f"{r.best_score:.4f}"
        if len(monitors) > 1 and r.monitor:
            score += f" ({r.monitor})"
        checkpoint = r.best_checkpoint or ""
        if checkpoint and sweep_dir is not None and Path(checkpoint).is_relative_to(sweep_dir):
            checkpoint = str(Path(checkpoint).relative_to(sweep_dir))
        rows.append(
            [
                str(r.job),
                r.status,
                " ".join(short(o) for o in r.overrides if o not in shared),
                score,
                "" if r.best_epoch is None else str(r.best_epoch),
                f"{r.seconds:.0f} s" if math.isfinite(r.seconds) else "",
                checkpoint,
                r.error or "",
            ]
        )
    return header, rows


def _write_csv(path: Path, results: list[JobResult]) -> None:
    """One row per job, ranked, plain values (numbers as numbers, full paths) for tools."""
    shared = shared_overrides(results)
    fields = ["job", "status", "overrides", "monitor", "best_score", "best_epoch", "seconds"]
    fields += ["best_checkpoint", "error"]
    with atomic_path(path) as tmp, tmp.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(fields)
        for r in ranked(results):
            changed = " ".join(o for o in r.overrides if o not in shared)
            writer.writerow(
                [r.job, r.status, changed, r.monitor or "", _blank(r.best_score),
                 _blank(r.best_epoch), _blank(r.seconds), r.best_checkpoint or "", r.error or ""]
            )  # fmt: skip


def _blank(value: float | None) -> str:
    return "" if value is None or not math.isfinite(value) else repr(value)


def write_summary(sweep_dir: str | os.PathLike, optuna: bool = False) -> list[Path]:
    """summary.csv, summary.md and summary.png of the sweep in `sweep_dir`; prints the table."""
    from rich.console import Console
    from rich.table import Table

    sweep_dir = Path(sweep_dir)
    results = read_results(sweep_dir)
    if not results:
        return []
    header, rows = table_rows(results, sweep_dir)
    csv_path, md_path, png_path = (sweep_dir / name for name in FILES)
    _write_csv(csv_path, results)
    shared = shared_overrides(results)
    failed = sum(r.status != "ok" for r in results)
    lines = [
        f"# Sweep {sweep_dir}: {len(results)} jobs, {failed} failed",
        "",
        f"Every job: `{' '.join(shared)}`" if shared else "",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" for _ in header) + "|",
        *("| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in rows),
        "",
        "Ranked best first, failed jobs last; epochs count from 1; checkpoints are relative to "
        "this directory.",
        "",
        "![the jobs compared](summary.png)",
    ]
    with atomic_path(md_path) as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    written = [csv_path, md_path]
    if any(r.status == "ok" for r in results) or optuna:
        from .plots import save_figure

        written.append(save_figure(plot_sweep(results, optuna, sweep_dir.name), png_path))

    table = Table(title=f"sweep {sweep_dir} ({len(results)} jobs)", title_justify="left")
    for name in header:
        table.add_column(name, overflow="fold")
    for row in rows:
        table.add_row(*row, style="red" if row[1] != "ok" else None)
    console = Console()
    if not console.is_terminal:  # a log file: no terminal width to fit
        console.width = 200
    console.print(table)
    console.print(f"summary: {md_path}")
    return written


def plot_sweep(results: list[JobResult], optuna: bool, name: str) -> Figure:
    """Best score per job (bars, best on top), the monitored metric per epoch of every job, and,
    for Optuna, each trial's score in order with the best so far."""
    from .plots import pyplot

    plt = pyplot()
    order = ranked(results)
    shared = shared_overrides(results)
    panels = 3 if optuna else 2
    figure, axes = plt.subplots(
        1, panels, figsize=(7 * panels, max(3.5, 0.45 * len(order) + 1.8)), layout="constrained"
    )
    bars, curves = axes[0], axes[1]
    labels = {
        r.job: f"{r.job}: " + (" ".join(short(o) for o in r.overrides if o not in shared) or "-")
        for r in order
    }
    scores = [r.best_score if r.status == "ok" and r.best_score is not None else 0 for r in order]
    colours = ["tab:blue" if r.status == "ok" else "lightgray" for r in order]
    rows = range(len(order))
    drawn = bars.barh(rows, scores, color=colours)
    bars.bar_label(
        drawn,
        [
            f"{r.best_score:.4f}" if r.status == "ok" and r.best_score is not None else ""
            for r in order
        ],
        padding=2,
        fontsize="small",
    )
    for row, r in zip(rows, order, strict=True):
        if r.status != "ok":
            # two lines at most, of what fits in the panel (the whole error is in summary.md)
            lines = textwrap.wrap(f"failed: {r.error or ''}", width=48)
            text = "\n".join(lines[:2]) + (" ..." if len(lines) > 2 else "")
            bars.text(0.01, row, text, va="center", color="firebrick", fontsize="small",
                      transform=bars.get_yaxis_transform())  # fmt: skip
    bars.set_yticks(list(rows), [labels[r.job] for r in order], fontsize="small")
    bars.set_xlim(0, 1.18 * max([*scores, 1e-9]))  # room for the value labels
    bars.invert_yaxis()
    monitors = sorted({r.monitor for r in results if r.monitor})
    bars.set_title(f"best {', '.join(monitors) or 'score'} per job (best on top)")
    bars.grid(axis="x", alpha=0.3)

    for r in order[:LEGEND]:  # the best ones; more lines would not read
        if r.history:
            epochs, values = zip(*sorted(r.history), strict=True)
            curves.plot(
                [e + 1 for e in epochs], values, marker="o", markersize=3, label=labels[r.job]
            )
    shown = "" if len(order) <= LEGEND else f", the best {LEGEND} jobs"
    curves.set(title=f"{', '.join(monitors)} per epoch{shown}", xlabel="epoch")
    curves.xaxis.get_major_locator().set_params(integer=True)
    curves.grid(alpha=0.3)
    if curves.lines:
        curves.legend(fontsize="small")

    if optuna:
        history = axes[2]
        trials = sorted((r for r in results if r.status == "ok" and r.best_score is not None),
                        key=lambda r: r.job)  # fmt: skip
        if trials:
            mode = trials[0].mode
            running, best = [], None
            for r in trials:
                score = r.best_score
                better = best is None or (score > best if mode == "max" else score < best)
                best = score if better else best
                running.append(best)
            history.plot([r.job for r in trials], [r.best_score for r in trials], "o",
                         label="trial")  # fmt: skip
            history.step([r.job for r in trials], running, where="post", label="best so far")
            history.legend(fontsize="small")
        history.set(title="optimisation history", xlabel="trial (job number)")
        history.xaxis.get_major_locator().set_params(integer=True)
        history.grid(alpha=0.3)
    failed = sum(r.status != "ok" for r in results)
    figure.suptitle(f"sweep {name}: {len(results)} jobs, {failed} failed")
    return figure


class SweepSummary(Callback):
    """Hydra callback: `write_summary` of the sweep directory when a multirun ends."""

    def __init__(self) -> None:
        self.sweep_dir: Path | None = None
        self.optuna = False

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self.sweep_dir = Path(config.hydra.sweep.dir)
        self.optuna = "optuna" in str(config.hydra.sweeper.get("_target_", "")).lower()
        # A failed job makes the launcher raise before on_multirun_end: write it at exit then.
        atexit.register(self._write)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        self._write()
        atexit.unregister(self._write)

    def _write(self) -> None:
        if self.sweep_dir is not None and self.sweep_dir.is_dir():
            write_summary(self.sweep_dir, self.optuna)

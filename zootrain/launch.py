"""train.py as a Hydra multirun job: DDP ranks, failures that stay in their job, Optuna's space.

Hydra runs the jobs of a multirun (sweeps, Optuna trials) one after the other in this process
(basic launcher) or each in its own (submitit). Lightning's `ddp` strategy starts the ranks > 0
of a job by running `sys.argv` again; under `-m` that would be the whole sweep, so
`multirun_job` hands Lightning this job's own overrides and run directory instead.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import torch.distributed
from hydra.core.hydra_config import HydraConfig
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf, read_write

from .report import is_user_error, user_message
from .result import RunResult
from .sweep import JobResult, one_line, write_job_result

if TYPE_CHECKING:
    from optuna.trial import Trial

log = logging.getLogger(__name__)

DROP_PATH_RANGE = (0.0, 0.3)  # stochastic depth rates worth trying on small data

# Overrides that configure the sweep itself: a rank > 0 of one job runs without them.
_SWEEP_OVERRIDES = ("hydra.mode=", "hydra/launcher", "hydra.launcher.", "hydra/sweeper")
_SWEEP_OVERRIDES += ("hydra.sweeper.", "hydra.sweep.")
# Command-line options (not overrides) that choose the config: kept for the ranks > 0.
_CONFIG_OPTIONS = ("-cp", "--config-path", "-cn", "--config-name", "-cd", "--config-dir")


def drop_path_search_space(cfg: DictConfig, trial: Trial) -> None:
    """Optuna's `custom_search_space`: add `backbone.drop_path_rate` where the backbone has it."""
    backbone = cfg.backbone
    choice = trial.params.get("backbone")
    if choice is not None:  # the backbone option is searched too: look at the chosen one
        from hydra import compose

        backbone = compose(cfg.hydra.job.config_name, overrides=[f"backbone={choice}"]).backbone
    if "drop_path_rate" in backbone:
        trial.suggest_float("backbone.drop_path_rate", *DROP_PATH_RANGE)


def job_command(argv: list[str], hydra: DictConfig) -> list[str]:
    """`argv` as a single run of this job: its config options and resolved overrides, no `-m`."""
    kept, options = [argv[0]], iter(argv[1:])
    for arg in options:
        name = arg.split("=", 1)[0]
        if name in _CONFIG_OPTIONS:
            kept.append(arg)
            if "=" not in arg:
                kept.append(next(options, ""))
    sweep_only = [o for o in hydra.overrides.hydra if o.lstrip("+~").startswith(_SWEEP_OVERRIDES)]
    return [
        *kept,
        *hydra.overrides.task,
        *(o for o in hydra.overrides.hydra if o not in sweep_only),
    ]


class JobRecord:
    """What `multirun_job` yields: the job's `train()` result goes in with `finish`."""

    def __init__(self) -> None:
        self.result: RunResult | None = None

    def finish(self, result: RunResult) -> None:
        self.result = result


@contextmanager
def multirun_job() -> Iterator[JobRecord]:
    """Run one job of a multirun so that DDP works in it and a failure stays in it.

    - Lightning starts the ranks > 0 as `python <sys.argv> hydra.run.dir=<HydraConfig run.dir>`:
      both are pointed at this job (its overrides, its run directory) while it runs.
    - The job's error goes to its own log (`<run dir>/train.log`), and is raised as an exception
      (not `sys.exit`) so that Hydra records the job as failed and runs the others.
    - What DDP leaves in this process (the process group, `MASTER_PORT` and the rank variables
      Lightning sets in `os.environ`, the watcher of the ranks it started) is undone, so the
      next job starts clean on a fresh port.
    - Rank 0 writes `<run dir>/result.json` (`zootrain.sweep`), ok or failed, for the sweep
      summary; `finish` the yielded record with `train()`'s result.
    """
    hydra = HydraConfig.get()
    # hydra.run.dir unresolved: its `run_dir` resolver creates a run directory (of a single run)
    run_dir = OmegaConf.to_container(hydra.run, resolve=False)["dir"]
    argv, environ = sys.argv, dict(os.environ)
    sys.argv = job_command(argv, hydra)
    with read_write(hydra.run):
        hydra.run.dir = hydra.runtime.output_dir
    record, error, start = JobRecord(), None, time.perf_counter()
    try:
        yield record
    except Exception as caught:
        if is_user_error(caught):
            log.error("error: %s", user_message(caught))
        else:
            log.exception("the job failed")
        error = caught
        raise
    except BaseException as caught:  # KeyboardInterrupt, SystemExit: a failed job too
        error = caught
        raise
    finally:
        if rank_zero_only.rank == 0:
            _write_result(hydra, record, error, time.perf_counter() - start)
        sys.argv = argv
        with read_write(hydra.run):
            hydra.run.dir = run_dir
        _retire_rank_watchers()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        os.environ.clear()
        os.environ.update(environ)


def _write_result(
    hydra: DictConfig, record: JobRecord, error: BaseException | None, seconds: float
) -> None:
    common = {"job": hydra.job.num, "overrides": list(hydra.overrides.task), "seconds": seconds}
    result = record.result
    if result is None:
        reason = one_line(error) if error is not None else "stopped before train() returned"
        outcome = JobResult(status="failed", error=reason, **common)
    else:
        outcome = JobResult.of_run(result, **common)
    try:
        write_job_result(hydra.runtime.output_dir, outcome)
    except OSError as problem:  # the job's own outcome matters more than its summary row
        log.warning("could not write the job's result file: %s", problem)


def _retire_rank_watchers(timeout: float = 60.0) -> None:
    """Reap the ranks > 0 of the job that just ended and stop Lightning's watcher of them.

    Lightning's DDP launcher starts a thread that SIGKILLs this process as soon as one of the
    ranks it started exits non-zero (so that a rank hanging in a collective cannot outlive a
    crash). When a job fails, Lightning kills those ranks itself, and the watcher then kills
    the sweep, whose next jobs never run. The job is over here, so the watcher's work is done:
    the ranks are waited for (killed after `timeout`) and the watcher is disarmed.
    """
    from lightning.fabric.strategies.launchers.subprocess_script import _ChildProcessObserver

    for thread in threading.enumerate():
        if isinstance(thread, _ChildProcessObserver):
            # Private Lightning API (lightning<2.7 is pinned; test_scale covers it)
            thread._run = lambda: True  # its loop ends at the next poll, killing nothing
            for process in getattr(thread, "_child_processes", ()):
                try:
                    process.wait(timeout)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()

"""The commands behind train.py and eval.py, and what Hydra needs before it parses their command
line, and nothing heavier.

`python train.py --help` and tab completion compose the config and stop: they must not wait
for torch or Lightning. So this module imports only omegaconf (and run directories' names); it
registers the resolvers the configs use and the warning filters that apply while composing.
The commands import the run (torch, Lightning, the models) once the config's plain values have
passed their checks: a mistyped value fails in a second.
"""

from __future__ import annotations

import functools
import logging
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from .report import user_errors
from .runs import release_run_dir, run_dir, run_log, run_subdir


def train_command(cfg: DictConfig) -> float | None:
    """train.py: the run, its errors as one line (or, in a multirun, recorded in its job), the
    final table; returns the best score (what Hydra's sweepers optimise)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from .checks import check_config
    from .report import print_summary

    if HydraConfig.get().mode == RunMode.MULTIRUN:  # a job's error must not end the sweep
        from .launch import multirun_job

        context = multirun_job()
    else:
        context = user_errors()
    try:
        with context as job:
            check_config(cfg)
            from .run import train

            result = train(cfg)
            if job is not None:  # the job's row in the sweep summary
                job.finish(result)
    finally:  # the lock Hydra's log took (run_log), also when the run never started
        release_run_dir(HydraConfig.get().runtime.output_dir)
    from lightning.pytorch.utilities import rank_zero_only

    if rank_zero_only.rank == 0:  # DDP: rank 0 reports (and its return value is the one used)
        print_summary(result)
    return result.best_score


def eval_command(cfg: DictConfig) -> None:
    """eval.py: the checkpoint's scores as a table; errors as one line."""
    from .report import print_summary

    with user_errors():
        from .evaluate import evaluate

        print_summary(evaluate(cfg))


def task_direction(task: str) -> str:
    """The Optuna direction (`maximize` / `minimize`) of the task's monitored metric."""
    from .tasks import get_task  # resolved only when a sweep reads it: torch is loaded by then

    return {"max": "maximize", "min": "minimize"}[get_task(task).mode]


def _exits_on_user_error(resolver: Callable[..., Any]) -> Callable[..., Any]:
    """A resolver Hydra calls while it sets up the job: a user error there is one line and exit
    status 1 (Hydra would print a traceback of its own frames)."""

    @functools.wraps(resolver)
    def resolve(*args: Any) -> Any:
        with user_errors():
            return resolver(*args)

    return resolve


def sweep_name(default: str) -> str:
    """In a multirun job, its sweep's name (the sweep directory's), else `default`: what the
    trackers group a sweep's jobs by (`logger=mlflow`'s experiment, `logger=wandb`'s group)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        return Path(HydraConfig.get().sweep.dir).name
    return default


OmegaConf.register_new_resolver("task_direction", task_direction, replace=True)
OmegaConf.register_new_resolver("sweep_name", sweep_name, replace=True)
# hydra.run.dir: a resumed run's own directory, else a new one no other run shares. Cached: the
# directory is created when first resolved, and every later read must name the same one.
OmegaConf.register_new_resolver(
    "run_dir", _exits_on_user_error(run_dir), replace=True, use_cache=True
)
# hydra.job_logging's file: the run directory's lock is taken as Hydra opens its log there, and
# hydra.output_subdir: a resumed or evaluated run's record beside the first (see zootrain.runs).
OmegaConf.register_new_resolver(
    "run_log", _exits_on_user_error(run_log), replace=True, use_cache=True
)
OmegaConf.register_new_resolver(
    "run_subdir", _exits_on_user_error(run_subdir), replace=True, use_cache=True
)

# configs/hydra/launcher/submitit_*.yaml share their names with the submitit plugin's schemas,
# so Hydra validates them against those dataclasses (wanted: a mistyped key fails) and warns
# that this matching is deprecated. Each file is complete on its own should the matching go.
warnings.filterwarnings("ignore", message=r"(?s).*validated against ConfigStore schema")

# Hydra imports every plugin when it starts; the Optuna sweeper's imports alembic (through
# optuna's database storage), which logs "setup plugin ..." for each of its own at INFO level.
logging.getLogger("alembic").setLevel(logging.WARNING)

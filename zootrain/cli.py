"""What train.py and eval.py need before Hydra parses the command line, and nothing heavier.

`python train.py --help` and tab completion compose the config and stop: they must not wait
for torch or Lightning. So this module imports only omegaconf; it registers the resolvers the
configs use and the warning filters that apply while composing. Everything else is imported
once a run starts.
"""

from __future__ import annotations

import warnings

from omegaconf import OmegaConf

from .runs import run_dir


def task_direction(task: str) -> str:
    """The Optuna direction (`maximize` / `minimize`) of the task's monitored metric."""
    from .tasks import get_task  # resolved only when a sweep reads it: torch is loaded by then

    return {"max": "maximize", "min": "minimize"}[get_task(task).mode]


OmegaConf.register_new_resolver("task_direction", task_direction, replace=True)
# hydra.run.dir: a resumed run's own directory, else a new one no other run shares. Cached: the
# directory is created when first resolved, and every later read must name the same one.
OmegaConf.register_new_resolver("run_dir", run_dir, replace=True, use_cache=True)

# configs/hydra/launcher/submitit_*.yaml share their names with the submitit plugin's schemas,
# so Hydra validates them against those dataclasses (wanted: a mistyped key fails) and warns
# that this matching is deprecated. Each file is complete on its own should the matching go.
warnings.filterwarnings("ignore", message=r"(?s).*validated against ConfigStore schema")

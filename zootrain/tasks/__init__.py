"""The tasks a run can train, one strategy object each (see `base.Task`).

A head config names its task (`task: detection`); `get_task` returns its strategy. A new task
is one module here and one entry in `TASKS`.
"""

from __future__ import annotations

from ..data.transforms import IGNORE_INDEX
from ..errors import ConfigError
from .base import TARGETS, LogitsTask, Sample, Task
from .classification import Classification
from .detection import Detection
from .instance_segmentation import InstanceSegmentation
from .segmentation import Segmentation

TASKS: dict[str, Task] = {
    task.name: task
    for task in (Classification(), Segmentation(), Detection(), InstanceSegmentation())
}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise ConfigError(f"unknown task {name!r}; this version trains {list(TASKS)}")
    return TASKS[name]


def tasks_for(targets: tuple[str, ...]) -> list[str]:
    """The tasks whose samples carry one of `targets` (what a data module can give)."""
    return [name for name, task in TASKS.items() if task.target in targets]


__all__ = [
    "IGNORE_INDEX",
    "TARGETS",
    "TASKS",
    "Classification",
    "Detection",
    "InstanceSegmentation",
    "LogitsTask",
    "Sample",
    "Segmentation",
    "Task",
    "get_task",
    "tasks_for",
]

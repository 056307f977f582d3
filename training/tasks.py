"""What differs between tasks: the loss, the metrics and the metric that picks the best model."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torchmetrics import MetricCollection
from torchmetrics.classification import (
    MulticlassAccuracy,
    MulticlassF1Score,
    MulticlassJaccardIndex,
)

from .shapes import IGNORE_INDEX


@dataclass(frozen=True)
class Task(ABC):
    """A task strategy; `monitor` is the validation metric checkpoints and sweeps optimise."""

    name: str
    monitor: str
    mode: str = "max"

    @abstractmethod
    def loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor: ...

    @abstractmethod
    def metrics(self, num_classes: int) -> MetricCollection: ...


@dataclass(frozen=True)
class Classification(Task):
    name: str = "classification"
    monitor: str = "val/acc"

    def loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(output, target)  # output (B, K), target (B,)

    def metrics(self, num_classes: int) -> MetricCollection:
        metrics = {
            "acc": MulticlassAccuracy(num_classes, average="micro"),
            "f1": MulticlassF1Score(num_classes, average="macro"),
        }
        if num_classes > 5:  # top-5 of five or fewer classes is always right
            metrics["acc_top5"] = MulticlassAccuracy(num_classes, top_k=5, average="micro")
        return MetricCollection(metrics)


@dataclass(frozen=True)
class Segmentation(Task):
    name: str = "segmentation"
    monitor: str = "val/miou"
    ignore_index: int = IGNORE_INDEX

    def loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        # output (B, K, H, W), target (B, H, W); ignored pixels count nowhere
        return F.cross_entropy(output, target, ignore_index=self.ignore_index)

    def metrics(self, num_classes: int) -> MetricCollection:
        return MetricCollection(
            {
                "miou": MulticlassJaccardIndex(
                    num_classes, average="macro", ignore_index=self.ignore_index
                ),
                "pixel_acc": MulticlassAccuracy(
                    num_classes, average="micro", ignore_index=self.ignore_index
                ),
            }
        )


TASKS: dict[str, Task] = {task.name: task for task in (Classification(), Segmentation())}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; this version trains {list(TASKS)}")
    return TASKS[name]

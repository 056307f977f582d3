"""What differs between tasks: how a batch gives losses and predictions, the metrics, the monitor."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torchmetrics import MetricCollection
from torchmetrics.classification import (
    MulticlassAccuracy,
    MulticlassF1Score,
    MulticlassJaccardIndex,
)
from torchmetrics.detection import MeanAveragePrecision

from .errors import ConfigError

IGNORE_INDEX = 255  # segmentation pixels that no loss or metric counts


@dataclass(frozen=True)
class Task(ABC):
    """A task strategy; `monitor` is the validation metric checkpoints and sweeps optimise."""

    name: str
    monitor: str
    mode: str = "max"
    # The metrics' values that are logged at the end of each epoch, by name; None logs every
    # metric of the collection (each returns one number).
    logged: tuple[str, ...] | None = None

    @abstractmethod
    def metrics(self, num_classes: int) -> MetricCollection: ...

    @abstractmethod
    def training_losses(self, model: Callable, x: Any, target: Any) -> dict[str, torch.Tensor]:
        """The losses to minimise (their sum) and to log, by name."""

    @abstractmethod
    def evaluate(self, model: Callable, x: Any, target: Any) -> tuple[Any, torch.Tensor | None]:
        """What the metrics are updated with, and the loss (None where the model gives none)."""


@dataclass(frozen=True)
class LogitsTask(Task):
    """The model returns logits (per image or per pixel); `loss` compares them with the target."""

    @abstractmethod
    def loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor: ...

    def training_losses(
        self, model: Callable, x: torch.Tensor, target: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        return {"loss": self.loss(model(x), target)}

    def evaluate(
        self, model: Callable, x: torch.Tensor, target: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        output = model(x)
        return output, self.loss(output, target)


@dataclass(frozen=True)
class Classification(LogitsTask):
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
class Segmentation(LogitsTask):
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


@dataclass(frozen=True)
class Detection(Task):
    """Boxes and labels per image, batched as lists (see `zootrain.data.base.detection_collate`).

    torchvision's detectors compute their losses themselves, from the targets, and return
    detections in eval mode; mean average precision (COCO's, through pycocotools) scores them.
    """

    name: str = "detection"
    monitor: str = "val/map"
    logged: tuple[str, ...] | None = ("map", "map_50", "map_75", "mar_100")

    def metrics(self, num_classes: int) -> MetricCollection:
        # COCO mAP over IoU 0.5:0.95 (map), at 0.5 and 0.75, and recall at 100 detections
        return MetricCollection(
            {"map": MeanAveragePrecision(box_format="xyxy", iou_type="bbox", backend="pycocotools")}
        )

    def training_losses(
        self, model: Callable, x: list[torch.Tensor], target: list[dict[str, torch.Tensor]]
    ) -> dict[str, torch.Tensor]:
        losses = model(x, target)  # e.g. FCOS: classification, bbox_regression, bbox_ctrness
        return {"loss_" + name.removeprefix("loss_"): value for name, value in losses.items()}

    def evaluate(
        self, model: Callable, x: list[torch.Tensor], target: list[dict[str, torch.Tensor]]
    ) -> tuple[list[dict[str, torch.Tensor]], None]:
        return model(x), None  # in eval mode the detectors return detections, not losses


TASKS: dict[str, Task] = {
    task.name: task for task in (Classification(), Segmentation(), Detection())
}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise ConfigError(f"unknown task {name!r}; this version trains {list(TASKS)}")
    return TASKS[name]

"""Classification: one class per image, scored by accuracy; a confusion matrix per class."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torchmetrics import Metric, MetricCollection
from torchmetrics.classification import (
    MulticlassAccuracy,
    MulticlassConfusionMatrix,
    MulticlassF1Score,
)

from ..data.transforms import classification_preset
from ..plots import plot_confusion_matrix
from .base import LogitsTask, Sample

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure


@dataclass(frozen=True)
class Classification(LogitsTask):
    name: str = "classification"
    monitor: str = "val/acc"
    target: str = "label"
    samples: int = 16
    panel_inches: float = 2.3
    per_class_file: str = "confusion_matrix.png"

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

    def transform(self, train: bool, image_size: int, **options: Any) -> Callable:
        return classification_preset(train, image_size, **options)

    def per_class_metric(self, num_classes: int) -> Metric:
        return MulticlassConfusionMatrix(num_classes, sync_on_compute=False)

    def plot_per_class(
        self, values: Any, class_names: Sequence[str], title: str, split: str
    ) -> Figure:
        return plot_confusion_matrix(
            values.cpu(), class_names, title, f"confusion matrix, {split} split"
        )

    def draw(
        self,
        panels: Sequence[Axes],
        picture: Any,
        sample: Sample,
        class_names: Sequence[str],
        colours: Sequence[tuple],
    ) -> None:
        """The image, titled with its true and predicted class (red where they differ)."""
        probabilities = sample.output.softmax(0)
        predicted = int(probabilities.argmax())
        true = int(sample.target)
        right = predicted == true
        panels[0].imshow(picture, interpolation="nearest")
        panels[0].set_title(
            f"true: {class_names[true]}\n"
            f"pred: {class_names[predicted]} {probabilities[predicted]:.0%}",
            color="darkgreen" if right else "firebrick",
            fontsize=10,
            fontweight="normal" if right else "bold",
        )

    def legend(self, class_names: Sequence[str]) -> list[int]:
        return []  # each panel names its classes

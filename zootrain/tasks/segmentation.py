"""Semantic segmentation: a class per pixel, scored by mean IoU; IoU per class."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torchmetrics import Metric, MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassJaccardIndex

from ..data.transforms import IGNORE_INDEX, dense_preset
from ..plots import plot_class_bars
from .base import LogitsTask, Sample

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure


@dataclass(frozen=True)
class Segmentation(LogitsTask):
    name: str = "segmentation"
    monitor: str = "val/miou"
    target: str = "mask"
    background_class: bool = True
    panels: int = 3  # image, truth, prediction
    across: int = 2
    per_class_file: str = "per_class_iou.png"
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

    def transform(self, train: bool, image_size: int, **options: Any) -> Callable:
        return dense_preset(self.target, train, image_size, **options)

    def per_class_metric(self, num_classes: int) -> Metric:
        # NaN: a class that is neither in the masks nor predicted
        return MulticlassJaccardIndex(
            num_classes,
            average=None,
            ignore_index=self.ignore_index,
            zero_division=float("nan"),
            sync_on_compute=False,
        )

    def plot_per_class(
        self, values: Any, class_names: Sequence[str], title: str, split: str
    ) -> Figure:
        iou = values.cpu().tolist()
        return plot_class_bars({"IoU": iou}, class_names, title, f"IoU per class, {split} split")

    def draw(
        self,
        panels: Sequence[Axes],
        picture: Any,
        sample: Sample,
        class_names: Sequence[str],
        colours: Sequence[tuple],
    ) -> None:
        """The image, the true mask and the predicted one painted over it."""
        painted = [None, *colours[1:]] if has_background(class_names) else list(colours)
        truth = torch.as_tensor(sample.target)
        predicted = sample.output.argmax(0)
        counted = truth != self.ignore_index
        accuracy = (predicted[counted] == truth[counted]).float().mean() if counted.any() else 0.0
        for axis, shown, name in (
            (panels[0], picture, "image"),
            (panels[1], overlay(picture, truth, painted), "ground truth"),
            (
                panels[2],
                overlay(picture, predicted, painted),
                f"predicted, {accuracy:.0%} px right",
            ),
        ):
            axis.imshow(shown, interpolation="nearest")
            axis.set_title(name, fontsize=9)

    def legend(self, class_names: Sequence[str]) -> list[int]:
        first = 1 if has_background(class_names) else 0  # the background is left unpainted
        return list(range(first, len(class_names)))


def has_background(class_names: Sequence[str]) -> bool:
    """Whether class 0 is the background, which masks leave unpainted."""
    return bool(class_names) and class_names[0].lower() == "background"


def overlay(
    picture: Any, mask: torch.Tensor, colours: Sequence[tuple | None], alpha: float = 0.8
) -> Any:
    """The mask's classes painted (a None colour: not painted) over the image in dimmed grey,
    so that the colours read as the legend's and not mixed with the image's; ignored pixels
    black."""
    grey = picture @ np.array([0.299, 0.587, 0.114], dtype=picture.dtype)  # (H, W) luma
    painted = np.repeat((0.25 + 0.5 * grey)[..., None], 3, axis=2)
    mask = mask.cpu().numpy()
    for label, colour in enumerate(colours):
        if colour is None:
            continue
        where = mask == label
        painted[where] = (1 - alpha) * painted[where] + alpha * np.asarray(colour)
    painted[mask == IGNORE_INDEX] = 0.0
    return painted

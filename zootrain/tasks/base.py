"""The task strategy: everything that differs between tasks, declared once per task.

A `Task` says how a batch gives losses and predictions, the metrics and the one validation
metric checkpoints and sweeps optimise (`monitor`), the per-class view and the prediction
panels of the pictures, and what its data must give: the kind of target per sample
(`target`), how samples batch (`collate`) and the augmentation preset (`transform`). The rest
of the package asks the task; no other module compares task names.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torchmetrics import Metric, MetricCollection

from ..data.transforms import collate_samples

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

# The kinds of target a sample may carry: a class index per image, a class per pixel, boxes
# with their classes, and boxes with their classes and a mask each. Data modules say which
# they can give; each task asks for one.
TARGETS = ("label", "mask", "boxes", "instances")


@dataclass
class Sample:
    """One image as the model saw it, its target and the model's output for it alone."""

    image: torch.Tensor  # (3, H, W) as the data gives it: uint8 (or the model's float input)
    target: Any  # as the task's `target` kind: class index, (H, W) mask, {"boxes", "labels"}
    # (and "masks", (N, H, W))
    output: Any  # (K,) logits, (K, H, W) logits or {"boxes", "labels", "scores"} (+ "masks")


@dataclass(frozen=True)
class Task(ABC):
    """A task strategy; `monitor` is the validation metric checkpoints and sweeps optimise."""

    name: str
    monitor: str
    target: str  # one of TARGETS: what each sample's target is
    mode: str = "max"
    # The metrics' values that are logged at the end of each epoch, by name; None logs every
    # metric of the collection (each returns one number).
    logged: tuple[str, ...] | None = None
    # Fewer classes than this leave nothing to learn (detection: one class is "where is it").
    min_classes: int = 2
    # Class 0 is the background, which the data adds to its classes (pixels of no object).
    background_class: bool = False
    # The pictures: images in predictions.png, panels per image, images across, panel inches,
    # and the file of the per-class view.
    samples: int = 8
    panels: int = 1
    across: int = 4
    panel_inches: float = 2.0
    per_class_file: str = "per_class.png"

    # ------------------------------------------------------------------ training and metrics

    @abstractmethod
    def metrics(self, num_classes: int) -> MetricCollection: ...

    @abstractmethod
    def training_losses(self, model: Callable, x: Any, target: Any) -> dict[str, torch.Tensor]:
        """The losses to minimise (their sum) and to log, by name."""

    @abstractmethod
    def evaluate(self, model: Callable, x: Any, target: Any) -> tuple[Any, torch.Tensor | None]:
        """What the metrics are updated with, and the loss (None where the model gives none)."""

    # ------------------------------------------------------------------ what the data gives

    def collate(self, batch: list[tuple[Any, Any]]) -> Any:
        """A batch of samples as the model takes it: stacked images and targets."""
        return collate_samples(batch)

    @abstractmethod
    def transform(self, train: bool, image_size: int, **options: Any) -> Callable:
        """The augmentation preset (`zootrain.data.transforms`) of a real dataset's split:
        uint8 images, normalised later on the device."""

    def example_input(self, image: torch.Tensor) -> Any:
        """The module's `example_input_array` (what the model summary counts FLOPs with) from
        one image: a float batch tensor, or a tuple of the model's arguments."""
        return image.new_zeros((1, *image.shape), dtype=torch.float32)

    # ------------------------------------------------------------------ pictures

    def predict(self, model: Callable, images: list[torch.Tensor]) -> list[Any]:
        """The model's output for each image, on the CPU in float32: one batch where the
        images share a size, else one image at a time."""
        if len({image.shape for image in images}) == 1:
            return list(model(torch.stack(images)).float().cpu())
        return [model(image[None])[0].float().cpu() for image in images]

    @abstractmethod
    def per_class_metric(self, num_classes: int) -> Metric:
        """The torchmetrics metric behind the per-class view; computed on this process only
        (other DDP ranks are not in the pictures' pass, so no sync)."""

    @abstractmethod
    def plot_per_class(
        self, values: Any, class_names: Sequence[str], title: str, split: str
    ) -> Figure:
        """The per-class view from the computed `per_class_metric` value."""

    @abstractmethod
    def draw(
        self,
        panels: Sequence[Axes],
        picture: Any,
        sample: Sample,
        class_names: Sequence[str],
        colours: Sequence[tuple],
    ) -> None:
        """One sample's `self.panels` panels of predictions.png; `picture` is its image as an
        (H, W, 3) array in [0, 1]."""

    def legend(self, class_names: Sequence[str]) -> list[int]:
        """The classes the colour legend under predictions.png lists (none: no legend)."""
        return list(range(len(class_names)))


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

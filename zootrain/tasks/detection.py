"""Object detection: boxes and labels per image, scored by COCO mean average precision."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torchmetrics import Metric, MetricCollection
from torchmetrics.detection import MeanAveragePrecision

from ..data.transforms import dense_preset
from ..plots import plot_class_bars, pyplot
from .base import Sample, Task

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure


@dataclass(frozen=True)
class Detection(Task):
    """Boxes and labels per image, batched as lists (images may differ in size and box count).

    torchvision's detectors compute their losses themselves, from the targets, and return
    detections in eval mode; mean average precision (COCO's, through pycocotools) scores them.
    """

    name: str = "detection"
    monitor: str = "val/map"
    target: str = "boxes"
    logged: tuple[str, ...] | None = ("map", "map_50", "map_75", "mar_100")
    min_classes: int = 1  # one class is a detection task (is it there, where)
    panels: int = 2  # truth, prediction
    across: int = 3
    per_class_file: str = "per_class_ap.png"
    score_threshold: float = 0.3  # detections drawn from this score on
    max_boxes: int = 10  # at most this many drawn per image, the highest scores
    # What COCO's mAP scores (several: its values are prefixed "<iou type>_"); the last one is
    # the per-class view's, named there with `scored` ("mask " for masks) and `unscored`.
    iou_types: tuple[str, ...] = ("bbox",)
    scored: str = ""
    unscored: str = "no boxes of this class"
    average_precision_class = MeanAveragePrecision  # not a field: the metric's class

    def average_precision(self, iou_types: tuple[str, ...], **options: Any) -> Metric:
        """COCO's mean average precision (pycocotools) of `iou_types` for this task's outputs."""
        return self.average_precision_class(
            box_format="xyxy", iou_type=iou_types, backend="pycocotools", **options
        )

    def metrics(self, num_classes: int) -> MetricCollection:
        # COCO mAP over IoU 0.5:0.95 (map), at 0.5 and 0.75, and recall at 100 detections
        return MetricCollection({"map": self.average_precision(self.iou_types)})

    def training_losses(
        self, model: Callable, x: list[torch.Tensor], target: list[dict[str, torch.Tensor]]
    ) -> dict[str, torch.Tensor]:
        losses = model(x, target)  # e.g. FCOS: classification, bbox_regression, bbox_ctrness
        return {"loss_" + name.removeprefix("loss_"): value for name, value in losses.items()}

    def evaluate(
        self, model: Callable, x: list[torch.Tensor], target: list[dict[str, torch.Tensor]]
    ) -> tuple[list[dict[str, torch.Tensor]], None]:
        return model(x), None  # in eval mode the detectors return detections, not losses

    def collate(
        self, batch: list[tuple[torch.Tensor, dict]]
    ) -> tuple[list[torch.Tensor], list[dict]]:
        """Images may differ in size and box count: kept as lists (the detector batches)."""
        images, targets = zip(*batch, strict=True)
        return list(images), list(targets)

    def transform(self, train: bool, image_size: int, **options: Any) -> Callable:
        return dense_preset(self.target, train, image_size, **options)

    def example_input(self, image: torch.Tensor) -> Any:
        return ([image.new_zeros(image.shape, dtype=torch.float32)],)  # one argument: a list

    def predict(self, model: Callable, images: list[torch.Tensor]) -> list[Any]:
        return [  # labels stay integers; boxes and scores leave bf16 behind
            {k: v.cpu() if k == "labels" else v.float().cpu() for k, v in detections.items()}
            for detections in model(images)
        ]

    def per_class_metric(self, num_classes: int) -> Metric:
        return self.average_precision(
            self.iou_types[-1:],
            class_metrics=True,
            extended_summary=True,  # the precision array, for AP at IoU 0.5 per class
            sync_on_compute=False,
        )

    def plot_per_class(
        self, values: Any, class_names: Sequence[str], title: str, split: str
    ) -> Figure:
        ap, ap50 = average_precision_per_class(values, len(class_names))
        return plot_class_bars(
            {f"{self.scored}AP (IoU 0.50:0.95)": ap, f"{self.scored}AP50": ap50},
            class_names,
            title,
            f"{self.scored}average precision per class, {split} split",
            missing=self.unscored,
        )

    def draw(
        self,
        panels: Sequence[Axes],
        picture: Any,
        sample: Sample,
        class_names: Sequence[str],
        colours: Sequence[tuple],
    ) -> None:
        """The true boxes, and the predicted ones scored `score_threshold` or more."""
        scores = sample.output["scores"]
        above = (scores >= self.score_threshold).nonzero()[:, 0]
        shown = above[scores[above].argsort(descending=True)][: self.max_boxes]
        predicted = {k: v[shown] for k, v in sample.output.items()}
        heading = f"predicted (score ≥ {self.score_threshold:g})"
        if len(above) > self.max_boxes:
            heading = f"predicted: top {self.max_boxes} of {len(above)} ≥ {self.score_threshold:g}"
        for axis, found, name in (
            (panels[0], sample.target, "ground truth"),
            (panels[1], predicted, heading),
        ):
            axis.imshow(self.painted(picture, found, colours), interpolation="nearest")
            axis.set_title(name, fontsize=9)
            draw_boxes(axis, found, class_names, colours, picture.shape[:2])

    def painted(
        self, picture: Any, found: dict[str, torch.Tensor], colours: Sequence[tuple]
    ) -> Any:
        """What a panel shows under the boxes of `found`: the image (instance segmentation
        paints the masks on it)."""
        return picture


def average_precision_per_class(values: Any, num_classes: int) -> tuple[list[float], list[float]]:
    """AP over IoU 0.50:0.95 and AP at IoU 0.50 by class (-1: no box of that class), from a
    pycocotools `MeanAveragePrecision` computed with `class_metrics` and `extended_summary`."""
    # The precision array (T, R, K, A, M) gives AP at IoU 0.50: the mean over recall
    # thresholds, all areas, 100 detections
    ap = [-1.0] * num_classes
    ap50 = [-1.0] * num_classes
    classes = values["classes"].reshape(-1).tolist()
    if "map_per_class" not in values:  # torchmetrics' segm mAP when nothing was detected
        for label in classes:
            if 0 <= label < num_classes:
                ap[label] = ap50[label] = 0.0  # objects of the class, none found: as for boxes
        return ap, ap50
    per_class = values["map_per_class"].reshape(-1).tolist()
    precision = values["precision"][0, :, :, 0, -1]  # (R, K) at IoU 0.50
    for column, (label, score) in enumerate(zip(classes, per_class, strict=True)):
        if 0 <= label < num_classes:
            ap[label] = score
            curve = precision[:, column]
            ap50[label] = float(curve[curve > -1].mean()) if (curve > -1).any() else -1.0
    return ap, ap50


def draw_boxes(
    axis: Axes,
    found: dict[str, torch.Tensor],
    class_names: Sequence[str],
    colours: Sequence[tuple],
    size: tuple[int, int],
) -> None:
    """The boxes of `found` on `axis`, each labelled with its class (and score, where it has
    one) in its class's colour; "no box" on a prediction without any."""
    boxes, labels, scores = found["boxes"], found["labels"], found.get("scores")
    height, width = size
    # A label's height and a width it may take, in pixels of the image (a panel is ~2 inches
    # for any image size): labels closer than this are moved down a line, not drawn over.
    line, span = 0.09 * height, 0.45 * width
    placed: list[tuple[float, float]] = []
    pairs = zip(torch.as_tensor(boxes).tolist(), labels.tolist(), strict=True)
    for i, (box, label) in enumerate(pairs):
        x0, y0, x1, y1 = box
        colour = colours[label % len(colours)]
        axis.add_patch(
            pyplot().Rectangle(
                (x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False, edgecolor=colour,
                linewidth=2,
            )
        )  # fmt: skip
        text = class_names[label] if label < len(class_names) else str(label)
        if scores is not None:
            text += f" {scores[i]:.2f}"
        x, y = min(max(x0, 0), width - 1), max(y0, 0)  # inside the box, at its top left
        align = "left"
        if x > width - span:  # a label from here would run off the image: end it at the
            x, align = min(max(x1, 0), width - 1), "right"  # box's right edge instead
        while any(abs(x - px) < span and abs(y - py) < line for px, py in placed):
            y += line
        placed.append((x, y))
        axis.text(
            x, y, text, fontsize=7, color="white", va="top", ha=align, clip_on=True,
            bbox={"facecolor": colour, "alpha": 0.8, "pad": 1, "linewidth": 0},
        )  # fmt: skip
    if scores is not None and not len(boxes):
        axis.text(
            0.5, 0.5, "no box", ha="center", va="center", transform=axis.transAxes,
            color="white", fontsize=9, bbox={"facecolor": "black", "alpha": 0.6},
        )  # fmt: skip

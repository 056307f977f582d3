"""Instance segmentation: a box, a class and a mask per object, scored by COCO box and mask mAP."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torchmetrics.detection import MeanAveragePrecision

from .detection import Detection

MASK_THRESHOLD = 0.5  # a pixel belongs to a predicted mask from this probability on


class MaskAveragePrecision(MeanAveragePrecision):
    """torchmetrics' COCO mean average precision on the masks a Mask R-CNN predicts.

    torchvision's Mask R-CNN returns each detection's mask as probabilities, (N, 1, H, W) in
    [0, 1]; COCO scores binary masks. `update` thresholds them at `MASK_THRESHOLD` (as
    torchvision's reference evaluation does) and leaves binary (N, H, W) masks, the targets',
    as they are.
    """

    def update(
        self, preds: list[dict[str, torch.Tensor]], target: list[dict[str, torch.Tensor]]
    ) -> None:
        super().update([binary_masks(p) for p in preds], target)


def binary_masks(found: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`found` with its masks as uint8 (N, H, W), probabilities thresholded at `MASK_THRESHOLD`."""
    masks = found["masks"]
    if masks.is_floating_point():
        masks = masks >= MASK_THRESHOLD
    if masks.ndim == 4:  # (N, 1, H, W), one channel per detection
        masks = masks[:, 0]
    return {**found, "masks": masks.to(torch.uint8)}


@dataclass(frozen=True)
class InstanceSegmentation(Detection):
    """Boxes, labels and a uint8 (H, W) mask per object, batched as lists, as for detection.

    torchvision's Mask R-CNN computes its losses from the targets (a mask loss on top of
    Faster R-CNN's) and returns detections with mask probabilities in eval mode; COCO's mean
    average precision (pycocotools) scores the boxes and the masks, `val/bbox_map` and
    `val/segm_map` (monitored: the masks are what this task adds).
    """

    name: str = "instance_segmentation"
    monitor: str = "val/segm_map"
    target: str = "instances"
    logged: tuple[str, ...] | None = tuple(
        f"{kind}_{name}"
        for kind in ("bbox", "segm")
        for name in ("map", "map_50", "map_75", "mar_100")
    )
    per_class_file: str = "per_class_mask_ap.png"
    iou_types: tuple[str, ...] = ("bbox", "segm")
    scored: str = "mask "
    unscored: str = "no objects of this class"
    mask_alpha: float = 0.55  # how opaque the masks are painted over the image
    average_precision_class = MaskAveragePrecision

    def painted(
        self, picture: Any, found: dict[str, torch.Tensor], colours: Sequence[tuple]
    ) -> Any:
        """The image with each mask of `found` painted in its class's colour, the larger ones
        first so that a small mask on top of a large one stays visible."""
        masks = binary_masks(found)["masks"].bool().cpu().numpy()  # (N, H, W)
        painted = picture.copy()
        for index in np.argsort(-masks.sum(axis=(1, 2)), kind="stable"):
            colour = np.asarray(colours[int(found["labels"][index]) % len(colours)])
            where = masks[index]
            painted[where] = (1 - self.mask_alpha) * painted[where] + self.mask_alpha * colour
        return painted

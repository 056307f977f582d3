"""Augmentation presets on `torchvision.transforms.v2`: images, masks and boxes move together.

Every preset is called as `preset(image, target)` and returns `(image, target)`: a normalised
float (3, H, W) tensor and, by the kind of target (`zootrain.tasks.TARGETS`), an int label,
an int64 (H, W) mask (`IGNORE_INDEX` where no class is known), `{"boxes": float (N, 4) xyxy,
"labels": int64 (N,)}` or that with `"masks": uint8 (N, H, W)`, one per box, all plain
tensors. Each task says which preset its data uses.
Dense targets must arrive as `tv_tensors.Mask` / `BoundingBoxes` so that v2 knows to resize
masks with nearest neighbours and to move boxes with the pixels.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

IGNORE_INDEX = 255  # segmentation pixels that no loss or metric counts
Stats = Sequence[float]


def classification_preset(
    train: bool,
    image_size: int,
    mean: Stats,
    std: Stats,
    crop_scale: Sequence[float] = (0.08, 1.0),
    crop_pct: float = 0.875,
) -> v2.Compose:
    """Train: RandomResizedCrop + horizontal flip. Eval: resize to image_size / crop_pct, center crop."""
    if train:
        geometry = [
            v2.RandomResizedCrop(image_size, scale=tuple(crop_scale), antialias=True),
            v2.RandomHorizontalFlip(),
        ]
    else:
        geometry = [
            v2.Resize(round(image_size / crop_pct), antialias=True),
            v2.CenterCrop(image_size),
        ]
    return v2.Compose([v2.ToImage(), *geometry, *_normalise(mean, std)])


def dense_preset(
    target: str,
    train: bool,
    image_size: int,
    mean: Stats,
    std: Stats,
    scale_range: Sequence[float] = (0.5, 2.0),
) -> v2.Compose:
    """Masks (`target="mask"`, segmentation), boxes (`"boxes"`, detection) and boxes with a
    mask each (`"instances"`, instance segmentation).

    Train: scale jitter (shorter side uniform in `scale_range` x image_size), a random
    image_size crop (padded where the image is smaller: masks with IGNORE_INDEX, images with
    0), horizontal flip. Eval: the longer side resized to image_size; samples with masks are
    then padded on the bottom and right to image_size x image_size (the padding ignored) so
    that a batch stacks, and pixels keep their coordinates. Boxes that a crop cut to nothing
    are dropped (and their labels and instance masks); instance masks are padded with 0 (no
    object there), not ignored.
    """
    if target not in ("mask", "boxes", "instances"):
        raise ValueError(
            f"dense_preset moves masks, boxes or instances with the pixels, not {target!r}"
        )
    low, high = scale_range
    if train:
        mask_fill = IGNORE_INDEX if target == "mask" else 0  # instance masks: not the object
        geometry = [
            v2.RandomResize(round(low * image_size), round(high * image_size), antialias=True),
            v2.RandomCrop(
                image_size, pad_if_needed=True, fill={tv_tensors.Mask: mask_fill, "others": 0}
            ),
            v2.RandomHorizontalFlip(),
        ]
    else:
        geometry = [v2.Resize(None, max_size=image_size, antialias=True)]
        if target == "mask":
            geometry.append(PadBottomRight(image_size))
    if target in ("boxes", "instances"):
        # boxes into the image (float rounding can leave them a hair outside, which Sanitize
        # would count as invalid), then drop those that are too small and their labels
        geometry += [v2.ClampBoundingBoxes(), v2.SanitizeBoundingBoxes()]
    return v2.Compose([v2.ToImage(), *geometry, *_normalise(mean, std), _plain_target])


class PadBottomRight:
    """Pad an image and its mask on the bottom and right to `size` x `size`; the mask with ignore."""

    def __init__(self, size: int) -> None:
        self.size = size

    def __call__(
        self, image: tv_tensors.Image, mask: tv_tensors.Mask
    ) -> tuple[tv_tensors.Image, tv_tensors.Mask]:
        height, width = image.shape[-2:]
        padding = [0, 0, max(0, self.size - width), max(0, self.size - height)]  # l, t, r, b
        return F.pad(image, padding, fill=0), F.pad(mask, padding, fill=IGNORE_INDEX)


def _normalise(mean: Stats, std: Stats) -> list[v2.Transform]:
    # A bare dtype converts (and scales) images only; masks and boxes keep theirs.
    return [
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(list(mean), list(std)),
        v2.ToPureTensor(),
    ]


def _plain_target(image: torch.Tensor, target: Any) -> tuple[torch.Tensor, Any]:
    """Masks as int64 class maps; detection labels as int64 (boxes are float already, instance
    masks stay uint8, as torchvision's Mask R-CNN takes them)."""
    if isinstance(target, torch.Tensor):
        return image, target.long()
    return image, {**target, "labels": target["labels"].long()}

"""Augmentation presets on `torchvision.transforms.v2` (images, masks and boxes move together),
and what turns their uint8 images into the model's input on the device.

Every preset is called as `preset(image, target)` and returns `(image, target)`: a uint8
(3, H, W) tensor, still in 0-255 (decoding and geometry run in the DataLoader workers in uint8,
and a batch crosses to the device at a quarter of float32's bytes), and, by the kind of target
(`zootrain.tasks.TARGETS`), an int label, an int64 (H, W) mask (`IGNORE_INDEX` where no class
is known), `{"boxes": float (N, 4) xyxy, "labels": int64 (N,)}` or that with `"masks": uint8
(N, H, W)`, one per box, all plain tensors. Each task says which preset its data uses. Dense
targets must arrive as `tv_tensors.Mask` / `BoundingBoxes` so that v2 knows to resize masks
with nearest neighbours and to move boxes with the pixels. `DeviceNormalize` then makes float,
normalised images of a batch on its device
(`zootrain.module.TaskModule.on_after_batch_transfer`), with the data module's statistics.

The classification presets are v2's geometry rewritten as two halves (`ClassificationGeometry`:
the same draws, the same pixels, in less time); with `data.decode=device` (ImageFolder) workers
draw from each JPEG's header size, and an `EncodedImages` batch is decoded, cropped, resized
and flipped on its device before it is normalised.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch.utils.data import default_collate
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from ..errors import DatasetError
from .images import EncodedJpeg, decode_jpegs

IGNORE_INDEX = 255  # segmentation pixels that no loss or metric counts
Stats = Sequence[float]


def classification_preset(
    train: bool,
    image_size: int,
    crop_scale: Sequence[float] = (0.08, 1.0),
    crop_pct: float = 0.875,
) -> ClassificationGeometry:
    """Train: RandomResizedCrop + horizontal flip. Eval: resize to image_size / crop_pct, center crop.

    Images come as uint8 tensors (every reader gives them so) and leave as plain tensors with
    their channels interleaved in memory (see `ClassificationGeometry`).
    """
    if train:
        return RandomResizedCropFlip(image_size, crop_scale)
    return ResizeCenterCrop(image_size, crop_pct)


class ClassificationGeometry:
    """A classification preset's geometry in two halves: `draw` makes its random draws from an
    image's size alone, `apply` moves the pixels with them. Called as `preset(image, target)`,
    it does both; with `data.decode=device` a worker draws from a JPEG's header and the batch's
    device applies (`EncodedImages`).

    The pixels are resized with their channels interleaved, (H, W, 3) in memory: PyTorch's
    uint8 antialiased bilinear kernel has a vectorised path for that layout, which takes 0.6x
    the time of v2 resizing the decoder's strided crop (and a third of a planar image's), and
    gives the same bytes. Outputs keep the layout; `stack_images` batches them channels last
    without a transposing copy.
    """

    def __call__(self, image: torch.Tensor, target: Any) -> tuple[torch.Tensor, Any]:
        return self.apply(image, self.draw(*image.shape[-2:])), target

    def draw(self, height: int, width: int) -> tuple[int, int, int, int, int]:
        """(top, left, crop height, crop width, flip) for an image of this size."""
        return (0, 0, height, width, 0)

    def apply(self, image: torch.Tensor, params: Sequence[int]) -> torch.Tensor:
        """A (3, H, W) uint8 image moved by `draw`'s `params`, on its device."""
        raise NotImplementedError


class RandomResizedCropFlip(ClassificationGeometry):
    """v2's `RandomResizedCrop(size, scale, antialias=True)` then `RandomHorizontalFlip()`:
    the same random draws from the same generator in the same order (the crop box by v2's own
    `make_params`, then one `torch.rand(1)` for the flip, as v2's random transforms draw it) and
    the same pixels, without v2's per-call dispatch and with the faster resize."""

    def __init__(self, size: int, scale: Sequence[float] = (0.08, 1.0), p: float = 0.5) -> None:
        self.crop = v2.RandomResizedCrop(size, scale=tuple(scale), antialias=True)
        self.size, self.p = list(self.crop.size), p

    def draw(self, height: int, width: int) -> tuple[int, int, int, int, int]:
        size = torch.empty(()).expand(height, width)  # a size that holds no pixels
        box = self.crop.make_params([size])
        flipped = bool(torch.rand(1) < self.p)
        return (box["top"], box["left"], box["height"], box["width"], int(flipped))

    def apply(self, image: torch.Tensor, params: Sequence[int]) -> torch.Tensor:
        top, left, height, width, flipped = params
        crop = interleaved(image[..., top : top + height, left : left + width])
        image = F.resize(crop, self.size, self.crop.interpolation, antialias=True)  # (3, S, S)
        return F.horizontal_flip(image) if flipped else image


class ResizeCenterCrop(ClassificationGeometry):
    """v2's `Resize(round(size / crop_pct), antialias=True)` then `CenterCrop(size)`."""

    def __init__(self, size: int, crop_pct: float = 0.875) -> None:
        self.size, self.resize = size, round(size / crop_pct)

    def apply(self, image: torch.Tensor, params: Sequence[int]) -> torch.Tensor:
        image = F.resize(interleaved(image), [self.resize], antialias=True)  # shorter side
        return F.center_crop(image, [self.size])  # a view: stack_images copies it once


def interleaved(image: torch.Tensor) -> torch.Tensor:
    """A (3, H, W) image whose memory is (H, W, 3); no copy when it is already."""
    return image.permute(1, 2, 0).contiguous().permute(2, 0, 1)


def stack_images(images: Sequence[torch.Tensor]) -> torch.Tensor:
    """(B, C, H, W) from (C, H, W) images of one size, channels last when every image has its
    channels innermost in memory (what the classification presets give): stacking those into a
    planar batch would transpose each (7x the time of the copy); the module's `channels_last`
    wants that layout anyway. In a DataLoader worker the batch lands in shared memory."""
    if all(image.ndim == 3 and image.stride(0) == 1 and image.numel() > 1 for image in images):
        return default_collate([image.permute(1, 2, 0) for image in images]).permute(0, 3, 1, 2)
    return default_collate(list(images))


def collate_samples(samples: Sequence[tuple[torch.Tensor, Any]]) -> list[Any]:
    """[(B, C, H, W) images (`stack_images`), collated targets], as `default_collate` gives."""
    images, targets = zip(*samples, strict=True)
    return [stack_images(images), default_collate(list(targets))]


@dataclass
class EncodedImages:
    """A batch of images, JPEGs among them still encoded, decoded where it is sent (`decode`).

    The JPEG files lie one after another in `data`, one tensor, so that a worker sends the
    batch with one shared-memory handle, not one per file. `to(device)` moves the images the
    workers finished (files that are not JPEGs, decoded and cropped there) and records the
    device; `data` and `params` stay on the host: decode_jpeg reads bytes from there on any
    device (nvJPEG copies them itself), and the crop boxes are the kernels' arguments, which
    read from a device tensor would be a host sync per batch.
    """

    data: torch.Tensor  # (N,) uint8 on the host: the batch's JPEG files, concatenated
    # (B, 8) int64 on the host: bytes in `data` (0: done in a worker), header height and width,
    # then `ClassificationGeometry.draw`'s (top, left, crop height, crop width, flip)
    params: torch.Tensor
    done: list[torch.Tensor]  # (3, S, S) uint8: the images done in a worker, in batch order
    paths: list[str]  # each JPEG's file, named when it fails ("" for the images done)
    geometry: ClassificationGeometry
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @classmethod
    def collate(
        cls, images: Sequence[tuple[EncodedJpeg, Sequence[int]] | torch.Tensor],
        paths: list[str], geometry: ClassificationGeometry,
    ) -> EncodedImages:  # fmt: skip
        """A batch of (JPEG, its draws) and images done in a worker."""
        files, params, done = [], [], []
        for image in images:
            if isinstance(image, torch.Tensor):
                done.append(image)
                params.append((0,) * 8)
            else:
                jpeg, drawn = image
                files.append(jpeg.data)
                params.append((len(jpeg.data), jpeg.height, jpeg.width, *drawn))
        data = torch.cat(files) if files else torch.empty(0, dtype=torch.uint8)
        return cls(data, torch.tensor(params, dtype=torch.int64), done, paths, geometry)

    def __len__(self) -> int:
        return len(self.params)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> EncodedImages:
        # from the host, non_blocking is safe: a pinned copy is ordered in the stream
        done = [i.to(device, non_blocking=non_blocking or i.is_cpu) for i in self.done]
        return replace(self, done=done, device=torch.device(device))

    def pin_memory(self) -> EncodedImages:
        return replace(self, done=[i.pin_memory() for i in self.done])

    def decode(self) -> torch.Tensor:
        """(B, 3, S, S) uint8 on `device`: every JPEG decoded in one call, then each cropped."""
        rows = self.params.tolist()
        sizes = [row[0] for row in rows if row[0]]
        files = self.data.split(sizes)  # views: one file each
        paths = [path for path, row in zip(self.paths, rows, strict=True) if row[0]]
        decoded, done = iter(decode_jpegs(list(files), paths, self.device)), iter(self.done)
        out = []
        for path, (size, height, width, *drawn) in zip(self.paths, rows, strict=True):
            if not size:
                out.append(next(done))
                continue
            image = next(decoded)  # (3, H, W)
            if tuple(image.shape[-2:]) != (height, width):
                raise DatasetError(
                    f"the image {path} decodes to {image.shape[-1]}x{image.shape[-2]} pixels, "
                    f"its header says {width}x{height}; decode it in the workers "
                    "(data.decode=worker)"
                )
            out.append(self.geometry.apply(image, drawn))
        return stack_images(out)  # (B, 3, S, S)


def dense_preset(
    target: str,
    train: bool,
    image_size: int,
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
    return v2.Compose([v2.ToImage(), *geometry, v2.ToPureTensor(), _plain_target])


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


def _plain_target(image: torch.Tensor, target: Any) -> tuple[torch.Tensor, Any]:
    """Masks as int64 class maps; detection labels as int64 (boxes are float already, instance
    masks stay uint8, as torchvision's Mask R-CNN takes them)."""
    if isinstance(target, torch.Tensor):
        return image, target.long()
    return image, {**target, "labels": target["labels"].long()}


Images = torch.Tensor | list[torch.Tensor]


class DeviceNormalize:
    """uint8 images to the model's float input, on whatever device they are: x / 255, then
    (x - mean) / std per channel, as one multiply and one add per element.

    Takes a (B, 3, H, W) batch, one (3, H, W) image or a list of them (detection batches keep
    images of different sizes apart). Floating-point images pass unchanged: they are the
    model's input already (a caller's own normalised batch, the model summary's example).
    Without statistics (`mean`/`std` None) images are only scaled to [0, 1]. It holds no
    tensors of its own between devices (no module buffers, nothing in a state dict).
    """

    def __init__(self, mean: Stats | None = None, std: Stats | None = None) -> None:
        if (mean is None) != (std is None):
            raise ValueError("give both mean and std, or neither")
        mean = [0.0, 0.0, 0.0] if mean is None else [float(m) for m in mean]
        std = [1.0, 1.0, 1.0] if std is None else [float(s) for s in std]
        if len(mean) != len(std) or not all(s > 0 for s in std):
            raise ValueError(f"mean and std need one value per channel, std > 0: {mean}, {std}")
        self.mean, self.std = tuple(mean), tuple(std)
        # In float64, rounded once to float32: within an ulp of v2's ToDtype + Normalize.
        self._scale = [1.0 / (255.0 * s) for s in std]
        self._shift = [-m / s for m, s in zip(mean, std, strict=True)]
        self._on: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def __call__(self, images: Images) -> Images:
        if isinstance(images, list | tuple):
            return [self(image) for image in images]
        if images.is_floating_point():
            return images
        if images.dtype != torch.uint8:
            raise TypeError(f"images must be uint8 (0-255) or floating point, got {images.dtype}")
        if images.device not in self._on:
            self._on[images.device] = tuple(
                torch.tensor(v, dtype=torch.float32).view(-1, 1, 1).to(images.device)
                for v in (self._scale, self._shift)
            )
        scale, shift = self._on[images.device]
        if (
            images.ndim == 4
            and not images.is_contiguous()
            and images.is_contiguous(memory_format=torch.channels_last)
        ):
            # A channels-last batch (`stack_images`) as rows of W x 3 values, with per-channel
            # factors repeated along a row: broadcast over an innermost dimension of 3, the
            # same arithmetic takes 4x as long on CPU (0.25 against 0.06 ms an image at 224 px)
            batch, channels, height, width = images.shape
            out = images.permute(0, 2, 3, 1).float()  # (B, H, W, C), contiguous
            rows = out.view(batch * height, width * channels)
            rows.mul_(scale.view(channels).repeat(width)).add_(shift.view(channels).repeat(width))
            return out.permute(0, 3, 1, 2)  # (B, C, H, W), channels last
        # Three passes, in the images' memory format; one mixed-dtype addcmul would be one, but
        # on CPU it takes 5x as long (14 ms for 32 images at 224 px, one thread, against 3)
        return images.float().mul_(scale).add_(shift)

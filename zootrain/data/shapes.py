"""Synthetic "shapes": coloured shapes on textured backgrounds, generated from (seed, index).

Every sample is a pure function of `(seed, split, index)`: no disk, no download, the same
image in every epoch and in every DataLoader worker. Drawn scenes are kept in a `SceneCache`
(in shared memory when the loader has workers), so each is drawn once per run. One scene serves every task: the
class of the largest shape (classification), a per-pixel class map (segmentation, 0 is the
background), a box per visible shape (detection) and, where asked, a mask per visible shape
(instance segmentation). Colours are drawn independently of the class, so only the geometry
tells shapes apart. `ShapesDataset` draws the scenes;
`ShapesDataModule` serves them to a run (`data=shapes`, the default).
"""

from __future__ import annotations

import logging
import math
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from backbones import IMAGENET_MEAN, IMAGENET_STD

from ..tasks import get_task
from .base import TaskDataModule

log = logging.getLogger(__name__)

SHAPES = ("circle", "square", "triangle", "star", "ring", "cross")
SPLITS = {"train": 0, "val": 1, "test": 2}


def _regular_polygon(n: int, phase: float) -> np.ndarray:
    angles = phase + 2 * math.pi * np.arange(n) / n
    return np.stack([np.cos(angles), np.sin(angles)], axis=1)  # (n, 2) on the unit circle


def _star() -> np.ndarray:
    outer = _regular_polygon(5, -math.pi / 2)
    inner = 0.45 * _regular_polygon(5, -math.pi / 2 + math.pi / 5)
    return np.stack([outer, inner], axis=1).reshape(10, 2)  # alternate outer and inner tips


def _cross(arm: float = 0.34) -> np.ndarray:
    a, b = arm, 1.0
    return np.array(
        [(a, b), (-a, b), (-a, a), (-b, a), (-b, -a), (-a, -a),
         (-a, -b), (a, -b), (a, -a), (b, -a), (b, a), (a, a)]
    )  # fmt: skip


# Unit outlines (radius 1), scaled so that shapes of one size draw have similar areas.
POLYGONS = {
    "square": 0.95 * _regular_polygon(4, math.pi / 4),
    "triangle": 1.1 * _regular_polygon(3, -math.pi / 2),
    "star": 1.2 * _star(),
    "cross": 1.0 * _cross(),
}


def _inside_polygon(x: np.ndarray, y: np.ndarray, vertices: np.ndarray) -> np.ndarray:
    """Even-odd rule: a point is inside when a ray to +x crosses the outline an odd number of times."""
    inside = np.zeros(x.shape, dtype=bool)
    for (x0, y0), (x1, y1) in zip(vertices, np.roll(vertices, -1, axis=0), strict=True):
        straddles = (y0 > y) != (y1 > y)
        with np.errstate(divide="ignore", invalid="ignore"):
            crossing_x = x0 + (y - y0) * (x1 - x0) / (y1 - y0)
        inside ^= straddles & (x < crossing_x)
    return inside


def shape_mask(kind: str, x: np.ndarray, y: np.ndarray, radius: float, angle: float) -> np.ndarray:
    """Pixels covered by a shape of `radius` centred at the origin of (x, y), rotated by `angle`."""
    cos, sin = math.cos(angle), math.sin(angle)
    u = (cos * x + sin * y) / radius  # shape-frame coordinates, radius 1
    v = (-sin * x + cos * y) / radius
    if kind == "circle":
        return u * u + v * v <= 0.9**2
    if kind == "ring":
        r2 = u * u + v * v
        return (r2 <= 1.0) & (r2 >= 0.55**2)
    return _inside_polygon(u, v, POLYGONS[kind])


@dataclass(frozen=True)
class Scene:
    image: torch.Tensor  # (3, H, W) uint8
    mask: torch.Tensor  # (H, W) int64: 0 background, k + 1 for class k
    boxes: torch.Tensor  # (N, 4) float xyxy of the visible part of each shape
    labels: torch.Tensor  # (N,) int64 class of each box
    label: int  # class of the shape with the largest visible area
    # (H, W) int64: 0 where no shape is, k + 1 where box k's shape is visible (None: not kept)
    instances: torch.Tensor | None = None


class SceneCache:
    """Every scene of a split in preallocated tensors, filled as scenes are first drawn.

    Images and masks are uint8 (as drawn: cached and drawn samples are identical; class ids fit
    in a byte), boxes and their labels padded to `max_shapes`; with `instances`, each scene's map
    of which shape owns a pixel too (uint8). After
    `share_memory_()` the tensors live in shared memory: a scene that one DataLoader worker
    draws is read by every other worker and by the main process, in every later epoch (with
    per-process caches, each worker would draw every scene again).
    """

    def __init__(
        self, length: int, image_size: int, max_shapes: int, instances: bool = False
    ) -> None:
        self.images = torch.empty(length, 3, image_size, image_size, dtype=torch.uint8)
        self.masks = torch.empty(length, image_size, image_size, dtype=torch.uint8)
        # Kept for instance segmentation only: the other tasks' caches stay as small as before.
        owners = torch.uint8 if max_shapes < 256 else torch.int32  # box numbers, from 1
        self.instances = (
            torch.empty(length, image_size, image_size, dtype=owners) if instances else None
        )
        self.boxes = torch.empty(length, max_shapes, 4)
        self.labels = torch.empty(length, max_shapes, dtype=torch.int64)
        self.counts = torch.empty(length, dtype=torch.int64)  # boxes of each scene
        self.label = torch.empty(length, dtype=torch.int64)
        self.filled = torch.zeros(length, dtype=torch.bool)

    def tensors(self) -> tuple[torch.Tensor, ...]:
        kept = (
            self.images,
            self.masks,
            self.boxes,
            self.labels,
            self.counts,
            self.label,
            self.filled,
        )
        return kept if self.instances is None else (*kept, self.instances)

    @property
    def nbytes(self) -> int:
        return sum(t.untyped_storage().nbytes() for t in self.tensors())

    def share_memory_(self) -> SceneCache:
        """Move to shared memory (a no-op when there already); warns and stays per process
        when /dev/shm has too little space (writing past it would kill the process)."""
        if self.filled.is_shared():
            return self
        free = shutil.disk_usage("/dev/shm").free if Path("/dev/shm").is_dir() else None
        if free is not None and free < 2 * self.nbytes:
            log.warning(
                "the shapes scene cache (%.0f MB) does not fit twice in /dev/shm (%.0f MB "
                "free): each DataLoader worker keeps its own copy and draws its scenes again",
                self.nbytes / 2**20,
                free / 2**20,
            )
            return self
        for tensor in self.tensors():
            tensor.share_memory_()
        return self

    def __contains__(self, index: int) -> bool:
        return bool(self.filled[index])

    def put(self, index: int, scene: Scene) -> None:
        count = len(scene.labels)
        self.images[index] = scene.image
        self.masks[index] = scene.mask
        self.boxes[index, :count] = scene.boxes
        self.labels[index, :count] = scene.labels
        self.counts[index] = count
        self.label[index] = scene.label
        if self.instances is not None:
            self.instances[index] = scene.instances
        self.filled[index] = True  # last: a reader in another process sees a whole scene

    def get(self, index: int) -> Scene:
        count = int(self.counts[index])
        return Scene(
            image=self.images[index],  # a view: callers build new tensors from it
            mask=self.masks[index].long(),
            boxes=self.boxes[index, :count].clone(),
            labels=self.labels[index, :count].clone(),
            label=int(self.label[index]),
            instances=None if self.instances is None else self.instances[index].long(),
        )


class ShapesDataset(Dataset):
    """Scenes of 1-`max_shapes` shapes; one large shape, smaller distractors under it.

    Args:
        split: "train", "val" or "test" (disjoint random streams).
        length: number of scenes.
        task: what `__getitem__` returns as target: "classification" (int),
            "segmentation" (mask), "detection" (dict of boxes and labels) or
            "instance_segmentation" (boxes, labels and a uint8 (N, H, W) mask per box, each
            the visible pixels of its shape, so that the box is the mask's tight box).
        image_size: side of the square images.
        classes: which shapes to draw, a subset of `SHAPES`.
        min_shapes, max_shapes: shapes per scene.
        seed: the dataset seed; (seed, split, index) fixes every sample.
        augment: apply one of the 8 symmetries of the square (rotations by 90 degrees and
            mirror images) to each sample, drawn from torch's random generator (which the
            training loader seeds per (seed, epoch, index), see `zootrain.data.sampling`). No
            label depends on orientation, so every scene gives 8 training views; use it on the
            train split only.
        cache: keep every drawn scene in a `SceneCache` (about 16.5 KB per 64 px scene,
            allocated for the whole split up front; `share_memory_()` shares it with the
            DataLoader workers). Drawing a scene costs ~1.2 ms at 64 px, a tenth of a training
            step's time per image on 2 CPU cores.
    """

    def __init__(
        self,
        split: str,
        length: int,
        task: str = "classification",
        image_size: int = 64,
        classes: tuple[str, ...] = SHAPES,
        min_shapes: int = 1,
        max_shapes: int = 4,
        seed: int = 0,
        augment: bool = False,
        cache: bool = False,
    ) -> None:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {list(SPLITS)}, got {split!r}")
        unknown = [c for c in classes if c not in SHAPES]
        if unknown or not classes or len(set(classes)) != len(classes):
            raise ValueError(
                f"classes must be distinct names from {list(SHAPES)}, got {list(classes)}"
            )
        if not 1 <= min_shapes <= max_shapes:
            raise ValueError(f"need 1 <= min_shapes <= max_shapes, got {min_shapes}, {max_shapes}")
        if image_size < 16:
            raise ValueError(f"image_size must be at least 16, got {image_size}")
        self.split, self.length = split, length
        self.target = get_task(task).target  # an unknown task is a ConfigError
        self.image_size, self.classes = image_size, tuple(classes)
        self.min_shapes, self.max_shapes, self.seed = min_shapes, max_shapes, seed
        self.augment = augment
        instances = self.target == "instances"
        self._cache = SceneCache(length, image_size, max_shapes, instances) if cache else None

    def __len__(self) -> int:
        return self.length

    def scene(self, index: int) -> Scene:
        """The raw scene behind sample `index` (its uint8 image, all labels)."""
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for {self.length} samples")
        if self._cache is None:
            return self._draw(index)
        if index not in self._cache:
            self._cache.put(index, self._draw(index))
        return self._cache.get(index)

    def share_memory_(self) -> ShapesDataset:
        """Put the scene cache in shared memory (before DataLoader workers start)."""
        if self._cache is not None:
            self._cache.share_memory_()
        return self

    def _draw(self, index: int) -> Scene:
        rng = np.random.default_rng([self.seed, SPLITS[self.split], index])
        size = self.image_size
        coords = np.arange(size, dtype=np.float32) + 0.5
        x, y = np.meshgrid(coords, coords)  # (H, W) pixel centres

        image = _background(rng, size, x, y)
        instance = np.full((size, size), -1, dtype=np.int64)  # which shape owns each pixel
        count = int(rng.integers(self.min_shapes, self.max_shapes + 1))
        # Distractors first and small, the main shape last and large: it stays whole and
        # is the largest; the label is still computed from the visible areas.
        radii = [rng.uniform(0.08, 0.16) * size for _ in range(count - 1)]
        radii.append(rng.uniform(0.2, 0.32) * size)
        kinds = rng.integers(len(self.classes), size=count)
        for position, radius in enumerate(radii):
            cx, cy = rng.uniform(radius, size - radius, size=2)
            angle = rng.uniform(0, 2 * math.pi)
            # Only the square around the shape can be covered (every outline fits in 1.2 radii).
            reach = 1.2 * radius + 1
            rows = slice(max(0, int(cy - reach)), min(size, int(cy + reach) + 1))
            cols = slice(max(0, int(cx - reach)), min(size, int(cx + reach) + 1))
            covered = shape_mask(
                self.classes[kinds[position]], x[rows, cols] - cx, y[rows, cols] - cy, radius, angle
            )
            window = image[:, rows, cols]  # a view: writing to it draws on the image
            colour = _contrasting_colour(rng, window[:, covered].mean(axis=1))
            window[:, covered] = colour[:, None]
            instance[rows, cols][covered] = position
        image += rng.normal(0, 0.04, size=image.shape).astype(np.float32)

        mask = np.where(instance >= 0, kinds[instance] + 1, 0)
        # k + 1 where box k's shape shows: for instance segmentation only (as its cache keeps)
        visible = np.zeros((size, size), dtype=np.int64) if self.target == "instances" else None
        boxes, labels, areas = [], [], []
        for position, kind in enumerate(kinds):
            rows, cols = np.nonzero(instance == position)
            if rows.size == 0:  # hidden under later shapes
                continue
            boxes.append((cols.min(), rows.min(), cols.max() + 1, rows.max() + 1))
            labels.append(int(kind))
            areas.append(rows.size)
            if visible is not None:
                visible[rows, cols] = len(boxes)
        return Scene(
            image=to_uint8(image),
            mask=torch.from_numpy(mask),
            boxes=torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            labels=torch.tensor(labels, dtype=torch.int64),
            label=labels[int(np.argmax(areas))],
            instances=None if visible is None else torch.from_numpy(visible),
        )

    def __getitem__(self, index: int):
        """(uint8 image, target): images are normalised on the device, as real data's are."""
        scene = self.scene(index)
        if self.augment:
            scene = square_symmetry(scene, int(torch.randint(8, ())))
        image = scene.image
        if self.target == "label":
            return image, scene.label
        if self.target == "mask":
            return image, scene.mask
        target = {"boxes": scene.boxes, "labels": scene.labels}
        if self.target == "instances":
            target["masks"] = instance_masks(scene)
        return image, target


def instance_masks(scene: Scene) -> torch.Tensor:
    """One uint8 (H, W) mask per box of `scene`, stacked (N, H, W): the visible pixels of its
    shape (torchvision's Mask R-CNN takes uint8 masks)."""
    if scene.instances is None:
        raise ValueError("this scene kept no instance map: draw it with task=instance_segmentation")
    numbers = torch.arange(1, len(scene.labels) + 1).view(-1, 1, 1)  # (N, 1, 1)
    return (scene.instances[None] == numbers).to(torch.uint8)


def square_symmetry(scene: Scene, which: int) -> Scene:
    """Symmetry `which` (0-7; 0 is the identity) of a square scene, applied to every label.

    The three bits of `which` choose a transpose, a horizontal and a vertical flip, in that
    order; together they give the 4 rotations by 90 degrees and their 4 mirror images.
    """
    if not 0 <= which < 8:
        raise ValueError(f"which must be in 0..7, got {which}")
    image, mask, boxes = scene.image, scene.mask, scene.boxes.clone()
    # the maps that move with the pixels: the mask, and the instance map where there is one
    maps = [mask] if scene.instances is None else [mask, scene.instances]
    size = image.shape[-1]
    if which & 1:  # transpose: x <-> y
        image, maps = image.transpose(-1, -2), [m.transpose(-1, -2) for m in maps]
        boxes = boxes[:, [1, 0, 3, 2]]
    if which & 2:  # horizontal flip: x -> size - x
        image, maps = image.flip(-1), [m.flip(-1) for m in maps]
        boxes[:, [0, 2]] = size - boxes[:, [2, 0]]
    if which & 4:  # vertical flip: y -> size - y
        image, maps = image.flip(-2), [m.flip(-2) for m in maps]
        boxes[:, [1, 3]] = size - boxes[:, [3, 1]]
    return Scene(
        image=image.contiguous(),
        mask=maps[0].contiguous(),
        boxes=boxes,
        labels=scene.labels,
        label=scene.label,
        instances=maps[1].contiguous() if len(maps) > 1 else None,
    )


def to_uint8(image: np.ndarray) -> torch.Tensor:
    """A drawn (3, H, W) float image in about [0, 1] as uint8 (rounded: at most half a level,
    1/510, from the drawn value)."""
    return torch.from_numpy(np.rint(np.clip(image, 0.0, 1.0) * 255).astype(np.uint8))


def _background(rng: np.random.Generator, size: int, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """A smooth two-colour blend plus stripes: texture that is not a shape."""
    low, high = rng.uniform(0, 1, size=(2, 3, 1, 1)).astype(np.float32)
    angle = rng.uniform(0, 2 * math.pi)
    ramp = (math.cos(angle) * x + math.sin(angle) * y) / size  # in about [-1.4, 1.4]
    blend = 0.5 + 0.5 * np.sin(math.pi * ramp + rng.uniform(0, 2 * math.pi))
    period = rng.uniform(4, 12)
    stripe_angle = rng.uniform(0, math.pi)
    stripes = np.sin(
        2 * math.pi * (math.cos(stripe_angle) * x + math.sin(stripe_angle) * y) / period
    )
    image = low + (high - low) * blend[None] + 0.08 * stripes[None]
    return image.astype(np.float32)  # (3, H, W)


def _contrasting_colour(rng: np.random.Generator, under: np.ndarray) -> np.ndarray:
    """A uniformly random colour at least 0.35 (RGB distance) away from what it covers."""
    under = np.nan_to_num(under, nan=0.5)
    for _ in range(100):
        colour = rng.uniform(0, 1, size=3).astype(np.float32)
        if np.linalg.norm(colour - under) >= 0.35:
            return colour
    return (1.0 - under).astype(np.float32)  # unreachable in practice; still a contrast


class ShapesDataModule(TaskDataModule):
    """The synthetic shapes scenes (see `ShapesDataset`): no download, no disk.

    Args:
        task: "classification", "segmentation", "detection" or "instance_segmentation" (set
            from the head config).
        image_size: side of the square images.
        num_train, num_val, num_test: scenes per split.
        classes: shape names to draw, a subset of `SHAPES`.
        min_shapes, max_shapes: shapes per scene.
        seed: the dataset seed (independent of the training seed).
        augment: random rotations by 90 degrees and mirror images of the training scenes
            (labels follow; validation and test are never augmented).
        cache: keep drawn scenes in memory after their first use (about 16.5 KB per 64 px
            scene, one copy shared by the DataLoader workers); the same samples, ~10% faster
            training from the second epoch on.
        batch_size, num_workers: DataLoader settings (`num_workers`: "auto" or a count).
    """

    targets = ("label", "mask", "boxes", "instances")
    # The images are normalised (on the device) with ImageNet's statistics, whatever the backbone.
    mean, std = IMAGENET_MEAN, IMAGENET_STD

    def __init__(
        self,
        task: str = "classification",
        image_size: int = 64,
        num_train: int = 4000,
        num_val: int = 500,
        num_test: int = 500,
        classes: tuple[str, ...] | list[str] = SHAPES,
        min_shapes: int = 1,
        max_shapes: int = 4,
        seed: int = 0,
        augment: bool = True,
        cache: bool = True,
        batch_size: int = 64,
        num_workers: int | str = "auto",
    ) -> None:
        super().__init__(task, batch_size, num_workers)
        common = dict(
            task=self.task.name,
            image_size=image_size,
            classes=tuple(classes),
            min_shapes=min_shapes,
            max_shapes=max_shapes,
            seed=seed,
            cache=cache,
        )
        self.splits = {
            "train": ShapesDataset("train", num_train, augment=augment, **common),
            "val": ShapesDataset("val", num_val, **common),
            "test": ShapesDataset("test", num_test, **common),
        }
        self.classes = tuple(classes)

    @property
    def num_classes(self) -> int:
        # Segmentation predicts the background as class 0.
        return len(self.classes) + self.task.background_class

    @property
    def class_names(self) -> list[str]:
        return (["background"] if self.task.background_class else []) + list(self.classes)

"""The synthetic shapes data: determinism, label consistency, colour independence, symmetries."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from backbones import IMAGENET_MEAN, IMAGENET_STD
from zootrain.data import shapes
from zootrain.data.shapes import (
    SHAPES,
    Scene,
    ShapesDataModule,
    ShapesDataset,
    instance_masks,
    square_symmetry,
)
from zootrain.data.transforms import DeviceNormalize


def test_a_sample_is_a_function_of_seed_split_and_index() -> None:
    a = ShapesDataset("train", 10, image_size=32)
    b = ShapesDataset("train", 10, image_size=32)
    assert torch.equal(a[3][0], b[3][0]) and a[3][1] == b[3][1]
    assert not torch.equal(a[3][0], a[4][0])
    assert not torch.equal(a[3][0], ShapesDataset("val", 10, image_size=32)[3][0])
    assert not torch.equal(a[3][0], ShapesDataset("train", 10, image_size=32, seed=1)[3][0])


def test_uint8_scenes_normalise_to_the_drawn_values(monkeypatch: pytest.MonkeyPatch) -> None:
    """What the model sees: the uint8 image normalised on the device is the drawn float scene
    normalised (as the data gave it before), to half a level: 0.5 / 255 / std <= 0.0088."""
    drawn = []
    to_uint8 = shapes.to_uint8
    monkeypatch.setattr(shapes, "to_uint8", lambda image: drawn.append(image) or to_uint8(image))
    dataset = ShapesDataset("val", 4, task="segmentation", image_size=32)
    batch = torch.stack([dataset[i][0] for i in range(4)])
    assert batch.dtype == torch.uint8
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    before = (torch.from_numpy(np.clip(np.stack(drawn), 0, 1)) - mean) / std
    now = DeviceNormalize(IMAGENET_MEAN, IMAGENET_STD)(batch)
    assert (now - before).abs().amax((0, 2, 3)).le(0.5 / 255 / std.flatten() + 1e-6).all()
    assert (now - before).abs().max() > 1e-3  # rounded: not the float values themselves


def test_the_cache_returns_the_drawn_samples() -> None:
    cached = ShapesDataset("train", 6, task="detection", image_size=32, cache=True)
    drawn = ShapesDataset("train", 6, task="detection", image_size=32)
    for _ in range(2):  # the first pass draws and stores, the second reads the cache
        for i in range(6):
            a, b = cached.scene(i), drawn.scene(i)
            assert torch.equal(a.image, b.image) and torch.equal(a.boxes, b.boxes)
            assert a.mask.dtype == torch.int64 and torch.equal(a.mask, b.mask)
            assert a.label == b.label and torch.equal(a.labels, b.labels)
    assert cached._cache.filled.all() and cached._cache.masks.dtype == torch.uint8
    # 32 px: uint8 image and mask, 4 padded boxes and labels, count and label, flag
    assert cached._cache.nbytes == 6 * (3 * 32 * 32 + 32 * 32 + 4 * 4 * 4 + 4 * 8 + 2 * 8 + 1)
    assert cached._cache.instances is None  # kept for instance segmentation only
    assert not ShapesDataModule("segmentation", num_train=4).splits["train"]._cache.filled.any()
    assert ShapesDataModule("segmentation", num_train=4, cache=False).splits["train"]._cache is None


def _no_drawing(self: ShapesDataset, index: int) -> Scene:
    raise AssertionError(f"scene {index} drawn again")


@pytest.mark.filterwarnings("ignore:This DataLoader will create 2 worker processes")
def test_workers_share_the_cache_so_no_scene_is_drawn_twice(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    dataset = ShapesDataset("train", 8, task="segmentation", image_size=32, cache=True)
    dataset.share_memory_()
    assert all(t.is_shared() for t in dataset._cache.tensors())
    first = list(DataLoader(dataset, batch_size=2, num_workers=2))  # the workers draw
    assert dataset._cache.filled.all()  # ... and the main process sees what they stored
    monkeypatch.setattr(ShapesDataset, "_draw", _no_drawing)  # new workers inherit this
    second = list(DataLoader(dataset, batch_size=2, num_workers=2))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(first, second, strict=True))
    assert torch.equal(dataset[5][1], first[2][1][1])  # the main process reads it too


def test_a_cache_that_does_not_fit_in_shared_memory_stays_per_process(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    dataset = ShapesDataset("train", 8, image_size=32, cache=True)
    usage = shutil.disk_usage("/dev/shm")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=1000))
    dataset.share_memory_()
    assert not dataset._cache.filled.is_shared()
    assert "does not fit twice in /dev/shm (0 MB free)" in caplog.text


@pytest.mark.filterwarnings("ignore:This DataLoader will create 2 worker processes")
def test_workers_see_the_same_samples() -> None:
    dataset = ShapesDataset("val", 8, task="segmentation", image_size=32)
    loaded = list(DataLoader(dataset, batch_size=4, num_workers=2))
    images = torch.cat([images for images, _ in loaded])
    masks = torch.cat([masks for _, masks in loaded])
    assert torch.equal(images, torch.stack([dataset[i][0] for i in range(8)]))
    assert torch.equal(masks, torch.stack([dataset[i][1] for i in range(8)]))


@pytest.mark.parametrize("index", range(20))
def test_the_labels_of_one_scene_agree(index: int) -> None:
    dataset = ShapesDataset("train", 20, image_size=48, max_shapes=4)
    scene = dataset.scene(index)
    assert scene.image.shape == (3, 48, 48) and scene.image.dtype == torch.uint8
    assert 1 <= len(scene.labels) <= 4 and scene.boxes.shape == (len(scene.labels), 4)
    # Every class in the mask has a box, and the label is one of them.
    assert set(scene.mask.unique().tolist()) - {0} == {int(c) + 1 for c in scene.labels}
    assert scene.label in scene.labels.tolist()
    assert_boxes_are_tight(scene)
    # The main shape is drawn last and whole: its class covers the most pixels.
    counts = torch.bincount(scene.mask.flatten(), minlength=len(SHAPES) + 1)[1:]
    assert counts[scene.label] == counts.max()


def test_colour_does_not_give_the_class_away() -> None:
    """The mean colour of each class's pixels is the same for every class, within noise."""
    dataset = ShapesDataset("train", 300, image_size=32, max_shapes=1)
    sums, counts = torch.zeros(len(SHAPES), 3), torch.zeros(len(SHAPES))
    for i in range(len(dataset)):
        scene = dataset.scene(i)
        pixels = scene.mask == scene.label + 1
        sums[scene.label] += scene.image[:, pixels].float().mean(1) / 255
        counts[scene.label] += 1
    assert counts.min() > 30  # every class is drawn
    means = sums / counts[:, None]
    assert (means - means.mean(0)).abs().max() < 0.08, means


def test_class_subset_and_counts() -> None:
    dataset = ShapesDataset("train", 30, classes=("ring", "star"), min_shapes=2, max_shapes=3)
    for i in range(30):
        scene = dataset.scene(i)
        assert set(scene.labels.tolist()) <= {0, 1}
        assert scene.mask.max() <= 2
    module = ShapesDataModule("segmentation", classes=["ring", "star"], num_train=4)
    assert module.num_classes == 3 and module.class_names == ["background", "ring", "star"]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"split": "dev"}, "split must be one of"),
        ({"task": "depth"}, "unknown task 'depth'"),
        ({"classes": ("circle", "hexagon")}, "classes must be distinct names"),
        ({"classes": ("circle", "circle")}, "classes must be distinct names"),
        ({"min_shapes": 3, "max_shapes": 2}, "need 1 <= min_shapes <= max_shapes"),
        ({"image_size": 8}, "image_size must be at least 16"),
    ],
)
def test_bad_arguments(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ShapesDataset(**{"split": "train", "length": 4, **kwargs})


def test_the_eight_symmetries_move_every_label_together() -> None:
    scene = ShapesDataset("train", 1, image_size=40, max_shapes=4, min_shapes=4).scene(0)
    views = [square_symmetry(scene, k) for k in range(8)]
    assert torch.equal(views[0].image, scene.image) and torch.equal(views[0].boxes, scene.boxes)
    assert len({v.image.numpy().tobytes() for v in views}) == 8  # all distinct
    for view in views:
        assert view.label == scene.label and torch.equal(view.labels, scene.labels)
        # The mask follows the image: every mask pixel keeps the colour it had.
        assert torch.equal(
            torch.sort(view.image[:, view.mask > 0].flatten()).values,
            torch.sort(scene.image[:, scene.mask > 0].flatten()).values,
        )
        assert_boxes_are_tight(view)
    # Transpose, then a horizontal flip: a quarter turn clockwise.
    assert torch.equal(views[3].image, torch.rot90(scene.image, -1, (-2, -1)))
    with pytest.raises(ValueError, match=r"which must be in 0\.\.7"):
        square_symmetry(scene, 8)


def test_only_the_training_split_is_augmented() -> None:
    module = ShapesDataModule("detection", image_size=32, num_train=4, num_val=4, num_test=4)
    train, val = module.splits["train"], module.splits["val"]
    assert train.augment and not val.augment
    torch.manual_seed(0)
    views = {train[0][0].numpy().tobytes() for _ in range(40)}
    plain = ShapesDataset("train", 4, task="detection", image_size=32)
    allowed = {square_symmetry(plain.scene(0), k).image.numpy().tobytes() for k in range(8)}
    assert views <= allowed and len(views) > 4
    unaugmented = ShapesDataset("val", 4, task="detection", image_size=32)
    assert torch.equal(val[1][0], unaugmented[1][0])
    assert torch.equal(val[1][1]["boxes"], unaugmented[1][1]["boxes"])


def assert_boxes_are_tight(scene: Scene) -> None:
    """Each box's edge rows and columns touch its class in the mask (occlusion may cut holes
    inside the box)."""
    for (x0, y0, x1, y1), label in zip(scene.boxes.tolist(), scene.labels.tolist(), strict=True):
        inside = scene.mask[int(y0) : int(y1), int(x0) : int(x1)] == label + 1
        assert inside[0].any() and inside[-1].any() and inside[:, 0].any() and inside[:, -1].any()


@pytest.mark.parametrize("cache", [False, True])
def test_instance_masks_are_the_visible_pixels_of_each_boxed_shape(cache: bool) -> None:
    dataset = ShapesDataset(
        "train", 12, "instance_segmentation", image_size=48, min_shapes=3, cache=cache
    )
    for index in range(12):
        for _ in range(1 + cache):  # with the cache: drawn, then read back
            _, target = dataset[index]
        scene = dataset.scene(index)
        masks = target["masks"]
        assert masks.dtype == torch.uint8 and masks.shape == (len(target["labels"]), 48, 48)
        assert set(masks.unique().tolist()) <= {0, 1}
        assert torch.equal(target["boxes"], scene.boxes)
        # The masks do not overlap, and together they paint the class map (the visible class
        # of each pixel): each mask holds the visible pixels of its shape, not the hidden ones.
        assert masks.sum(0).max() <= 1
        painted = (masks * (target["labels"] + 1).view(-1, 1, 1)).sum(0)
        assert torch.equal(painted, scene.mask)
        for mask, box in zip(masks, target["boxes"].tolist(), strict=True):
            rows, cols = mask.nonzero(as_tuple=True)
            tight = [cols.min(), rows.min(), cols.max() + 1, rows.max() + 1]
            assert [int(v) for v in tight] == box  # the box is its mask's tight box


def test_instance_masks_follow_the_symmetries() -> None:
    dataset = ShapesDataset("train", 1, "instance_segmentation", image_size=40, min_shapes=4)
    scene = dataset.scene(0)
    for k in range(8):
        view = square_symmetry(scene, k)
        masks = instance_masks(view)
        for mask, (x0, y0, x1, y1) in zip(masks, view.boxes.long().tolist(), strict=True):
            rows, cols = mask.nonzero(as_tuple=True)
            assert (cols.min(), rows.min(), cols.max() + 1, rows.max() + 1) == (x0, y0, x1, y1)
        painted = (masks * (view.labels + 1).view(-1, 1, 1)).sum(0)
        assert torch.equal(painted, view.mask)


def test_the_instance_task_is_served_and_its_scenes_keep_the_instance_map() -> None:
    module = ShapesDataModule("instance_segmentation", image_size=32, num_train=4)
    assert module.num_classes == len(SHAPES)  # no background class: Mask R-CNN adds its own
    _, target = module.splits["train"][0]
    assert set(target) == {"boxes", "labels", "masks"}
    detection = ShapesDataset("train", 2, "detection", image_size=32, cache=True)
    with pytest.raises(ValueError, match="kept no instance map"):
        instance_masks(detection.scene(0))

"""Lightning data modules. Each says which tasks it serves and how many classes each has."""

from __future__ import annotations

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from .shapes import SHAPES, ShapesDataset


def detection_collate(batch: list) -> tuple[list[torch.Tensor], list[dict]]:
    """Detection images may differ in size and box count: keep them as lists."""
    images, targets = zip(*batch, strict=True)
    return list(images), list(targets)


class TaskDataModule(L.LightningDataModule):
    """Data for one task, chosen by the head; subclasses give `num_classes`, the one source of
    truth, and fill `splits` ("train", "val", "test"), in `__init__` or `setup`."""

    tasks: tuple[str, ...] = ()

    def __init__(self, task: str, batch_size: int = 32, num_workers: int = 0) -> None:
        super().__init__()
        if task not in self.tasks:
            raise ValueError(
                f"data module {type(self).__name__} serves the tasks {list(self.tasks)}, "
                f"not {task!r}: pick a head for one of those tasks or another data config"
            )
        self.task = task
        self.batch_size, self.num_workers = batch_size, num_workers
        self.splits: dict[str, Dataset] = {}

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        if not self.splits:
            self.setup()
        dataset = self.splits[split]
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            collate_fn=detection_collate if self.task == "detection" else None,
            drop_last=shuffle and len(dataset) > self.batch_size,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)


class ShapesDataModule(TaskDataModule):
    """The synthetic shapes scenes (see `training.shapes`): no download, no disk.

    Args:
        task: "classification", "segmentation" or "detection" (set from the head config).
        image_size: side of the square images.
        num_train, num_val, num_test: scenes per split.
        classes: shape names to draw, a subset of `training.shapes.SHAPES`.
        min_shapes, max_shapes: shapes per scene.
        seed: the dataset seed (independent of the training seed).
        augment: random rotations by 90 degrees and mirror images of the training scenes
            (labels follow; validation and test are never augmented).
        cache: keep generated scenes in memory after their first use (about 52 KB per
            64 px scene, in every process that draws them); the same samples, ~10% faster
            training from the second epoch on.
        batch_size, num_workers: DataLoader settings.
    """

    tasks = ("classification", "segmentation", "detection")

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
        num_workers: int = 0,
    ) -> None:
        super().__init__(task, batch_size, num_workers)
        common = dict(
            task=task,
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
        return len(self.classes) + (self.task == "segmentation")

    @property
    def class_names(self) -> list[str]:
        return (["background"] if self.task == "segmentation" else []) + list(self.classes)

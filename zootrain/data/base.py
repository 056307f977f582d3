"""What every data module shares: the task check, the loaders, the base of the disk datasets.

`TaskDataModule` serves one task (chosen by the head: the kind of target its samples carry,
how they batch, the augmentation preset) and owns the DataLoaders (their worker
count, pinned memory and persistent workers follow the trainer's device, see `loader_workers`);
subclasses fill `splits` and give `num_classes`. Samples carry uint8 images: the batches cross
to the device as uint8 and are normalised there with the module's `mean` / `std`
(`zootrain.module.TaskModule.on_after_batch_transfer`). `DiskDataModule` adds what every real
dataset needs: a `root` checked (and, where torchvision can, downloaded) before the model is
built, with one message that shows the expected layout; the transform presets of
`zootrain.data.transforms` (decoding and geometry in uint8), with the backbone's statistics
for the device; and a seeded hold-out for datasets that have no validation split.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import lightning as L
import numpy as np
import torch
from lightning.pytorch.accelerators import CUDAAccelerator
from torch.utils.data import DataLoader, Dataset
from torchvision import tv_tensors
from torchvision.transforms.v2 import functional as F

from backbones import IMAGENET_MEAN, IMAGENET_STD

from ..errors import ConfigError, DatasetError
from ..tasks import Task, get_task, tasks_for
from .sampling import EpochLoader, EpochSampler, EpochSeeded
from .transforms import IGNORE_INDEX

log = logging.getLogger(__name__)
T = TypeVar("T")


MAX_AUTO_WORKERS = 8  # per GPU: what a DataLoader needs to keep one GPU fed on most data


def usable_cpus() -> int:
    """The CPU cores this process may run on (its affinity mask, e.g. a SLURM allocation)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def loader_workers(num_workers: int | str, on_cuda: bool, devices: int = 1) -> int:
    """The DataLoader worker processes for `num_workers` ("auto" or a count >= 0).

    "auto" is 0 when training on the CPU: the model's kernels use every core, and loading in
    the main process cost 1-3% of a step in `python -m benchmarks.training` (a worker would take a
    core from the model). On a GPU the main process only launches kernels, so the cores are
    shared among the node's GPUs, one left for each main process, at most `MAX_AUTO_WORKERS`.
    """
    if num_workers == "auto":
        if not on_cuda:
            return 0
        return max(1, min(MAX_AUTO_WORKERS, usable_cpus() // max(1, devices) - 1))
    if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
        raise ConfigError(
            f"data.num_workers must be 'auto' or an integer >= 0, got {num_workers!r}"
        )
    return num_workers


class TaskDataModule(L.LightningDataModule):
    """Data for one task, chosen by the head; subclasses give `num_classes`, the one source of
    truth, and fill `splits` ("train", "val", "test"), in `__init__` or `setup`.

    The loaders take their settings from the trainer the module is attached to: on a CUDA
    device pinned memory (asynchronous copies to the GPU) and, with `num_workers="auto"`,
    worker processes (see `loader_workers`); workers persist across epochs. A dataset with a
    `share_memory_()` method (the shapes scene cache) is moved to shared memory before its
    workers start, so that what one worker stores every process reads.
    """

    # The kinds of target (`zootrain.tasks.TARGETS`) its samples can carry: it serves the
    # tasks that ask for one of them.
    targets: tuple[str, ...] = ()
    # The per-channel statistics the uint8 images are normalised with on the device (after
    # scaling to [0, 1]); None: scaled only.
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None

    def __init__(self, task: str, batch_size: int = 32, num_workers: int | str = "auto") -> None:
        super().__init__()
        self.task: Task = get_task(task)
        if self.task.target not in self.targets:
            raise ConfigError(
                f"data module {type(self).__name__} serves the tasks {tasks_for(self.targets)}, "
                f"not {task!r}: pick a head for one of those tasks or another data config"
            )
        loader_workers(num_workers, on_cuda=False)  # a bad value fails here, not at fit
        self.batch_size, self.num_workers = batch_size, num_workers
        self.splits: dict[str, Dataset] = {}
        # The training order and augmentations follow (sample_seed, epoch, index), see
        # `zootrain.data.sampling`; `build_datamodule` sets the run's seed.
        self.sample_seed = 0

    def _on_cuda(self) -> tuple[bool, int]:
        """(training on CUDA, devices per node) of the attached trainer; (False, 1) without one."""
        trainer = self.trainer
        if trainer is None:
            return False, 1
        return isinstance(trainer.accelerator, CUDAAccelerator), trainer.num_devices

    def _once_per_run(self, compute: Callable[[], T]) -> T:
        """`compute()` on global rank 0 only, its result sent to every other rank: the work
        each process needs once per run (listing a folder of a million files), done once.

        Every rank calls it at the same point (in `setup`). A `DatasetError` on rank 0 is
        raised on every rank, so that none waits for a result that will not come.
        """
        trainer = self.trainer
        if trainer is None or trainer.world_size == 1:
            return compute()
        outcome: tuple[T | None, str | None] = (None, None)
        if trainer.global_rank == 0:
            try:
                outcome = (compute(), None)
            except DatasetError as error:
                outcome = (None, str(error))
        result, message = trainer.strategy.broadcast(outcome, src=0)
        if message is not None:
            raise DatasetError(message)
        return result

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        if not self.splits:
            self.setup()
        dataset = self._served(split)
        on_cuda, devices = self._on_cuda()
        workers = loader_workers(self.num_workers, on_cuda, devices)
        if workers and hasattr(dataset, "share_memory_"):
            dataset.share_memory_()
        sampler = None
        if shuffle:  # the order and augmentations of (seed, epoch): a resume replays neither
            trainer = self.trainer
            replicas, rank = (
                (1, 0) if trainer is None else (trainer.world_size, trainer.global_rank)
            )
            sampler = EpochSampler(dataset, self.sample_seed, replicas, rank)
            dataset = EpochSeeded(dataset, self.sample_seed)
        return (EpochLoader if shuffle else DataLoader)(
            dataset,
            batch_size=self.batch_size,
            sampler=sampler,
            num_workers=workers,
            persistent_workers=workers > 0,
            pin_memory=on_cuda,
            collate_fn=self._collate(split),
            drop_last=shuffle and len(dataset) > self.batch_size,
        )

    def _served(self, split: str) -> Dataset:
        """What the loader of `split` reads (the split itself; a data module may serve another
        view of it, as ImageFolder's `decode="device"` serves undecoded JPEGs)."""
        return self.splits[split]

    def _collate(self, split: str) -> Callable[[list[Any]], Any]:
        """How the loader of `split` makes a batch of the samples `_served` gives."""
        return self.task.collate

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)


class DiskDataModule(TaskDataModule):
    """Base of the data modules that read a dataset from `root`.

    Subclasses set `title`, `layout` (the expected tree under root) and implement
    `_layout_problem` (what is missing, or None), `_read_classes` and `_build_splits`
    (the raw train/val/test datasets and their transforms); `_download` where torchvision
    can fetch the dataset. A dataset without a validation split calls `_set_hold_out` in
    `__init__` and builds its splits with `_hold_out_splits` (classification ones set `crop`,
    the options of the classification preset).

    Args:
        task: set from the head config; one of the subclass's `tasks`.
        root: the dataset folder (see each subclass's layout).
        download: fetch the dataset with torchvision when it is not under root.
        image_size: side of the square training crops (and of the eval images).
        batch_size, num_workers: DataLoader settings (`num_workers`: "auto" or a count, see
            `loader_workers`).
        mean, std: per-channel normalisation; `build_datamodule` passes the backbone's.
    """

    title = ""  # the dataset's name in messages
    layout = ""  # the expected tree under root; its first line is the top folder
    downloadable = True  # torchvision can fetch it
    get_it = "Set data.root to the folder that holds it."  # the advice when it cannot

    def __init__(
        self,
        task: str,
        root: str | Path,
        download: bool = False,
        image_size: int = 224,
        batch_size: int = 32,
        num_workers: int | str = "auto",
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
    ) -> None:
        super().__init__(task, batch_size, num_workers)
        if image_size < 16:
            raise ValueError(f"image_size must be at least 16, got {image_size}")
        self.root = Path(root).expanduser()
        self.download = download
        self.image_size = image_size
        self.mean, self.std = tuple(mean), tuple(std)
        self.test_split = "test"  # the split that `test_dataloader` reads (some datasets: val)
        self._present = False
        self._classes: list[str] | None = None

    # ------------------------------------------------------------------ what subclasses give

    def _layout_problem(self) -> str | None:
        raise NotImplementedError

    def _read_classes(self) -> list[str]:
        raise NotImplementedError

    def _build_splits(self) -> dict[str, Dataset]:
        raise NotImplementedError

    def _download(self) -> None:
        raise NotImplementedError

    # ------------------------------------------------------------------ shared

    @property
    def class_names(self) -> list[str]:
        if self._classes is None:
            self._ensure_present()
            self._classes = self._read_classes()
        return list(self._classes)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def prepare_data(self) -> None:
        self._ensure_present()

    def setup(self, stage: str | None = None) -> None:
        if not self.splits:
            self._ensure_present()
            _ = self.class_names  # class checks (ImageFolder's folders) before reading files
            self.splits = self._build_splits()
            if self.test_split != "test":
                log.info(
                    "%s has no labelled test split: the test split is %s",
                    self.title,
                    self.test_split,
                )

    def _ensure_present(self) -> None:
        if self._present:
            return
        problem = self._layout_problem()
        if problem is not None and self.download:
            if not self.downloadable:
                raise DatasetError(
                    f"{self.title}: torchvision cannot download it ({problem}).\n"
                    f"{self._expected()}\n{self.get_it}"
                )
            if _local_rank() != 0:
                raise DatasetError(
                    f"{self.title} is not under {self.root} yet and only local rank 0 "
                    "downloads; run once with data.download=true in a single process first"
                )
            try:
                self._download()
            except OSError as error:  # urllib's URLError (offline, no DNS) is an OSError
                raise DatasetError(
                    f"{self.title}: data.download=true could not download it into {self.root} "
                    f"({type(error).__name__}: {error}). Is this machine offline? Download it "
                    "where there is internet (data.download=true there), copy it to data.root "
                    "and set data.download=false"
                ) from None
            problem = self._layout_problem()
        if problem is not None:
            advice = (
                "Set data.root to the folder that holds it, or data.download=true to fetch it "
                "with torchvision."
                if self.downloadable
                else self.get_it
            )
            raise DatasetError(
                f"no {self.title} at data.root: {problem}.\n{self._expected()}\n"
                f"{self._hint()}{advice}"
            )
        self._present = True

    def _expected(self) -> str:
        tree = "\n".join("  " + line for line in self.layout.strip().splitlines())
        return f"Expected under data.root={self.root}:\n{tree}"

    def _hint(self) -> str:
        """A root that points inside the dataset (a common slip) gets the right one named."""
        top = self.layout.strip().splitlines()[0].split()[0].rstrip("/")  # e.g. VOCdevkit/VOC2012
        if self.root.parts[-len(top.split("/")) :] == tuple(top.split("/")):
            return f"data.root points inside the dataset: try data.root={self.root.parents[top.count('/')]}. "
        return ""

    def _set_hold_out(self, val_fraction: float, seed: int) -> None:
        """For datasets without a validation split: the seeded part of train that validates."""
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
        self.val_fraction, self.seed = val_fraction, seed

    def _transform(self, train: bool, **options: Any) -> Callable:
        """The task's augmentation preset for a train or an eval split of this dataset."""
        return self.task.transform(train, self.image_size, **options)

    def _hold_out_splits(self, train: Dataset, test: Dataset) -> dict[str, Dataset]:
        """Splits of a dataset that has only train and test: val is a seeded random
        `val_fraction` of train (see `_set_hold_out`), or (with 0) the test split."""
        options = self.crop if self.task.target == "label" else {}
        train_tf, eval_tf = self._transform(True, **options), self._transform(False, **options)
        if self.val_fraction == 0:
            log.info("%s: val_fraction=0, validating on the test split", self.title)
            return {
                "train": Transformed(train, train_tf),
                "val": Transformed(test, eval_tf),
                "test": Transformed(test, eval_tf),
            }
        generator = torch.Generator().manual_seed(self.seed)
        order = torch.randperm(len(train), generator=generator).tolist()
        count = max(1, round(self.val_fraction * len(train)))
        kept, held = sorted(order[count:]), sorted(order[:count])
        return {
            "train": Transformed(train, train_tf, kept),
            "val": Transformed(train, eval_tf, held),
            "test": Transformed(test, eval_tf),
        }


def _local_rank() -> int:
    """This process's rank on its node, from the launcher's environment (0 when alone)."""
    for key in ("LOCAL_RANK", "SLURM_LOCALID"):
        if key in os.environ:
            return int(os.environ[key])
    return 0


def missing_files(paths: Sequence[Path], listed_in: Path) -> str | None:
    """None when every path exists, else how many are missing and the first few."""
    missing = [p for p in paths if not p.is_file()]
    if not missing:
        return None
    shown = ", ".join(str(p) for p in missing[:3]) + (", ..." if len(missing) > 3 else "")
    return f"{len(missing)} of the {len(paths)} files listed in {listed_in} are missing: {shown}"


class Transformed(Dataset):
    """Samples `indices` (all when None) of `dataset` through `transforms(image, target)`."""

    def __init__(
        self,
        dataset: Dataset,
        transforms: Callable[[Any, Any], tuple[Any, Any]],
        indices: Sequence[int] | None = None,
    ) -> None:
        self.dataset, self.transforms = dataset, transforms
        # A range, not a list, for a whole dataset: a million int objects would be copied into
        # every forked DataLoader worker as their reference counts are touched
        self.indices = range(len(dataset)) if indices is None else list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> tuple[Any, Any]:
        return self.transforms(*self.dataset[self.indices[index]])


class AsMasks(Dataset):
    """(PIL image, PIL class map) samples as (tv Image, tv Mask), values mapped by `lookup`."""

    def __init__(self, dataset: Dataset, lookup: dict[int, int] | None = None) -> None:
        self.dataset = dataset
        self.table = None
        if lookup is not None:
            self.table = torch.full((256,), IGNORE_INDEX, dtype=torch.uint8)
            for value, label in lookup.items():
                self.table[value] = label

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[tv_tensors.Image, tv_tensors.Mask]:
        image, mask = self.dataset[index]
        mask = torch.from_numpy(np.array(mask, dtype=np.uint8))  # (H, W); palette indices
        if self.table is not None:
            mask = self.table[mask.long()]
        return F.to_image(image), tv_tensors.Mask(mask)

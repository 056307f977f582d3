"""Classification from a folder of class sub-folders per split, listed by a directory walk.

Setting up opens no file: listing a split is a walk of its class folders (as torchvision's
ImageFolder does; links are followed, but a folder reached twice, such as a link back up the
tree, is listed once), run once per run on global rank 0 and sent to the other DDP ranks. A
damaged file is named when a batch first reads it; `verify_files` decodes every file first.
With `decode="device"` workers pass JPEGs on undecoded, with their crop drawn, and the batch is
decoded on its device (`DeviceDecoded`).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from backbones import IMAGENET_MEAN, IMAGENET_STD

from ..errors import ConfigError, DatasetError
from .base import DiskDataModule, Transformed, usable_cpus
from .images import EncodedJpeg, read_encoded, read_image
from .transforms import ClassificationGeometry, EncodedImages, collate_samples

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
# What is listed, by suffix in any case: torchvision ImageFolder's and the other formats PIL reads
# that photographs and datasets come in. Other files are left out, and counted in a warning.
IMAGE_EXTENSIONS = frozenset(
    (".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".ppm", ".pgm", ".pbm", ".pnm", ".bmp", ".tif",
     ".tiff", ".webp", ".gif", ".tga", ".avif")
)  # fmt: skip
SHOWN = 20  # files named in a message, at most
DECODE = ("worker", "device")  # where JPEGs are decoded: data.decode


class ImageFolderDataModule(DiskDataModule):
    """Classification from a folder of class sub-folders per split (torchvision's layout).

    Args:
        root: holds train/<class>/*, val/<class>/* and optionally test/<class>/* (without
            test/ the test split is val/). Class names are the train/ folder names; val/
            (and test/) must have the same ones. Hidden files and folders are ignored, and so
            are files without an image suffix (`IMAGE_EXTENSIONS`; a warning counts them).
        skip_bad_files: a file that does not decode fails the run when a batch reads it, named;
            with True it is named in a warning and its sample is replaced by the next readable
            one in the split (index + 1, + 2, ...), so batches keep their size and a resumed run
            its order.
        verify_files: decode every file of every split before the run starts (on global rank 0,
            threads on its cores; the others wait) and name every one that fails; with
            `skip_bad_files` they are left out instead, with a warning. `python -m zootrain.data
            verify ROOT` runs the same check on its own.
        crop_scale: area range of the training RandomResizedCrop.
        crop_pct: eval images are resized to image_size / crop_pct, then center-cropped.
        decode: "worker" (decode, crop and resize in the DataLoader workers) or "device":
            workers read each JPEG's bytes and its header's size and draw its crop; the batch
            is decoded on its device in one call (nvJPEG on CUDA), then cropped, resized and
            flipped there. Files that are not JPEGs, and JPEGs whose header PIL cannot read,
            are decoded and cropped in the worker as with "worker"; a JPEG that fails on the
            device is read on the host (PIL) or named as damaged. With `skip_bad_files` it needs
            `verify_files` (a damaged JPEG found on the device has no next file to take its
            place).
        Others: see `DiskDataModule`.
    """

    targets = ("label",)
    title = "ImageFolder dataset"
    downloadable = False
    get_it = "Set data.root to a folder laid out like this."
    layout = """
<root>/
  train/<class>/<image>   e.g. train/daisy/0001.jpg, one folder per class
  val/<class>/<image>     the same class folders as train/
  test/<class>/<image>    optional; without it the test split is val/
"""

    def __init__(
        self,
        task: str,
        root: str | Path,
        image_size: int = 224,
        batch_size: int = 32,
        num_workers: int | str = "auto",
        skip_bad_files: bool = False,
        verify_files: bool = False,
        crop_scale: Sequence[float] = (0.08, 1.0),
        crop_pct: float = 0.875,
        decode: str = "worker",
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
    ) -> None:
        super().__init__(
            task, root, image_size=image_size, batch_size=batch_size, num_workers=num_workers,
            mean=mean, std=std,
        )  # fmt: skip
        if decode not in DECODE:
            raise ConfigError(f"data.decode must be 'worker' or 'device', got {decode!r}")
        if decode == "device" and skip_bad_files and not verify_files:
            raise ConfigError(
                "data.decode=device with data.skip_bad_files=true needs data.verify_files=true: a "
                "damaged JPEG is found on the device, where no other file can take its place"
            )
        self.skip_bad_files, self.verify_files = skip_bad_files, verify_files
        self.crop = {"crop_scale": tuple(crop_scale), "crop_pct": crop_pct}
        self.decode = decode

    def _layout_problem(self) -> str | None:
        if not self.root.is_dir():
            return f"{self.root} is not a directory"
        for split in ("train", "val"):
            folder = self.root / split
            if not folder.is_dir():
                return f"{self.root} has no {split}/ folder"
            if not class_folders(folder):
                return f"{folder} has no class folders (images must be in {split}/<class>/)"
        return None

    def _hint(self) -> str:
        if self.root.name in SPLITS:
            return f"data.root points at a split: try data.root={self.root.parent}. "
        return ""

    def _split_names(self) -> list[str]:
        return [s for s in SPLITS if s != "test" or (self.root / "test").is_dir()]

    def _read_classes(self) -> list[str]:
        classes = {split: class_folders(self.root / split) for split in self._split_names()}
        for split, names in classes.items():
            if names != classes["train"]:
                only_train = sorted(set(classes["train"]) - set(names))
                only_here = sorted(set(names) - set(classes["train"]))
                raise DatasetError(
                    f"the class folders of {self.root}/train and {split}/ differ: missing in "
                    f"{split}/: {only_train or 'none'}; missing in train/: {only_here or 'none'}. "
                    "Every split needs the same class folders."
                )
        return classes["train"]

    def _build_splits(self) -> dict[str, Dataset]:
        listings = self._once_per_run(self._list_splits)
        raw: dict[str, Dataset] = {
            split: FolderImages(self.root / split, listing, self.skip_bad_files)
            for split, listing in listings.items()
        }
        if "test" not in raw:
            raw["test"], self.test_split = raw["val"], "val"
        split_class = DeviceDecoded if self.decode == "device" else Transformed
        return {
            split: split_class(dataset, self._transform(split == "train", **self.crop))
            for split, dataset in raw.items()
        }

    def _served(self, split: str) -> Dataset:
        if self.decode == "device":  # JPEGs undecoded; `[index]` stays decoded for the pictures
            return EncodedView(self.splits[split])
        return super()._served(split)

    def _collate(self, split: str) -> Callable[[list[Any]], Any]:
        if self.decode == "device":
            return partial(collate_encoded, geometry=self.splits[split].transforms)
        return super()._collate(split)

    def _list_splits(self) -> dict[str, Listing]:
        """Every split's files (verified with `verify_files`): what rank 0 sends the others."""
        classes = self.class_names
        listings = {split: list_images(self.root / split, classes) for split in self._split_names()}
        for split, listing in listings.items():
            listing.warn(self.root / split)
        if self.verify_files:
            self._verify(listings)
        for split, listing in listings.items():
            empty = sorted(set(classes) - {classes[t] for t in np.unique(listing.labels)})
            if empty:
                readable = "readable image" if self.verify_files else "image file"
                raise DatasetError(f"{self.root}/{split} has no {readable} for the classes {empty}")
        return listings

    def _verify(self, listings: dict[str, Listing]) -> None:
        """Decode every listed file; raise naming the bad ones, or (skip_bad_files) drop them."""
        paths = [p for split, lst in listings.items() for p in lst.paths(self.root / split)]
        start = time.perf_counter()
        bad = dict(verify_images(paths))
        log.info("verified %d files in %.1f s: %d bad", len(paths), _since(start), len(bad))
        if not bad:
            return
        listing = "\n".join(f"  {why}" for why in list(bad.values())[:SHOWN])  # names each
        more = f"\n  ... and {len(bad) - SHOWN} more" if len(bad) > SHOWN else ""
        if not self.skip_bad_files:
            raise DatasetError(
                f"{len(bad)} file(s) under {self.root} are not readable images:\n"
                f"{listing}{more}\nRemove or replace them, or set data.skip_bad_files=true "
                "to skip them."
            )
        log.warning("skipping %d unreadable file(s):\n%s%s", len(bad), listing, more)
        for split, lst in listings.items():
            keep = np.array([p not in bad for p in lst.paths(self.root / split)], dtype=bool)
            listings[split] = Listing(lst.files[keep], lst.labels[keep], lst.ignored, lst.links)


@dataclass
class Listing:
    """The image files of one split and their classes, found by `list_images`.

    Paths relative to the split folder as one fixed-width bytes array, not a list of strings: a
    DataLoader worker forked from the main process reads it without touching a reference count
    per file, so the pages stay shared (at ImageNet's 1.28M files, a list of strings is copied
    into every worker as the epoch goes).
    """

    files: np.ndarray  # (N,) bytes, relative to the split folder
    labels: np.ndarray  # (N,) int64 class indices
    ignored: list[str]  # files without an image suffix
    links: list[str]  # linked folders not followed: their target was listed already

    def paths(self, folder: Path) -> list[str]:
        return [os.path.join(folder, os.fsdecode(f)) for f in self.files]

    def warn(self, folder: Path) -> None:
        if self.ignored:
            log.warning(
                "%s: %d file(s) without an image suffix left out: %s%s",
                folder,
                len(self.ignored),
                ", ".join(self.ignored[:3]),
                ", ..." if len(self.ignored) > 3 else "",
            )
        if self.links:
            log.warning(
                "%s: %d linked folder(s) lead to folders listed already and were listed once: %s",
                folder,
                len(self.links),
                ", ".join(self.links[:3]) + (", ..." if len(self.links) > 3 else ""),
            )


def list_images(folder: Path, classes: Sequence[str]) -> Listing:
    """The image files under `folder`/<class>/ for each class (label = its index), sorted.

    Walked in bytes (os.walk of a bytes path yields bytes names): the listing's array needs
    bytes, and encoding a million names one by one would cost as much as the walk.
    """
    files: list[bytes] = []
    labels: list[int] = []
    ignored: list[str] = []
    links: list[str] = []
    root = os.fsencode(folder)
    # (device, inode) of every folder listed. The split and class folders first: a link back to
    # one of them lists nothing, and a class's images keep its label wherever links lead.
    seen = {_identity(root)}
    tops: list[bytes | None] = []
    for name in classes:
        top = os.path.join(root, os.fsencode(name))
        tops.append(None if _identity(top) in seen else top)
        if tops[-1] is None:
            links.append(os.fsdecode(top))
        seen.add(_identity(top))
    suffixes = tuple(os.fsencode(suffix) for suffix in IMAGE_EXTENSIONS)
    for label, top in enumerate(tops):
        count = len(files)
        for directory, names in walk(top, seen, links) if top else ():
            prefix = os.path.relpath(directory, root) + b"/"
            for name in names:
                if name.lower().endswith(suffixes):
                    files.append(prefix + name)
                else:
                    ignored.append(os.fsdecode(prefix + name))
        labels += [label] * (len(files) - count)
    return Listing(np.array(files, dtype=bytes), np.array(labels, dtype=np.int64), ignored, links)


def walk(
    top: bytes, seen: set[tuple[int, int]], links: list[str]
) -> Iterator[tuple[bytes, list[bytes]]]:
    """(folder, sorted visible file names) of `top` and every visible folder under it, links
    followed; a folder whose real location is in `seen` (add `top`'s first) is not entered, its
    path goes to `links`: a link back up the tree lists nothing twice, and ends."""
    for directory, dirs, names in os.walk(top, followlinks=True):
        kept = []
        for name in sorted(dirs):
            path = os.path.join(directory, name)
            if name.startswith(b"."):
                continue
            identity = _identity(path)
            if identity in seen:
                links.append(os.fsdecode(path))
                continue
            seen.add(identity)
            kept.append(name)
        dirs[:] = kept  # os.walk enters these only
        yield directory, sorted(n for n in names if not n.startswith(b"."))


def _identity(path: bytes) -> tuple[int, int]:
    status = os.stat(path)  # follows links: the folder itself
    return status.st_dev, status.st_ino


def class_folders(folder: Path) -> list[str]:
    """The visible sub-folders of `folder` (links to folders too), sorted."""
    with os.scandir(folder) as entries:
        return sorted(e.name for e in entries if e.is_dir() and not e.name.startswith("."))


class FolderImages(Dataset):
    """(uint8 image, class index) for each file of a `Listing`, read by `read_image`.

    With `skip_bad_files` a file that does not decode is named in a warning (once per process)
    and the next readable file of the split takes its place: the same replacement in every
    process and epoch, so the batches keep their size and a resumed run its order.
    """

    def __init__(self, folder: Path, listing: Listing, skip_bad_files: bool = False) -> None:
        self.folder, self.listing, self.skip_bad_files = folder, listing, skip_bad_files
        self._bad: set[int] = set()  # indices found unreadable in this process

    @property
    def targets(self) -> np.ndarray:
        return self.listing.labels

    def __len__(self) -> int:
        return len(self.listing.files)

    def path(self, index: int) -> str:
        return os.path.join(self.folder, os.fsdecode(self.listing.files[index]))

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.read(index, read_image)

    def read(self, index: int, reader: Callable[[str], Any] = read_image) -> tuple[Any, int]:
        """(what `reader` gives for the file, its class index), bad files skipped as above."""
        for step in range(len(self)):
            candidate = (index + step) % len(self)
            if candidate in self._bad:
                continue
            try:
                return reader(self.path(candidate)), int(self.listing.labels[candidate])
            except DatasetError as error:
                if not self.skip_bad_files:
                    raise
                self._bad.add(candidate)
                log.warning("%s; data.skip_bad_files=true: the next file takes its place", error)
        raise DatasetError(
            f"no file under {self.folder} is a readable image (data.skip_bad_files=true skipped "
            f"all {len(self)})"
        )


class DeviceDecoded(Transformed):
    """A split of `FolderImages` for `decode="device"`.

    The DataLoaders read `encoded` samples (through `EncodedView`, which the data module serves
    them): a JPEG's bytes with its preset's random draws. `[index]` gives the sample as the
    worker path does, decoded and cropped (the pictures and the model summary read it so).
    """

    def __init__(self, dataset: FolderImages, transforms: ClassificationGeometry) -> None:
        if not isinstance(transforms, ClassificationGeometry):
            raise TypeError(
                "data.decode=device splits a classification preset (ClassificationGeometry), "
                f"not {type(transforms).__name__}"
            )
        super().__init__(dataset, transforms)

    def encoded(self, index: int) -> tuple[EncodedJpeg | torch.Tensor, int]:
        image, label = self.dataset.read(self.indices[index], read_encoded)
        if isinstance(image, EncodedJpeg):
            return (image, self.transforms.draw(image.height, image.width)), label
        return self.transforms(image, label)  # not a JPEG: done here


class EncodedView(Dataset):
    """`split.encoded` as `[index]`: what the loaders of `decode="device"` read."""

    def __init__(self, split: DeviceDecoded) -> None:
        self.split = split

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        return self.split.encoded(index)


def collate_encoded(
    samples: list[tuple[Any, int]], geometry: ClassificationGeometry
) -> tuple[EncodedImages | torch.Tensor, torch.Tensor]:
    """`DeviceDecoded.encoded` samples as (`EncodedImages`, (B,) labels); a batch with no JPEG
    to decode is stacked as the worker path's."""
    if not any(isinstance(image, tuple) for image, _ in samples):
        return collate_samples(samples)
    images = [image for image, _ in samples]
    paths = [image[0].path if isinstance(image, tuple) else "" for image in images]
    labels = torch.tensor([label for _, label in samples], dtype=torch.int64)
    return EncodedImages.collate(images, paths, geometry), labels


def verify_images(
    paths: Sequence[str],
    workers: int | None = None,
    progress: Callable[[int], None] | None = None,
) -> list[tuple[str, str]]:
    """[(path, its DatasetError's message)] of the `paths` that `read_image` cannot decode, in
    their order.

    Threads (`workers`, default every usable core): both decoders release the GIL while they
    decode. `progress(n)` is called as each file is done.
    """

    def problem(path: str) -> str | None:
        try:
            read_image(path)
            return None
        except DatasetError as error:
            return str(error)
        finally:
            if progress is not None:
                progress(1)

    with ThreadPoolExecutor(max_workers=workers or usable_cpus()) as pool:
        problems = list(pool.map(problem, paths, chunksize=64))
    return [(p, why) for p, why in zip(paths, problems, strict=True) if why is not None]


def _since(start: float) -> float:
    return time.perf_counter() - start

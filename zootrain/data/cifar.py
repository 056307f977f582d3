"""CIFAR-10 and CIFAR-100 classification (Krizhevsky 2009), the python version torchvision reads.

The batches are pickles. Before any is unpickled, every file's md5 is checked against
torchvision's table (a download checks the archive's too), and the unpickler they go through
builds nothing but containers, strings, numbers and numpy arrays: a file that names any other
function or class is refused, not run, even with a matching checksum.
"""

from __future__ import annotations

import hashlib
import pickle
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision import datasets
from torchvision.datasets.utils import download_and_extract_archive

from backbones import IMAGENET_MEAN, IMAGENET_STD

from ..errors import DatasetError
from .base import DiskDataModule


class CIFARFile(pickle.Unpickler):
    """Unpickles what CIFAR's files hold (dicts, lists, strings, numbers, numpy arrays) only."""

    # The globals numpy's array pickles name (numpy 1 and 2 spellings; protocol 2 and 5).
    ALLOWED = {
        (module, name)
        for package in ("numpy.core", "numpy._core")
        for module, name in ((f"{package}.multiarray", "_reconstruct"),
                             (f"{package}.numeric", "_frombuffer"))
    } | {("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}  # fmt: skip

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"it names {module}.{name}, which is not CIFAR data")
        return super().find_class(module, name)


def read_batch(path: Path) -> dict[str, Any]:
    """One CIFAR file, unpickled by `CIFARFile` (Python 2 strings decoded as latin-1)."""
    with open(path, "rb") as file:
        content = CIFARFile(file, encoding="latin1").load()
    if not isinstance(content, dict):
        raise pickle.UnpicklingError(f"it holds a {type(content).__name__}, not a dict")
    return content


def md5(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class CIFARImages(Dataset):
    """(uint8 (3, 32, 32) image, class index) samples of (N, 32, 32, 3) uint8 images: torchvision's
    pixels, without a PIL image per sample."""

    def __init__(self, images: np.ndarray, targets: list[int]) -> None:
        self.data, self.targets = images, targets

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return torch.from_numpy(self.data[index]).permute(2, 0, 1), self.targets[index]


class CIFAR10DataModule(DiskDataModule):
    """CIFAR-10 classification (Krizhevsky 2009), the python version of torchvision's CIFAR10.

    Args:
        val_fraction: part of the 50,000 training images held out (seeded) for validation;
            0 validates on the test set (and says so).
        seed: the hold-out seed.
        crop_scale, crop_pct: the classification preset (see `ImageFolderDataModule`).
        checksums: file name -> md5 of every file (batches and meta); None: torchvision's.
        Others: see `DiskDataModule`.
    """

    targets = ("label",)
    title = "CIFAR-10"
    source = datasets.CIFAR10  # its file names, md5s and download address
    layout = """
cifar-10-batches-py/
  data_batch_1 ... data_batch_5, test_batch, batches.meta
"""

    def __init__(
        self,
        task: str,
        root: str | Path,
        download: bool = False,
        image_size: int = 32,
        batch_size: int = 128,
        num_workers: int | str = "auto",
        val_fraction: float = 0.1,
        seed: int = 0,
        crop_scale: Sequence[float] = (0.35, 1.0),
        crop_pct: float = 1.0,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        checksums: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(task, root, download, image_size, batch_size, num_workers, mean, std)
        self._set_hold_out(val_fraction, seed)
        self.crop = {"crop_scale": tuple(crop_scale), "crop_pct": crop_pct}
        if checksums is None:
            listed = self.source.train_list + self.source.test_list
            checksums = {name: digest for name, digest in listed}
            checksums[self.source.meta["filename"]] = self.source.meta["md5"]
        self.checksums = dict(checksums)
        self._verified = False

    def _folder(self) -> Path:
        return self.root / self.source.base_folder

    def _files(self) -> list[Path]:
        names = [name for name, _ in self.source.train_list + self.source.test_list]
        return [self._folder() / name for name in [*names, self.source.meta["filename"]]]

    def _layout_problem(self) -> str | None:
        missing = [p for p in self._files() if not p.is_file()]
        return f"{missing[0]} is missing" if missing else None

    def _download(self) -> None:
        # torchvision checks the archive's md5 before extracting it
        source = self.source
        download_and_extract_archive(source.url, self.root, source.filename, md5=source.tgz_md5)

    def _verify(self) -> None:
        """Every file's md5 against `checksums`, before any of them is unpickled."""
        if self._verified:
            return
        for path in self._files():
            expected, actual = self.checksums.get(path.name), md5(path)
            if actual != expected:
                raise DatasetError(
                    f"{path} fails its md5 check (expected {expected}, got {actual}): it is "
                    f"damaged or not {self.title}'s, and was not read. Delete {self._folder()} "
                    "and set data.download=true to fetch it again"
                )
        self._verified = True

    def _read(self, path: Path) -> dict[str, Any]:
        self._verify()
        try:
            return read_batch(path)
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as error:
            raise DatasetError(
                f"cannot read the {self.title} file {path} ({error}); delete {self._folder()} "
                "and set data.download=true"
            ) from None

    def _load(self, train: bool) -> CIFARImages:
        images, targets = [], []
        for name, _ in self.source.train_list if train else self.source.test_list:
            path = self._folder() / name
            batch = self._read(path)
            labels = batch.get("labels", batch.get("fine_labels"))
            data = batch.get("data")
            if not isinstance(data, np.ndarray) or labels is None or len(data) != len(labels):
                raise DatasetError(f"{path} holds no CIFAR batch (data and labels)")
            images.append(data)
            targets += [int(label) for label in labels]
        pixels = np.vstack(images).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)  # (N, H, W, C)
        return CIFARImages(np.ascontiguousarray(pixels, dtype=np.uint8), targets)

    def _read_classes(self) -> list[str]:
        path = self._folder() / self.source.meta["filename"]
        names = self._read(path).get(self.source.meta["key"])
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise DatasetError(f"{path} holds no class names ({self.source.meta['key']!r})")
        return names

    def _build_splits(self) -> dict[str, Dataset]:
        train, test = self._load(train=True), self._load(train=False)
        return self._hold_out_splits(train, test)


class CIFAR100DataModule(CIFAR10DataModule):
    """CIFAR-100 classification, 100 fine classes (Krizhevsky 2009); see `CIFAR10DataModule`."""

    title = "CIFAR-100"
    source = datasets.CIFAR100
    layout = """
cifar-100-python/
  train, test, meta
"""

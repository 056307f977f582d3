"""Training data that depends on (seed, epoch) only, so that a resumed run sees what the
uninterrupted run would have seen.

`EpochSampler` shuffles by (seed, epoch) (Lightning calls its `set_epoch` before every epoch,
also the first epoch after a resume) and yields `(epoch, index)` keys; `EpochSeeded` reads such a
key and draws the sample's augmentation with torch's, NumPy's and Python's random generators
seeded from (seed, epoch, index). Nothing is kept between samples or epochs, so no random state
has to be saved in a checkpoint, and the samples are the same with any number of DataLoader
workers, persistent or not. The training process's own draws (dropout, stochastic depth) are
seeded per step by `zootrain.callbacks.StepSeed`. `EpochLoader` starts drawing keys at the first
batch, after Lightning's `set_epoch`.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler


def derived_seed(*values: int) -> int:
    """A well-mixed 64-bit seed from non-negative integers (NumPy's SeedSequence)."""
    return int(np.random.SeedSequence(list(values)).generate_state(1, np.uint64)[0])


def seed_all(seed: int) -> None:
    """Seed torch (CPU and every CUDA device), NumPy's global and Python's generators."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)  # NumPy's legacy global generator takes 32 bits
    random.seed(seed)


class EpochSampler(DistributedSampler):
    """A shuffled order of a dataset's indices that depends on (seed, epoch) only, as
    `(epoch, index)` keys for `EpochSeeded`.

    A `DistributedSampler` (one replica unless given more), so that Lightning neither replaces
    it under DDP nor wraps it, and calls its `set_epoch` before every epoch. Without
    `drop_last` every rank gets the same number of keys (a few samples repeated, as with
    torch's sampler).
    """

    def __init__(self, dataset: Dataset, seed: int, num_replicas: int = 1, rank: int = 0) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)

    def __iter__(self) -> Iterator[tuple[int, int]]:  # type: ignore[override]
        epoch = self.epoch
        return ((epoch, index) for index in super().__iter__())


class EpochSeeded(Dataset):
    """`dataset` read with `(epoch, index)` keys: each sample's random draws (torch, NumPy,
    Python) come from generators seeded by (seed, epoch, index).

    The caller's generator states are put back afterwards: with `num_workers=0` the samples
    are read in the training process, whose generators drive dropout. The DataLoader reads a
    batch's keys at once (`__getitems__`), so they are saved and put back once a batch, not once
    a sample (NumPy's state alone takes ~0.1 ms to save and restore).
    """

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int]) -> Any:
        return self.__getitems__([key])[0]

    def __getitems__(self, keys: list[tuple[int, int]]) -> list[Any]:
        for key in keys:
            if not (isinstance(key, tuple) and len(key) == 2):
                raise TypeError(
                    f"EpochSeeded reads (epoch, index) keys from an EpochSampler, got {key!r}"
                )
        states = torch.get_rng_state(), np.random.get_state(), random.getstate()
        try:
            samples = []
            for epoch, index in keys:
                seed = derived_seed(self.seed, epoch, index)
                # CPU only: the transforms draw there; CUDA's generators drive the model's dropout
                torch.default_generator.manual_seed(seed)
                np.random.seed(seed % 2**32)
                random.seed(seed)
                samples.append(self.dataset[index])
            return samples
        finally:
            torch.set_rng_state(states[0])
            np.random.set_state(states[1])
            random.setstate(states[2])


class EpochLoader(DataLoader):
    """A DataLoader that starts its workers and draws its sampler's order at the first batch,
    not when `iter()` is called.

    Lightning creates the training iterator before it calls `set_epoch` (on a resumed run:
    before it has even read the checkpoint's epoch); worker processes prefetch their first
    batches at `iter()`, which would serve epoch 0's keys to the first resumed epoch.
    """

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        yield from super().__iter__()

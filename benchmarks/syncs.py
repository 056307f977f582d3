"""Count host syncs: the calls that make the CPU wait until a GPU has finished its queued work.

`.item()`, `float(t)`, `int(t)`, `if t:`, `f"{t:.3f}"` all reach `aten._local_scalar_dense`;
`nonzero`, boolean-mask indexing, `torch.equal` and `unique` must read device values to size
their outputs. A `TorchDispatchMode` sees those ops, also on CPU, so the counts taken on a CPU
run are the syncs the same code makes on a GPU. `.tolist()`, `.numpy()` and `.cpu()` copy
without any op the dispatch mode can see on a CPU tensor; a `TorchFunctionMode` counts them
(on CPU every `.cpu()` counts, although only a device tensor's would sync).

On CUDA, `HostSyncs(cuda=True)` also counts what the CUDA runtime itself reports as
synchronizing (`torch.cuda.set_sync_debug_mode("warn")`): copies to the host, blocking copies
from pageable memory, `synchronize()`, whatever the Python side called.

Syncs made while loading data (frames of `torch.utils.data`, e.g. a sampler's seed or a
dataset's random augmentation on the CPU) are counted apart: on a GPU they happen on the CPU
side of the pipeline and do not wait for the device. `StepSyncs`, a Lightning callback, splits
the rest into training steps, validation and epoch ends.
"""

from __future__ import annotations

import sys
import warnings
from collections import Counter
from pathlib import Path
from types import FrameType
from typing import Any

import lightning as L
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten

# Ops whose result, or whose output's size, is read back by the host.
SYNC_OPS = {
    aten._local_scalar_dense.default,  # .item(), float(), int(), bool(), format()
    aten.nonzero.default,
    aten.masked_select.default,
    aten.equal.default,
    aten._unique2.default,
    aten.unique_dim.default,
    aten.unique_consecutive.default,
    aten.repeat_interleave.Tensor,
}
# Tensor methods that copy to host memory without an op the dispatch mode sees on CPU.
SYNC_METHODS = {torch.Tensor.tolist, torch.Tensor.numpy, torch.Tensor.cpu}

_DATA_LOADING = f"{Path(torch.utils.data.__file__).parent}"
_TORCH = str(Path(torch.__file__).parent)
_SKIPPED = (_TORCH, __file__, warnings.__file__)  # not where a sync was asked for


def _caller(frame: FrameType | None) -> tuple[bool, str]:
    """(called while loading data, innermost frame outside torch and this module as file:line)."""
    site = ""
    while frame is not None:
        filename = frame.f_code.co_filename
        if filename.startswith(_DATA_LOADING):
            return True, site
        if not site and not filename.startswith(_SKIPPED):
            site = f"{filename}:{frame.f_lineno}"
        frame = frame.f_back
    return False, site


class _SyncOps(TorchDispatchMode):
    def __init__(self, counter: HostSyncs) -> None:
        super().__init__()
        self.counter = counter

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        boolean_index = func is aten.index.Tensor and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1]
        )
        if func in SYNC_OPS or boolean_index:
            self.counter.record(str(func.overloadpacket.__name__))
        return func(*args, **(kwargs or {}))


class _SyncMethods(TorchFunctionMode):
    def __init__(self, counter: HostSyncs) -> None:
        super().__init__()
        self.counter = counter

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in SYNC_METHODS:
            self.counter.record(func.__name__)
        return func(*args, **(kwargs or {}))


class HostSyncs:
    """Context manager counting host syncs by phase and call site.

    `phase` is set by whoever knows where the program is (see `StepSyncs`); syncs made while
    loading data are counted under "data loading" whatever the phase.

        with HostSyncs() as syncs:
            trainer.fit(module, datamodule)
        syncs.counts  # Counter({"train step": 3, "validation": 12, ...})
    """

    def __init__(self, cuda: bool = False) -> None:
        self.phase = "outside fit"
        self.counts: Counter[str] = Counter()
        self.sites: Counter[tuple[str, str, str]] = Counter()  # (phase, op, file:line)
        self.cuda = cuda
        self.cuda_counts: Counter[str] = Counter()  # by phase, as the CUDA runtime reports them
        self._modes: list[Any] = []

    def record(self, op: str, counts: Counter[str] | None = None) -> None:
        loading, site = _caller(sys._getframe(1))
        phase = "data loading" if loading else self.phase
        (self.counts if counts is None else counts)[phase] += 1
        self.sites[phase, op, site] += 1

    def _on_warning(self, message: Any, category: type, *args: Any, **kwargs: Any) -> None:
        if "called a synchronizing CUDA operation" in str(message):
            self.record("CUDA sync", self.cuda_counts)
        else:
            self._show(message, category, *args, **kwargs)

    def where(self, phase: str) -> list[str]:
        """The call sites of `phase`'s syncs, most frequent first: `op at file:line (n)`."""
        return [
            f"{op} at {site} ({n})" for (p, op, site), n in self.sites.most_common() if p == phase
        ]

    def __enter__(self) -> HostSyncs:
        self._modes = [_SyncMethods(self), _SyncOps(self)]
        if self.cuda:
            self._modes.insert(0, warnings.catch_warnings())
        for mode in self._modes:
            mode.__enter__()
        if self.cuda:  # inside catch_warnings, which restores both on exit
            warnings.simplefilter("always")
            self._show, warnings.showwarning = warnings.showwarning, self._on_warning
            torch.cuda.set_sync_debug_mode("warn")
        return self

    def __exit__(self, *exc_info: Any) -> None:
        if self.cuda:
            torch.cuda.set_sync_debug_mode("default")
        for mode in reversed(self._modes):
            mode.__exit__(*exc_info)
        self._modes = []


class StepSyncs(L.Callback):
    """Sets a `HostSyncs`'s phase during `fit`: "train step" from the start of a training batch
    until the next one (its logging included), "validation", and "epoch end"."""

    def __init__(self, syncs: HostSyncs) -> None:
        self.syncs = syncs
        self.steps = 0

    def _set(self, phase: str) -> None:
        self.syncs.phase = phase

    def on_train_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
        self.steps += 1
        self._set("train step")

    def on_validation_start(self, *args: Any) -> None:
        self._set("validation")

    def on_validation_end(self, *args: Any) -> None:
        self._set("epoch end")

    def on_train_epoch_end(self, *args: Any) -> None:
        self._set("epoch end")

    def on_train_epoch_start(self, *args: Any) -> None:
        self._set("epoch start")

    def on_fit_end(self, *args: Any) -> None:
        self._set("outside fit")

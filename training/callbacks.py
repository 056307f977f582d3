"""Callbacks of our own: the loss/metric plot and a progress bar that reads no device value
per step. Everything else is Lightning's."""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import RichProgressBar

from backbones.weights import atomic_path


class MetricsPlot(L.Callback):
    """After every epoch, plot the mean training loss and the validation metrics to a PNG.

    The history lives in the callback's state, so a resumed run plots its whole curve.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.history: dict[str, list[tuple[int, float]]] = {}
        self._loss_sum: torch.Tensor | float = 0.0
        self._batches = 0

    def on_train_epoch_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self._loss_sum, self._batches = 0.0, 0

    def on_train_batch_end(
        self,
        trainer: L.Trainer,
        module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        if loss is None:  # a skipped step
            return
        # Summed on the device: read once per epoch, not once per step (a host sync).
        self._loss_sum = loss.detach() + self._loss_sum
        self._batches += 1

    def on_validation_epoch_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        for key, value in trainer.callback_metrics.items():
            if key.startswith("val/"):
                self._record(key, trainer.current_epoch, float(value))

    def on_train_epoch_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        # Runs after the epoch's validation, so each epoch is plotted once, complete.
        if self._batches:
            mean = float(self._loss_sum) / self._batches
            self._record("train/loss", trainer.current_epoch, mean)
        if trainer.is_global_zero:
            self.write()

    def _record(self, key: str, epoch: int, value: float) -> None:
        series = self.history.setdefault(key, [])
        series[:] = [(e, v) for e, v in series if e != epoch]
        series.append((epoch, value))

    def write(self) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        losses = {k: v for k, v in self.history.items() if k.endswith("loss")}
        metrics = {k: v for k, v in self.history.items() if not k.endswith("loss")}
        figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
        for axis, series, title in ((left, losses, "loss"), (right, metrics, "metrics")):
            for key, points in sorted(series.items()):
                epochs, values = zip(*points, strict=True)
                axis.plot(epochs, values, marker="o", label=key)
            axis.set(title=title, xlabel="epoch")
            axis.grid(alpha=0.3)
            if series:
                axis.legend()
        figure.tight_layout()
        try:
            with atomic_path(self.path) as tmp:
                figure.savefig(tmp, dpi=100, format="png")
        finally:
            plt.close(figure)

    def state_dict(self) -> dict[str, Any]:
        return {"history": {k: [list(p) for p in v] for k, v in self.history.items()}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = {k: [tuple(p) for p in v] for k, v in state_dict["history"].items()}


class ProgressBar(RichProgressBar):
    """Lightning's Rich progress bar, showing the module's `step_values` next to the metrics.

    A value logged with `self.log(..., prog_bar=True, on_step=True)` is read from the device
    at every step, which makes the host wait for the GPU; `TaskModule` instead reads its step
    loss once every `log_every_n_steps` steps, and this bar shows the last value read.
    It redraws at most `refresh_rate` times a second (Lightning's default is 100): drawing
    holds the GIL, which the main thread needs to launch the next step's kernels.
    """

    def __init__(self, refresh_rate: int = 10, **kwargs: Any) -> None:
        super().__init__(refresh_rate=refresh_rate, **kwargs)

    def get_metrics(self, trainer: L.Trainer, module: L.LightningModule) -> dict[str, Any]:
        return {**super().get_metrics(trainer, module), **getattr(module, "step_values", {})}


class StepTimer(L.Callback):
    """Times the first training step against the typical one: the warm-up of `compile=true`.

    The typical step is the median time from one training batch's start to the next (within
    an epoch, validation excluded), which on a GPU is the device's pace once its queue is full;
    `warmup_seconds` is how much longer the first step took (tracing and compiling).
    """

    def __init__(self) -> None:
        self.first_seconds: float | None = None
        self.intervals: list[float] = []
        self._start: float | None = None
        self._previous: float | None = None

    def on_train_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
        now = time.perf_counter()
        if self._previous is not None:
            self.intervals.append(now - self._previous)
        self._previous = self._start = now

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        if self.first_seconds is None and self._start is not None:
            self.first_seconds = time.perf_counter() - self._start

    def on_validation_start(self, trainer: L.Trainer, *args: Any) -> None:
        self._previous = None  # the next interval would include validation

    def on_train_epoch_start(self, trainer: L.Trainer, *args: Any) -> None:
        self._previous = None

    @property
    def step_seconds(self) -> float | None:
        return statistics.median(self.intervals) if self.intervals else None

    @property
    def warmup_seconds(self) -> float | None:
        if self.first_seconds is None:
            return None
        return max(0.0, self.first_seconds - (self.step_seconds or 0.0))

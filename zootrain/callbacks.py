"""Callbacks of our own: the curves plot, the model summary's example input, a progress bar
that reads no device value per step, the step timer, the per-step seed, the validation's
divergence check. The rest is Lightning's."""

from __future__ import annotations

import math
import os
import statistics
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint, RichProgressBar

from .data.sampling import derived_seed, seed_all
from .errors import DivergedError
from .plots import plot_curves, save_figure


class MetricsPlot(L.Callback):
    """After every epoch, plot the mean training loss, the validation metrics and the learning
    rate to a PNG (see `zootrain.plots.plot_curves`).

    The history lives in the callback's state, so a resumed run plots its whole curve. The
    learning rate is read from the optimiser at the start and end of each epoch (Python floats:
    no device sync).

    Args:
        path: the PNG to (re)write.
        title: the figure title, e.g. `zootrain.plots.run_title(cfg)`.
        monitor, mode: the metric checkpoints are chosen by; its best epoch is marked.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        title: str = "",
        monitor: str | None = None,
        mode: str = "max",
    ) -> None:
        self.path = Path(path)
        self.title, self.monitor, self.mode = title, monitor, mode
        self.history: dict[str, list[tuple[int, float]]] = {}
        self.lr: dict[str, list[tuple[float, float]]] = {}
        self._loss_sum: torch.Tensor | float = 0.0
        self._batches = 0

    def on_train_epoch_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self._loss_sum, self._batches = 0.0, 0
        self._record_lr(trainer, trainer.current_epoch)

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

    def on_validation_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        # Not on_validation_epoch_end: what the module logs in its own epoch-end hook (the
        # detectors' mAP) reaches callback_metrics only after the callbacks' epoch-end hooks.
        if trainer.sanity_checking:
            return
        for key, value in trainer.callback_metrics.items():
            if key.startswith("val/"):
                self._record(key, trainer.current_epoch, float(value))

    def on_train_epoch_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        # Runs after the epoch's validation, so each epoch is plotted once, complete.
        if self._batches:
            mean = float(self._loss_sum) / self._batches  # one host sync per epoch
            self._record("train/loss", trainer.current_epoch, mean)
        self._record_lr(trainer, trainer.current_epoch + 1)
        if trainer.is_global_zero:
            self.write()

    def _record(self, key: str, epoch: int, value: float) -> None:
        series = self.history.setdefault(key, [])
        series[:] = [(e, v) for e, v in series if e != epoch]
        series.append((epoch, value))

    def _record_lr(self, trainer: L.Trainer, position: float) -> None:
        """Each parameter group's learning rate at `position` (in epochs from the start)."""
        for optimizer in trainer.optimizers[:1]:
            for group in optimizer.param_groups:
                mult = group.get("lr_mult", 1.0)
                label = "lr" if mult == 1.0 else f"lr x {mult:g} (backbone)"
                series = self.lr.setdefault(label, [])
                series[:] = [(p, v) for p, v in series if p != position]
                series.append((position, float(group["lr"])))

    def write(self) -> None:
        figure = plot_curves(self.history, self.lr, self.title, self.monitor, self.mode)
        save_figure(figure, self.path)

    def state_dict(self) -> dict[str, Any]:
        return {
            "history": {k: [list(p) for p in v] for k, v in self.history.items()},
            "lr": {k: [list(p) for p in v] for k, v in self.lr.items()},
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = {k: [tuple(p) for p in v] for k, v in state_dict["history"].items()}
        # checkpoints of older versions hold no learning rates
        self.lr = {k: [tuple(p) for p in v] for k, v in state_dict.get("lr", {}).items()}


class TopKCheckpoints(ModelCheckpoint):
    """The `save_top_k` best checkpoints, named by epoch and metric
    (`epoch=3-val_acc=0.8125.ckpt`), next to `best.ckpt`.

    A class of its own so that its state (a checkpoint's `callbacks` entry, keyed by class name
    and monitor) is not mistaken for the `best.ckpt` callback's, which monitors the same metric.
    """

    def __init__(
        self, dirpath: str | os.PathLike, monitor: str, mode: str, save_top_k: int
    ) -> None:
        name = monitor.replace("/", "_")  # a "/" in the file name would make a folder
        super().__init__(
            dirpath=dirpath,
            filename=f"epoch={{epoch}}-{name}={{{monitor}:.4f}}",
            monitor=monitor,
            mode=mode,
            save_top_k=save_top_k,
            auto_insert_metric_name=False,
        )


class ExampleInput(L.Callback):
    """Give the module one validation image as `example_input_array`, so that Lightning's
    model summary counts real FLOPs (and shows in/out sizes); without one it prints 0."""

    def setup(self, trainer: L.Trainer, module: L.LightningModule, stage: str) -> None:
        splits = getattr(trainer.datamodule, "splits", None) or {}
        if module.example_input_array is not None or "val" not in splits:
            return
        image = splits["val"][0][0]
        module.example_input_array = module.task.example_input(image)


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


class StepSeed(L.Callback):
    """Seed the training process's generators (torch on every device, NumPy, Python) from
    (seed, epoch, batch, rank) before every training batch.

    The model's own random draws (dropout, stochastic depth) then depend on where the step is,
    not on how the run got there (a resume, or whatever else drew numbers in between): a
    resumed epoch draws what the uninterrupted run drew, and no generator state needs saving in
    a checkpoint. Each rank draws its own masks. The data's draws are seeded per sample
    (`zootrain.data.sampling`).
    """

    def __init__(self, seed: int) -> None:
        self.seed = seed

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        seed_all(derived_seed(self.seed, trainer.current_epoch, batch_idx, trainer.global_rank))


class DivergenceCheck(L.Callback):
    """Stops a fit whose validation loss or metric is not finite, before that epoch's
    checkpoints are written: a diverged model is never kept, as best or as last.

    Lightning runs checkpoint callbacks after every other at each hook, so this check's
    `on_validation_end` comes before the checkpoints' saves; it reads values already on the
    host (what the loggers received), once an epoch.
    """

    def on_validation_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        bad = {
            key: float(value)
            for key, value in trainer.callback_metrics.items()
            if key.startswith("val/") and not math.isfinite(float(value))
        }
        if bad:
            shown = ", ".join(f"{key} {value}" for key, value in sorted(bad.items()))
            raise DivergedError(
                f"training diverged: at epoch {trainer.current_epoch} the validation gave "
                f"{shown}; nothing of this epoch was saved. Lower optim.lr, set "
                "trainer.gradient_clip_val, or add a warm-up (scheduler.warmup_epochs)"
            )

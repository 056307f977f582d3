"""Callbacks of our own: the curves plot, the model summary's example input. The rest is
Lightning's."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import lightning as L

from .plots import plot_curves, save_figure


class MetricsPlot(L.Callback):
    """After every epoch, plot the mean training loss, the validation metrics and the learning
    rate to a PNG (see `training.plots.plot_curves`).

    The history lives in the callback's state, so a resumed run plots its whole curve. The
    learning rate is read from the optimiser at the start and end of each epoch (Python floats:
    no device sync).

    Args:
        path: the PNG to (re)write.
        title: the figure title, e.g. `training.plots.run_title(cfg)`.
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
        self._loss_sum, self._batches = 0.0, 0

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
        self._loss_sum += float(loss)
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
            self._record("train/loss", trainer.current_epoch, self._loss_sum / self._batches)
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


class ExampleInput(L.Callback):
    """Give the module one validation image as `example_input_array`, so that Lightning's
    model summary counts real FLOPs (and shows in/out sizes); without one it prints 0."""

    def setup(self, trainer: L.Trainer, module: L.LightningModule, stage: str) -> None:
        splits = getattr(trainer.datamodule, "splits", None) or {}
        if module.example_input_array is not None or "val" not in splits:
            return
        image = splits["val"][0][0]
        # the summary calls module(*example): detectors take a list of images
        if module.task.name == "detection":
            module.example_input_array = ([image.new_zeros(image.shape)],)
        else:
            module.example_input_array = image.new_zeros((1, *image.shape))

"""Callbacks of our own: the loss/metric plot. Everything else is Lightning's."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import lightning as L

from backbones.weights import atomic_path


class MetricsPlot(L.Callback):
    """After every epoch, plot the mean training loss and the validation metrics to a PNG.

    The history lives in the callback's state, so a resumed run plots its whole curve.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.history: dict[str, list[tuple[int, float]]] = {}
        self._loss_sum, self._batches = 0.0, 0

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
        self._loss_sum += float(loss)
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
            self._record("train/loss", trainer.current_epoch, self._loss_sum / self._batches)
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

"""A callback for the SLURM tests (`+callbacks.pause=...`): a job's first run stops at a known
step and sleeps until SLURM ends it, so that a signal lands mid-epoch at that step and the wait
costs no CPU. A requeued run (SLURM_RESTART_COUNT > 0) trains straight through."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import lightning as L


class PauseUntilEnded(L.Callback):
    """After batch `batch` of epoch `epoch`, write `marker` and sleep until SIGTERM (at most
    `timeout` seconds); Lightning then ends the run at this batch's end."""

    def __init__(self, epoch: int, batch: int, marker: str, timeout: float = 600.0) -> None:
        self.epoch, self.batch, self.marker, self.timeout = epoch, batch, Path(marker), timeout

    def on_train_batch_end(
        self, trainer: L.Trainer, module: L.LightningModule, outputs: Any, batch: Any, index: int
    ) -> None:
        if int(os.environ.get("SLURM_RESTART_COUNT", "0")) > 0:
            return
        if (trainer.current_epoch, index) != (self.epoch, self.batch):
            return
        self.marker.write_text(str(trainer.global_step))
        deadline = time.monotonic() + self.timeout
        # Signal handlers run during the sleep: Lightning's requeue handler saves and requeues,
        # SLURM's SIGTERM then sets received_sigterm.
        while not trainer.received_sigterm and time.monotonic() < deadline:
            time.sleep(0.2)

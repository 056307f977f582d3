"""Loggers of our own: a CSV logger whose metrics.csv keeps a resumed run's history."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.loggers import csv_logs
from lightning.pytorch.loggers.logger import rank_zero_experiment
from lightning.pytorch.trainer.states import TrainerFn

from backbones.files import atomic_path

# The checkpoint entry that counts the metrics.csv rows written before the checkpoint was saved.
ROWS_KEY = "metrics_csv_rows"


class CSVLogger(csv_logs.CSVLogger, L.Callback):
    """Lightning's `CSVLogger`, except that a resumed `fit` keeps the rows logged before it.

    Lightning's starts `metrics.csv` afresh in every `fit`, so a run resumed in its own directory
    (a requeued SLURM job) lost the epochs before the requeue. This logger is also a callback
    (`train.py` passes it as both): a checkpoint records how many rows were on disk when it was
    saved, and a `fit` resuming from it keeps those rows and any later ones that precede its own
    first row (an epoch's training means, logged after its checkpoint and not logged again), drops
    the rest (logged again by the resumed run) and appends. A `fit` from scratch starts a new file.
    """

    @property
    @rank_zero_experiment
    def experiment(self) -> _ResumableWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _ResumableWriter(log_dir=self.log_dir)
        return self._experiment

    def on_save_checkpoint(
        self, trainer: L.Trainer, module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        if trainer.is_global_zero:
            self.save()  # before the checkpoint is written: the rows it counts are on disk
            checkpoint[ROWS_KEY] = self.experiment.rows

    def on_load_checkpoint(
        self, trainer: L.Trainer, module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        # `trainer.test(ckpt_path=best)` loads a checkpoint too: it must not cut the history.
        if trainer.is_global_zero and trainer.state.fn == TrainerFn.FITTING:
            self.experiment.keep(checkpoint.get(ROWS_KEY, 0))


class _ResumableWriter(csv_logs.ExperimentWriter):
    """Lightning's metrics.csv writer, which leaves an existing file alone until the first rows
    are written: by then a resume has said which of its rows to keep."""

    def __init__(self, log_dir: str) -> None:
        self.rows = 0  # data rows in the file
        self._keep = 0
        self._opened = False
        super().__init__(log_dir)

    def _check_log_dir_exists(self) -> None:
        """Lightning deletes metrics.csv here, before a resume could say what to keep."""

    def keep(self, rows: int) -> None:
        """Keep the first `rows` rows of an existing metrics.csv (before the first row is logged)."""
        self._keep = rows

    def save(self) -> None:
        if self.metrics and not self._opened:
            self._open()
        self.rows += len(self.metrics)
        super().save()

    def _open(self) -> None:
        """Cut an existing file back to the rows this run keeps (see `CSVLogger`)."""
        self._opened = True
        path = Path(self.metrics_file_path)
        if not path.is_file():
            return
        first_step = min(int(row["step"]) for row in self.metrics)
        with path.open(newline="") as file:
            reader = csv.DictReader(file)
            kept = [
                row
                for index, row in enumerate(reader)
                if index < self._keep or int(float(row["step"])) < first_step
            ]
            header = reader.fieldnames or []
        if not kept:
            path.unlink()
            return
        with atomic_path(path) as tmp, open(tmp, "w", newline="") as file:
            writer = csv.DictWriter(file, fieldnames=header)
            writer.writeheader()
            writer.writerows(kept)
        self.metrics_keys = list(header)
        self.rows = len(kept)

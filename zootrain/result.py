"""What a run reports: one dataclass for train, eval, the sweep summary and the final table."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class RunResult:
    """The outcome of `zootrain.run.train` (a fit) or `zootrain.evaluate.evaluate` (a score).

    `metrics` holds the last epoch's values and the test split's, by logged name
    (`val/acc`, `test/map`, `train/loss_epoch`); `monitor` is the task's metric that chose the
    best checkpoint, `mode` whether higher is better. An evaluation has no fit: its
    `fit_seconds` is None.
    """

    metrics: dict[str, float]
    monitor: str
    mode: str = "max"
    best_model_path: str | None = None  # the best checkpoint (the one scored, for eval)
    best_score: float | None = None
    best_epoch: int | None = None  # counted from 1
    monitor_history: list[tuple[int, float]] = field(default_factory=list)  # (epoch from 0, value)
    output_dir: str | None = None  # the run directory
    fit_seconds: float | None = None
    train_images_per_second: float | None = None  # all ranks, validation included
    compile_warmup_seconds: float | None = None  # compile=true: the first step's extra time
    backbone_weights: str | None = None  # checkpoints/backbone.safetensors
    pictures: list[str] = field(default_factory=list)

    @property
    def fitted(self) -> bool:
        """Whether the result is a training run's (a fit), not an evaluation's."""
        return self.fit_seconds is not None

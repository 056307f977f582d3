"""A training run, one way through: config -> checks -> run directory / resume -> build -> fit
-> finish (test, export, pictures, result).

`train(cfg)` is what train.py, sweeps, benchmarks and tests call; each step below is a function
with a name, so the run reads top to bottom.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, open_dict

from .build import (
    build_datamodule,
    build_module,
    build_trainer,
    own_targets,
    plain_config,
    write_config,
)
from .callbacks import MetricsPlot, StepTimer
from .checkpoints import export_backbone, load_checkpoint
from .checks import check_config, check_data, check_model
from .cluster import requeue_signal_ignored
from .data.base import TaskDataModule
from .devices import resolve_device_defaults
from .errors import NonFiniteLossError
from .module import TaskModule
from .plots import best_epoch, run_title
from .predictions import write_pictures
from .report import quiet_lightning, route_lightning_logs
from .result import RunResult
from .runs import BACKBONE, CONFIG, Resume, check_resume, find_resume, resolve_resume
from .trackers import log_run_end


def train(cfg: DictConfig, extra_callbacks: Sequence[L.Callback] = ()) -> RunResult:
    """Fit, test the best checkpoint, export its backbone, draw its pictures; the result.

    `extra_callbacks` (what the training benchmark and tests measure with) run before the run's
    own callbacks at every hook.
    """
    check_config(cfg)
    run = open_run(cfg)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    datamodule = build_datamodule(cfg)
    check_data(datamodule)
    module = build_module(cfg, datamodule)
    check_model(module, datamodule)
    if run.checkpoint is not None:
        checkpoint = load_checkpoint(run.checkpoint, also_allowed=own_targets(cfg))
        check_resume(checkpoint, run, plain_config(cfg), module, by_hand=cfg.ckpt_path is not None)
    trainer = build_trainer(cfg, run.run_dir, module.task, extra_callbacks)
    if trainer.is_global_zero:  # under DDP every rank runs train(); one writes the run's files
        write_config(cfg, run.run_dir / CONFIG)
    fit_seconds = fit(trainer, module, datamodule, run)
    with requeue_signal_ignored(cfg.requeue_signal):
        result = finish(cfg, trainer, module, datamodule, run, fit_seconds)
        log_run_end(trainer.loggers, result, run.run_dir)  # trackers: final metrics, artifacts
    return result


def open_run(cfg: DictConfig) -> Resume:
    """The run directory (a resumed run's own) and the checkpoint to go on from; the process
    set up to write there: Lightning's logs routed, device-dependent trainer defaults filled."""
    run = resolve_resume(cfg)
    if run.run_dir != Path(cfg.paths.output_dir):  # a resumed run's own directory
        with open_dict(cfg):
            cfg.paths.output_dir = str(run.run_dir)
    route_lightning_logs()  # under Hydra: into <run dir>/train.log too
    quiet_lightning()
    resolve_device_defaults(cfg)  # precision, determinism, cuDNN autotuning: from the device
    return run


def fit(trainer: L.Trainer, module: TaskModule, datamodule: TaskDataModule, run: Resume) -> float:
    """`trainer.fit` from the run's checkpoint; its seconds. A stop says where to go on from."""
    ckpt_path = None if run.checkpoint is None else str(run.checkpoint)
    start = time.perf_counter()
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
    except NonFiniteLossError as error:  # every checkpoint on disk holds finite weights
        last = find_resume(run.run_dir)
        kept = f"the last good checkpoint is {last}" if last else "no checkpoint was written yet"
        raise NonFiniteLossError(f"{error}; {kept}") from None
    except SIGTERMException:  # a SystemExit, with status 0: a stopped run would look finished
        where = f"step {trainer.global_step} (epoch {trainer.current_epoch})"
        raise SystemExit(
            f"error: the run was stopped by SIGTERM at {where}; {_kept(run.run_dir)}"
        ) from None
    except Exception as error:
        if trainer.received_sigterm:  # SLURM ends the job (requeued, out of time, cancelled)
            # and its SIGTERM killed the DataLoader workers first: not a failure of the run,
            # and no result for submitit to record (a requeued job goes on from its checkpoint).
            raise SystemExit(f"SLURM ended the job ({type(error).__name__}: {error})") from None
        raise
    return time.perf_counter() - start


def _kept(run_dir: Path) -> str:
    """Where a stopped run can go on from, said in the stop's message."""
    last = find_resume(run_dir)
    if last is None:
        return "no checkpoint was written yet"
    return f"the last checkpoint is {last}; resume with `python train.py ckpt_path={run_dir}`"


def finish(
    cfg: DictConfig,
    trainer: L.Trainer,
    module: TaskModule,
    datamodule: TaskDataModule,
    run: Resume,
    fit_seconds: float,
) -> RunResult:
    """After fit: the best checkpoint tested, its backbone exported and its pictures drawn."""
    task = module.task
    checkpoint = trainer.checkpoint_callback
    best = checkpoint.best_model_path or None  # fast_dev_run saves none
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if "/" in k}
    # Read before trainer.test: it restores the callbacks' state of the best checkpoint too.
    history = list(_callback(trainer, MetricsPlot).history.get(task.monitor, []))
    best_at = best_epoch(history, task.mode) if best else None
    warmup = _callback(trainer, StepTimer).warmup_seconds if cfg.compile else None
    result = RunResult(
        metrics=metrics,
        monitor=task.monitor,
        mode=task.mode,
        best_model_path=best,
        best_score=None
        if checkpoint.best_model_score is None
        else float(checkpoint.best_model_score),
        best_epoch=best_at[0] + 1 if best_at else None,  # counted from 1
        monitor_history=history,
        output_dir=str(run.run_dir),
        fit_seconds=fit_seconds,
        train_images_per_second=_images_per_second(trainer, datamodule, fit_seconds),
        compile_warmup_seconds=warmup,
    )
    if best is None:
        return result
    if cfg.test_after_fit:
        tested = trainer.test(module, datamodule=datamodule, ckpt_path=best, weights_only=True)
        metrics.update({k: float(v) for k, v in (tested[0] if tested else {}).items()})
    if trainer.is_global_zero and (cfg.export_backbone or cfg.pictures):
        weights = load_checkpoint(best, also_allowed=own_targets(cfg))["state_dict"]
        if cfg.export_backbone:
            path = export_backbone(weights, Path(best).parent / BACKBONE, cfg.backbone.name)
            result.backbone_weights = str(path)
        if cfg.pictures:
            module.load_state_dict(weights)
            title = f"{run_title(cfg)}\nbest checkpoint: epoch {result.best_epoch}, "
            title += f"{task.monitor} {result.best_score:.4f}"
            written = write_pictures(trainer, module, datamodule, run.run_dir, title)
            result.pictures = [str(p) for p in written]
    return result


def _callback(trainer: L.Trainer, kind: type) -> Any:
    return next(c for c in trainer.callbacks if isinstance(c, kind))


def _images_per_second(trainer: L.Trainer, datamodule: TaskDataModule, seconds: float) -> float:
    """Training images seen per second of `fit`, all ranks (validation included: a lower bound)."""
    batches = trainer.fit_loop.epoch_loop.total_batch_idx + 1
    return batches * datamodule.batch_size * trainer.world_size / max(seconds, 1e-9)

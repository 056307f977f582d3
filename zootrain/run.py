"""A training run, one way through: config -> checks -> run directory / resume -> build -> fit
-> finish (test, export, pictures, result).

`train(cfg)` is what train.py, sweeps, benchmarks and tests call; each step below is a function
with a name, so the run reads top to bottom.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
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
from .errors import DivergedError, RunStopped
from .module import TaskModule
from .plots import best_epoch, run_title
from .predictions import write_pictures
from .report import quiet_lightning, route_lightning_logs
from .result import RunResult
from .runs import (
    BACKBONE,
    CONFIG,
    Resume,
    check_resume,
    checkpoint_dir,
    find_resume,
    resolve_resume,
    run_dir_locked,
)
from .trackers import log_run_end


def train(cfg: DictConfig, extra_callbacks: Sequence[L.Callback] = ()) -> RunResult:
    """Fit, test the best checkpoint, export its backbone, draw its pictures; the result.

    `extra_callbacks` (what the training benchmark and tests measure with) run before the run's
    own callbacks at every hook.
    """
    check_config(cfg)
    run = resolve_resume(cfg)
    with run_dir_locked(run.run_dir):  # one live process writes a run directory
        open_run(cfg, run)
        L.seed_everything(cfg.seed, workers=True, verbose=False)
        datamodule = build_datamodule(cfg)
        check_data(datamodule)
        module = build_module(cfg, datamodule)
        check_model(module, datamodule)
        if run.checkpoint is not None:
            checkpoint = load_checkpoint(run.checkpoint, also_allowed=own_targets(cfg))
            by_hand = cfg.ckpt_path is not None  # a requeued SLURM job just goes on
            check_resume(checkpoint, run, plain_config(cfg), module, by_hand)
        trainer = build_trainer(cfg, run.run_dir, module.task, extra_callbacks)
        if trainer.is_global_zero:  # under DDP every rank runs train(); one writes the files
            write_config(cfg, run.run_dir / CONFIG)
        with stops_reported(trainer, run, "fit"):
            fit_seconds = fit(trainer, module, datamodule, run)
        with requeue_signal_ignored(cfg.requeue_signal), stops_reported(trainer, run, "finish"):
            result = finish(cfg, trainer, module, datamodule, run, fit_seconds)
            log_run_end(trainer.loggers, result, run.run_dir)  # trackers: final metrics, files
        return result


def open_run(cfg: DictConfig, run: Resume) -> None:
    """The process set up to write into the run's directory (a resumed run's own): the config
    pointed there, Lightning's logs routed, device-dependent trainer defaults filled."""
    if run.run_dir != Path(cfg.paths.output_dir):  # a resumed run's own directory
        with open_dict(cfg):
            cfg.paths.output_dir = str(run.run_dir)
    route_lightning_logs()  # under Hydra: into <run dir>/train.log too
    quiet_lightning()
    resolve_device_defaults(cfg)  # precision, determinism, cuDNN autotuning: from the device


def fit(trainer: L.Trainer, module: TaskModule, datamodule: TaskDataModule, run: Resume) -> float:
    """`trainer.fit` from the run's checkpoint; its seconds. A stop says where to go on from."""
    ckpt_path = None if run.checkpoint is None else str(run.checkpoint)
    start = time.perf_counter()
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
    except DivergedError as error:  # every checkpoint on disk holds finite weights
        last = find_resume(run.run_dir)
        kept = f"the last good checkpoint is {last}" if last else "no checkpoint was written yet"
        raise type(error)(f"{error}; {kept}") from None
    except Exception as error:
        if trainer.received_sigterm:  # SLURM ends the job (requeued, out of time, cancelled)
            # and its SIGTERM killed the DataLoader workers first: not a failure of the run,
            # and no result for submitit to record (a requeued job goes on from its checkpoint).
            raise SystemExit(f"SLURM ended the job ({type(error).__name__}: {error})") from None
        raise
    return time.perf_counter() - start


@contextmanager
def stops_reported(trainer: L.Trainer, run: Resume, phase: str) -> Iterator[None]:
    """A run stopped in `phase` ("fit", or "finish": test, export, pictures) by a signal or
    Ctrl-C exits with status 1 and one line saying where it stopped and how to go on; never 0.

    Lightning ends a fit or test on SIGTERM with `SIGTERMException`, a SystemExit of status 0,
    and on Ctrl-C with its own `sys.exit(1)` that says nothing of the checkpoints.
    """
    stop = None
    try:
        yield
    except SIGTERMException:
        stop = "SIGTERM"
    except KeyboardInterrupt:
        stop = "SIGINT (Ctrl-C)"
    except SystemExit:
        # Lightning marks the trainer interrupted on any exception: fit's "SLURM ended the
        # job" (SIGTERM, workers killed) is its own message, not a Ctrl-C
        if not trainer.interrupted or trainer.received_sigterm:
            raise
        stop = "SIGINT (Ctrl-C)"
    if stop is None and trainer.interrupted:  # an interrupted loop that returned
        stop = "an interruption"
    if stop is not None:
        raise SystemExit(_stopped(stop, trainer, run, phase)) from None


def _stopped(stop: str, trainer: L.Trainer, run: Resume, phase: str) -> str:
    """What a stopped run says: where it stopped and how to go on."""
    if phase == "fit":
        where = f"at step {trainer.global_step} (epoch {trainer.current_epoch})"
        return f"error: the run was stopped by {stop} {where}; {_kept(run.run_dir)}"
    return (
        f"error: the run was stopped by {stop} after its fit, before its test, export and "
        f"pictures were done; its checkpoints are in {checkpoint_dir(run.run_dir)}: score the "
        f"best with `python eval.py ckpt_path={run.run_dir}`"
    )


def _kept(run_dir: Path) -> str:
    """Where a stopped fit can go on from."""
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
        if trainer.fast_dev_run:  # a smoke test: Lightning saves no checkpoint
            return result
        raise RunStopped(
            f"the run ended without a best checkpoint: {task.monitor} was never computed (did "
            "validation run? trainer.limit_val_batches, trainer.max_epochs); nothing was tested "
            f"or exported. Its last checkpoint: {find_resume(run.run_dir) or 'none'}"
        )
    if cfg.test_after_fit:
        tested = trainer.test(module, datamodule=datamodule, ckpt_path=best, weights_only=True)
        if not tested or not tested[0]:
            raise RunStopped(
                f"the test of the best checkpoint {best} gave no metrics (trainer.limit_test_"
                "batches=0?); set test_after_fit=false to skip it, or score it with eval.py"
            )
        metrics.update({k: float(v) for k, v in tested[0].items()})
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

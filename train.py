"""Train a backbone + head: `python train.py backbone=mobilenetv3 head=fpn trainer.max_epochs=3`.

`train(cfg) -> dict` does the work (and is what tests and sweeps call); `main` is the thin
Hydra entry point. Configs live in `configs/` (`python train.py --help` lists them).
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import hydra
from omegaconf import DictConfig, OmegaConf, open_dict

import zootrain.cli  # noqa: F401  (what composing the config needs; light, so --help is fast)

if TYPE_CHECKING:
    import lightning as L

# torch, Lightning and the project's models load inside the functions below, once Hydra has
# parsed the command line: `--help` and tab completion never wait for them.


def _callbacks(cfg: DictConfig, output_dir: Path, monitor: str, mode: str) -> list[L.Callback]:
    from hydra.utils import instantiate
    from lightning.pytorch.callbacks import ModelCheckpoint

    from zootrain.callbacks import (
        ExampleInput,
        MetricsPlot,
        StepSeed,
        StepTimer,
        TopKCheckpoints,
    )
    from zootrain.plots import run_title

    options = OmegaConf.to_container(cfg.callbacks, resolve=True)
    checkpoint = options.pop("checkpoint", None) or {}
    top_k = checkpoint.pop("save_top_k", 1)
    callbacks: list[L.Callback] = [
        ModelCheckpoint(  # best by the task's metric; trainer.checkpoint_callback
            dirpath=output_dir / "checkpoints",
            filename="best",
            monitor=monitor,
            mode=mode,
            save_top_k=min(top_k, 1) if top_k >= 0 else 1,  # one file, one name: the best
            auto_insert_metric_name=False,
            enable_version_counter=False,
            **checkpoint,
        ),
        # last.ckpt after every epoch. Lightning's own save_last only refreshes it when a
        # top-k checkpoint was saved too, which would resume from a stale epoch.
        ModelCheckpoint(
            dirpath=output_dir / "checkpoints",
            filename="last",
            save_top_k=1,
            enable_version_counter=False,
        ),
        MetricsPlot(output_dir / "metrics.png", run_title(cfg), monitor, mode),
        ExampleInput(),  # the model summary's FLOPs
        StepTimer(),
        StepSeed(cfg.seed),  # dropout's draws per step: a resumed epoch draws the same
    ]
    if top_k > 1 or top_k == -1:  # k best (-1: every epoch's), named by epoch and metric
        callbacks.append(TopKCheckpoints(output_dir / "checkpoints", monitor, mode, top_k))
    for key, spec in options.items():
        if spec is None or (key == "progress_bar" and not cfg.trainer.enable_progress_bar):
            continue
        if "monitor" in spec and spec["monitor"] is None:  # the task's metric
            spec.update(monitor=monitor, mode=spec.get("mode") or mode)
        callbacks.append(instantiate(spec))
    return callbacks


def _check_resume(
    cfg: DictConfig, run_dir: Path, ckpt_path: str, checkpoint: dict[str, Any]
) -> None:
    """Refuse a resume that changes what `checkpoint` (read from `ckpt_path`) fixes, or of a
    finished run."""
    from zootrain.build import plain_config
    from zootrain.runs import Resume, check_unchanged, check_unfinished

    stored = checkpoint["hyper_parameters"]["config"]
    check_unchanged(stored, plain_config(cfg), Path(ckpt_path))
    if cfg.ckpt_path is not None:  # asked for by hand (a requeued SLURM job just goes on)
        check_unfinished(checkpoint, Resume(run_dir, Path(ckpt_path)), cfg.trainer.max_epochs)


def _own_targets(cfg: DictConfig) -> set[str]:
    """The `_target_`s this run's config names: a resumed checkpoint may name them too (a
    callback of the user's own), beyond `zootrain.checkpoints.ALLOWED_TARGETS`."""
    from zootrain.checkpoints import config_targets

    return config_targets(OmegaConf.to_container(cfg, resolve=False))


def _plugins(cfg: DictConfig) -> list[Any]:
    from lightning.pytorch.plugins.environments import SLURMEnvironment

    from zootrain.checkpoints import AtomicCheckpointIO
    from zootrain.errors import ConfigError

    plugins: list[Any] = [AtomicCheckpointIO()]
    if SLURMEnvironment.detect():
        # Lightning would detect SLURM itself; this sets the signal it saves and requeues on
        # to the one the submitit_slurm launcher asks SLURM to send.
        try:
            requeue_signal = signal.Signals[f"SIG{cfg.requeue_signal}"]
        except KeyError:
            raise ConfigError(
                f"requeue_signal={cfg.requeue_signal} is not a signal name; use USR1 or USR2"
            ) from None
        plugins.append(SLURMEnvironment(auto_requeue=True, requeue_signal=requeue_signal))
        from zootrain.cluster import ignore_in_forked_children

        ignore_in_forked_children(requeue_signal)  # DataLoader workers get SLURM's signals too
    return plugins


@contextmanager
def _requeue_signal_ignored(plugins: list[Any]) -> Iterator[None]:
    """Ignore SLURM's requeue signal (sent `signal_delay_s` before the time limit) in the block.

    After `fit` it would requeue a trained run, or kill it (the signal's default action) during
    its test and export; the time limit alone ends the job if they do not finish in time.
    """
    from lightning.pytorch.plugins.environments import SLURMEnvironment

    slurm = [p for p in plugins if isinstance(p, SLURMEnvironment) and p.auto_requeue]
    if not slurm or threading.current_thread() is not threading.main_thread():
        yield
        return
    # Lightning's test() then sees a handler in place and installs no requeue handler.
    previous = signal.signal(slurm[0].requeue_signal, signal.SIG_IGN)
    try:
        yield
    finally:  # the next job of a sweep in this process must requeue on it again
        signal.signal(slurm[0].requeue_signal, previous)


def train(cfg: DictConfig, extra_callbacks: Sequence[L.Callback] = ()) -> dict[str, Any]:
    """Fit, test the best checkpoint, export its backbone; return the final metrics.

    `extra_callbacks` (what the training benchmark and tests measure with) run before the run's
    own callbacks at every hook.
    """
    from zootrain.checks import check_config, check_data, check_model

    check_config(cfg)  # before the imports below: a mistyped value fails in a second

    import lightning as L
    from hydra.utils import instantiate
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from zootrain.build import build_datamodule, build_module, write_config
    from zootrain.callbacks import MetricsPlot, StepTimer
    from zootrain.checkpoints import check_resumable, export_backbone, load_checkpoint
    from zootrain.devices import resolve_device_defaults
    from zootrain.errors import NonFiniteLossError
    from zootrain.plots import best_epoch, run_title
    from zootrain.predictions import write_pictures
    from zootrain.report import quiet_lightning, route_lightning_logs
    from zootrain.runs import resolve_resume

    # The run directory and the checkpoint to go on from (see `zootrain.runs`): a resumed run
    # writes into its own directory again.
    output_dir, checkpoint_file = resolve_resume(cfg)
    ckpt_path = None if checkpoint_file is None else str(checkpoint_file)
    if output_dir != Path(cfg.paths.output_dir):  # a resumed run's own directory
        with open_dict(cfg):
            cfg.paths.output_dir = str(output_dir)
    route_lightning_logs()  # under Hydra: into <run dir>/train.log too
    quiet_lightning()
    resolve_device_defaults(cfg)  # precision, determinism, cuDNN autotuning: from the device
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    datamodule = build_datamodule(cfg)
    check_data(datamodule)
    module = build_module(cfg, datamodule)
    check_model(module, datamodule)
    if ckpt_path is not None:
        checkpoint = check_resumable(ckpt_path, module, also_allowed=_own_targets(cfg))
        _check_resume(cfg, output_dir, ckpt_path, checkpoint)

    monitor, mode = module.task.monitor, module.task.mode
    loggers = [instantiate(spec) for spec in cfg.logger.values() if spec is not None]
    callbacks = _callbacks(cfg, output_dir, monitor, mode)
    # A logger with checkpoint hooks (zootrain.loggers.CSVLogger keeps metrics.csv on resume)
    callbacks += [logger for logger in loggers if isinstance(logger, L.Callback)]
    plugins = _plugins(cfg)
    trainer: L.Trainer = instantiate(
        cfg.trainer,
        callbacks=[*extra_callbacks, *callbacks],
        logger=loggers or False,
        plugins=plugins,
        default_root_dir=output_dir,  # where Lightning's SLURM requeue saves hpc_ckpt_<n>.ckpt
    )
    if trainer.is_global_zero:  # under DDP every rank runs train(); one writes the run's files
        write_config(cfg, output_dir / "config.yaml")
    start = time.perf_counter()
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
    except NonFiniteLossError as error:
        last = output_dir / "checkpoints" / "last.ckpt"
        kept = (
            f"the last good checkpoint is {last}"
            if last.is_file()
            else "no checkpoint was written yet"
        )
        raise NonFiniteLossError(f"{error}; {kept}") from None
    except SIGTERMException:  # a SystemExit, with status 0: a stopped run would look finished
        raise SystemExit(_stopped(trainer, output_dir)) from None
    except Exception as error:
        if trainer.received_sigterm:  # SLURM ends the job (requeued, out of time, cancelled)
            # and its SIGTERM killed the DataLoader workers first: not a failure of the run,
            # and no result for submitit to record (a requeued job goes on from its checkpoint).
            raise SystemExit(f"SLURM ended the job ({type(error).__name__}: {error})") from None
        raise
    fit_seconds = time.perf_counter() - start
    with _requeue_signal_ignored(plugins):
        checkpoint = trainer.checkpoint_callback
        best = checkpoint.best_model_path
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if "/" in k}
        # Read before trainer.test: it restores the callbacks' state of the best checkpoint too.
        plot = next(c for c in trainer.callbacks if isinstance(c, MetricsPlot))
        history = list(plot.history.get(monitor, []))
        best_at = best_epoch(history, mode) if best else None
        if cfg.test_after_fit and best:
            tested = trainer.test(module, datamodule=datamodule, ckpt_path=best, weights_only=True)
            metrics.update({k: float(v) for k, v in (tested[0] if tested else {}).items()})
        result: dict[str, Any] = {
            "metrics": metrics,
            "monitor": monitor,
            "mode": mode,
            "best_score": float(checkpoint.best_model_score)
            if checkpoint.best_model_score is not None
            else None,
            "best_epoch": best_at[0] + 1 if best_at else None,  # counted from 1
            "monitor_history": history,  # (epoch from 0, value)
            "best_model_path": best,
            "output_dir": str(output_dir),
            "fit_seconds": fit_seconds,
            "train_images_per_second": _images_per_second(trainer, datamodule, fit_seconds),
        }
        timer = next(c for c in trainer.callbacks if isinstance(c, StepTimer))
        if cfg.compile and timer.warmup_seconds is not None:
            result["compile_warmup_seconds"] = timer.warmup_seconds
        if best and trainer.is_global_zero and (cfg.export_backbone or cfg.pictures):
            weights = load_checkpoint(best, also_allowed=_own_targets(cfg))["state_dict"]
        if cfg.export_backbone and best and trainer.is_global_zero:
            path = export_backbone(
                weights, Path(best).parent / "backbone.safetensors", cfg.backbone.name
            )
            result["backbone_weights"] = str(path)
        if cfg.pictures and best and trainer.is_global_zero:  # of the best checkpoint
            module.load_state_dict(weights)
            title = f"{run_title(cfg)}\nbest checkpoint: epoch {result['best_epoch']}, "
            title += f"{monitor} {result['best_score']:.4f}"
            written = write_pictures(trainer, module, datamodule, output_dir, title)
            result["pictures"] = [str(p) for p in written]
    return result


def _stopped(trainer: L.Trainer, output_dir: Path) -> str:
    """What a run stopped by SIGTERM (a preemption, `kill`) says: where and how to go on."""
    from zootrain.checkpoints import find_resume

    last = find_resume(output_dir)
    kept = (
        f"the last checkpoint is {last}; resume with `python train.py ckpt_path={output_dir}`"
        if last is not None
        else "no checkpoint was written yet"
    )
    where = f"step {trainer.global_step} (epoch {trainer.current_epoch})"
    return f"error: the run was stopped by SIGTERM at {where}; {kept}"


def _images_per_second(trainer: L.Trainer, datamodule, seconds: float) -> float:
    """Training images seen per second of `fit`, all ranks (validation included: a lower bound)."""
    batches = trainer.fit_loop.epoch_loop.total_batch_idx + 1
    return batches * datamodule.batch_size * trainer.world_size / max(seconds, 1e-9)


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
def main(cfg: DictConfig) -> float | None:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from zootrain.report import print_summary, user_errors

    # A multirun job's error must not end the sweep: it is logged and raised for Hydra to record.
    if HydraConfig.get().mode == RunMode.MULTIRUN:
        from zootrain.launch import multirun_job

        context = multirun_job()
    else:
        context = user_errors()
    with context as job:
        result = train(cfg)
        if job is not None:  # the job's row in the sweep summary
            job.finish(result)
    from lightning.pytorch.utilities import rank_zero_only

    if rank_zero_only.rank == 0:  # DDP: rank 0 reports (and its return value is the one used)
        print_summary(result)
    return result["best_score"]  # what Hydra sweepers (Optuna) optimise


if __name__ == "__main__":
    main()

"""Compose the run from a config: data module, backbone + head model, LightningModule, and the
Trainer with the run's callbacks, loggers and plugins."""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
from hydra.utils import get_class, instantiate
from lightning.pytorch.callbacks import ModelCheckpoint
from omegaconf import DictConfig, OmegaConf
from torch import nn

from backbones import input_normalization
from backbones.files import atomic_path

from .callbacks import (
    DivergenceCheck,
    ExampleInput,
    MetricsPlot,
    StepSeed,
    StepTimer,
    TopKCheckpoints,
)
from .checkpoints import AtomicCheckpointIO
from .cluster import slurm_plugins
from .data.base import TaskDataModule
from .module import TaskModule
from .plots import run_title
from .runs import BEST, LAST, METRICS_PLOT, checkpoint_dir, config_targets
from .tasks import Task, get_task


def build_datamodule(cfg: DictConfig) -> TaskDataModule:
    task = cfg.head.task
    get_task(task)  # an unknown task fails here, before any data is touched
    options: dict[str, Any] = {"task": task}
    # Real images are normalised with the statistics the backbone's pretrained weights expect;
    # a data module takes them by having `mean` and `std` arguments (the shapes module does not).
    parameters = inspect.signature(get_class(cfg.data._target_)).parameters
    if {"mean", "std"} <= parameters.keys() and "mean" not in cfg.data:
        options["mean"], options["std"] = input_normalization(cfg.backbone.name)
    datamodule = instantiate(cfg.data, **options)
    datamodule.sample_seed = cfg.seed  # the training order and augmentations: see its loaders
    return datamodule


def build_model(cfg: DictConfig, num_classes: int) -> nn.Module:
    """Backbone (with the levels the head needs) + head, wired by channel counts."""
    backbone_kwargs: dict[str, Any] = {"out_features": tuple(cfg.head.out_features)}
    if cfg.get("linear_probe", False):
        backbone_kwargs["norm_eval"] = True  # BatchNorm statistics stay frozen too
    # A null option means the family's default (not passed): `drop_path_rate: null` in a config
    # also serves the families that have no stochastic depth.
    options = OmegaConf.to_container(cfg.backbone, resolve=True)
    backbone = instantiate({k: v for k, v in options.items() if v is not None}, **backbone_kwargs)
    if cfg.get("linear_probe", False):
        backbone.requires_grad_(False)
    model = instantiate(cfg.head.model)(backbone=backbone, num_classes=num_classes)
    set_bn_momentum(model, cfg.get("bn_momentum"))
    return model


def set_bn_momentum(model: nn.Module, momentum: float | None) -> None:
    """Give every BatchNorm `momentum` (None keeps each family's own value)."""
    if momentum is None:
        return
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.momentum = momentum


def build_module(cfg: DictConfig, datamodule: TaskDataModule) -> TaskModule:
    return TaskModule(
        model=build_model(cfg, datamodule.num_classes),
        task=cfg.head.task,
        num_classes=datamodule.num_classes,
        optimizer=instantiate(cfg.optim),
        scheduler=OmegaConf.to_container(cfg.scheduler, resolve=True),
        backbone_lr_mult=cfg.backbone_lr_mult,
        channels_last=cfg.channels_last,
        compile=cfg.compile,
        config=plain_config(cfg),
        mean=datamodule.mean,
        std=datamodule.std,
    )


def write_config(cfg: DictConfig, path: Path) -> None:
    """The resolved run config, written atomically (temp file + rename)."""
    with atomic_path(path) as tmp:
        tmp.write_text(OmegaConf.to_yaml(plain_config(cfg)))


def plain_config(cfg: DictConfig) -> dict[str, Any]:
    """The run config as plain dicts/lists/scalars (what checkpoints may hold)."""
    config = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)
    config.pop("hydra", None)
    return config


def build_trainer(
    cfg: DictConfig, run_dir: Path, task: Task, extra_callbacks: Sequence[L.Callback] = ()
) -> L.Trainer:
    """The Trainer of `cfg.trainer`, writing into `run_dir`, with the run's callbacks (after
    `extra_callbacks`, what benchmarks and tests measure with), loggers and plugins."""
    loggers = [instantiate(spec) for spec in cfg.logger.values() if spec is not None]
    callbacks = [*extra_callbacks, *build_callbacks(cfg, run_dir, task)]
    # A logger with checkpoint hooks (zootrain.loggers.CSVLogger keeps metrics.csv on resume)
    callbacks += [logger for logger in loggers if isinstance(logger, L.Callback)]
    return instantiate(
        cfg.trainer,
        callbacks=callbacks,
        logger=loggers or False,
        plugins=[AtomicCheckpointIO(), *slurm_plugins(cfg.requeue_signal)],
        default_root_dir=run_dir,  # where Lightning's SLURM requeue saves hpc_ckpt_<n>.ckpt
    )


def build_callbacks(cfg: DictConfig, run_dir: Path, task: Task) -> list[L.Callback]:
    """Checkpoints (best by the task's metric, last every epoch), the curves plot, the step
    timer and seed, and the callbacks of `cfg.callbacks`."""
    options = OmegaConf.to_container(cfg.callbacks, resolve=True)
    checkpoint = options.pop("checkpoint", None) or {}
    top_k = checkpoint.pop("save_top_k", 1)
    monitor, mode = task.monitor, task.mode
    callbacks: list[L.Callback] = [
        ModelCheckpoint(  # best by the task's metric; trainer.checkpoint_callback
            dirpath=checkpoint_dir(run_dir),
            filename=BEST,
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
            dirpath=checkpoint_dir(run_dir),
            filename=LAST,
            save_top_k=1,
            enable_version_counter=False,
        ),
        MetricsPlot(run_dir / METRICS_PLOT, run_title(cfg), monitor, mode),
        ExampleInput(),  # the model summary's FLOPs
        StepTimer(),
        StepSeed(cfg.seed),  # dropout's draws per step: a resumed epoch draws the same
        DivergenceCheck(),  # a non-finite validation stops the fit before its checkpoints
    ]
    if top_k > 1 or top_k == -1:  # k best (-1: every epoch's), named by epoch and metric
        callbacks.append(TopKCheckpoints(checkpoint_dir(run_dir), monitor, mode, top_k))
    for key, spec in options.items():
        if spec is None or (key == "progress_bar" and not cfg.trainer.enable_progress_bar):
            continue
        if "monitor" in spec and spec["monitor"] is None:  # the task's metric
            spec.update(monitor=monitor, mode=spec.get("mode") or mode)
        callbacks.append(instantiate(spec))
    return callbacks


def own_targets(cfg: DictConfig) -> set[str]:
    """The `_target_`s this run's config names: a resumed checkpoint may name them too (a
    callback of the user's own), beyond `zootrain.runs.ALLOWED_TARGETS`."""
    return config_targets(OmegaConf.to_container(cfg, resolve=False))

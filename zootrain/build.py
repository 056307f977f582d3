"""Compose the run from a config: data module, backbone + head model, LightningModule."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf
from torch import nn

from backbones import input_normalization
from backbones.weights import atomic_path

from .data.base import TaskDataModule
from .errors import ConfigError
from .module import TaskModule
from .tasks import get_task


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
    if not 0.0 < momentum <= 1.0:
        raise ConfigError(f"bn_momentum must be in (0, 1] or null, got {momentum}")
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

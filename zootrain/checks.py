"""Every check of a config and of what it builds, before a run starts: a value that cannot work
is one clear message (a `ConfigError`).

Each names the config key and says what to set instead, where otherwise PyTorch or Lightning
would fail minutes later, deep in a traceback (a DataLoader's batch size, an optimiser's
learning rate, BatchNorm on batches of one).
"""

from __future__ import annotations

import importlib.util
import signal
from typing import TYPE_CHECKING, Any

from omegaconf import DictConfig, OmegaConf

from .errors import ConfigError

if TYPE_CHECKING:  # check_config runs before torch is imported: a mistake costs no wait
    from torch import nn

    from .data.base import TaskDataModule

# (config key, smallest value, what the value is, words allowed instead): integers checked
# when the key is present.
_AT_LEAST: tuple[tuple[str, int, str, tuple[str, ...]], ...] = (
    ("data.batch_size", 1, "images per batch (per device)", ()),
    (
        "data.num_workers",
        0,
        "DataLoader worker processes (0 loads in the main process)",
        ("auto",),
    ),
    ("data.num_train", 1, "training images", ()),
    ("data.num_val", 1, "validation images", ()),
    ("data.num_test", 1, "test images", ()),
)
# (config key, what it is): numbers that must not be negative.
_NOT_NEGATIVE = (
    ("optim.lr", "the learning rate"),
    ("optim.weight_decay", "the weight decay"),
    ("backbone_lr_mult", "the backbone's learning rate relative to the head's"),
)


def check_config(cfg: DictConfig) -> None:
    """The values of a train.py config that no run can use; before anything is built."""
    for key, minimum, meaning, words in _AT_LEAST:
        value = _select(cfg, key)
        if value is None or value in words:
            continue
        if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
            also = "".join(f" or {word!r}" for word in words)
            raise ConfigError(
                f"{key}={value} cannot work: it is the number of {meaning}, an integer "
                f">= {minimum}{also}"
            )
    for key, meaning in _NOT_NEGATIVE:
        value = _select(cfg, key)
        if value is None:
            continue
        # `not value >= 0`: NaN too (it compares false with everything)
        if isinstance(value, bool) or not isinstance(value, int | float) or not value >= 0:
            raise ConfigError(f"{key}={value} cannot work: {meaning} is a number >= 0")
    momentum = _select(cfg, "bn_momentum")
    if momentum is not None and (
        isinstance(momentum, bool) or not isinstance(momentum, int | float) or not 0 < momentum <= 1
    ):
        raise ConfigError(
            f"bn_momentum={momentum} cannot work: it is every BatchNorm's running-statistics "
            "momentum, a number in (0, 1], or null to keep each family's own"
        )
    requeue = _select(cfg, "requeue_signal")
    if requeue is not None and f"SIG{requeue}" not in signal.Signals.__members__:
        raise ConfigError(f"requeue_signal={requeue} is not a signal name; use USR1 or USR2")
    check_trackers(cfg)


# The trackers' loggers (zootrain.trackers) and (package, extra) each needs.
TRACKER_PACKAGES = {
    "zootrain.trackers.MLFlowLogger": ("mlflow", "mlflow"),
    "zootrain.trackers.WandbLogger": ("wandb", "wandb"),
}


def check_trackers(cfg: DictConfig) -> None:
    """A tracker chosen (`logger=mlflow`) whose package is not installed: the extra to install."""
    for spec in (_select(cfg, "logger") or {}).values():
        needs = TRACKER_PACKAGES.get((spec or {}).get("_target_"))
        if needs is not None and importlib.util.find_spec(needs[0]) is None:
            raise ConfigError(missing_tracker(*needs))


def missing_tracker(package: str, extra: str) -> str:
    """What a tracker whose package is missing says: the extra that installs it."""
    return (
        f"logger={extra} needs the {package} package, which is not installed: "
        f"pip install 'backbone-zoo[{extra}]'"
    )


def check_eval_config(cfg: DictConfig) -> None:
    """The values of an eval.py config that cannot work."""
    if OmegaConf.is_missing(cfg, "ckpt_path") or cfg.ckpt_path is None:
        raise ConfigError(
            "eval.py needs a checkpoint: ckpt_path=<run dir> (scores its checkpoints/best.ckpt) "
            "or ckpt_path=<file>.ckpt"
        )
    if cfg.split not in ("val", "test"):
        raise ConfigError(f"split must be val or test, got {cfg.split!r}")


def check_data(datamodule: TaskDataModule) -> None:
    """A dataset a model cannot learn from: fewer classes than its task tells apart (two;
    detection: one, which says where it is)."""
    task = datamodule.task
    if datamodule.num_classes >= task.min_classes:
        return
    names = getattr(datamodule, "class_names", None) or getattr(datamodule, "classes", ())
    raise ConfigError(
        f"the {task.name} data has {datamodule.num_classes} class "
        f"({', '.join(map(str, names)) or 'none'}): there is nothing to tell apart. Give it at "
        "least two classes (ImageFolder: one folder per class; shapes: data.classes)"
    )


def check_model(module: nn.Module, datamodule: TaskDataModule) -> None:
    """BatchNorm layers that would train on batches of one image."""
    from torch.nn.modules.batchnorm import _BatchNorm

    if datamodule.batch_size != 1:
        return
    module.train()  # as fit() will: frozen stages and norm_eval keep their norms in eval mode
    training = [
        name
        for name, layer in module.named_modules()
        if isinstance(layer, _BatchNorm) and layer.training
    ]
    if training:
        in_backbone = all(".backbone." in f".{name}" for name in training)
        remedy = " (or keep their statistics fixed: backbone.norm_eval=true)" if in_backbone else ""
        raise ConfigError(
            f"data.batch_size=1 cannot train the model's {len(training)} BatchNorm layers (e.g. "
            f"{training[0]}): a batch of one image gives them no batch statistics (on a 1x1 "
            f"map PyTorch refuses it). Use data.batch_size >= 2{remedy}"
        )


def _select(cfg: DictConfig, key: str) -> Any:
    return OmegaConf.select(cfg, key, default=None, throw_on_missing=False)

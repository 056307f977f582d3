"""Every check of a config and of what it builds, before a run starts: a value that cannot work
is one clear message (a `ConfigError`).

Each names the config key and says what to set instead, where otherwise PyTorch or Lightning
would fail minutes later, deep in a traceback (a DataLoader's batch size, an optimiser's
learning rate, BatchNorm on batches of one).
"""

from __future__ import annotations

import importlib.util
import math
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

from . import cli  # noqa: F401  registers the configs' ${...} resolvers, which the checks resolve
from .errors import CheckpointError, ConfigError
from .runs import BACKBONE, CHECKPOINTS, check_run_name

if TYPE_CHECKING:  # check_config runs before torch is imported: a mistake costs no wait
    from torch import nn

    from .data.base import TaskDataModule


@dataclass(frozen=True)
class Rule:
    """What a config key may hold: a kind ("int", "number", "bool"; "words": only those of
    `also`), a closed range
    (`low`, `high`; `above`: `low` itself excluded), the values allowed besides (words such as
    "auto", or -1), and null."""

    kind: str
    meaning: str
    low: float | None = None
    high: float | None = None
    above: bool = False
    also: tuple[str | int, ...] = ()
    nullable: bool = False

    def accepts(self, value: Any) -> bool:
        if value is None:
            return self.nullable
        if not isinstance(value, bool) and value in self.also:
            return True
        if self.kind == "bool":
            return isinstance(value, bool)
        if self.kind == "words":  # only the words of `also`
            return False
        number = int if self.kind == "int" else int | float
        if isinstance(value, bool) or not isinstance(value, number) or not math.isfinite(value):
            return False
        if self.low is not None and (value <= self.low if self.above else value < self.low):
            return False
        return self.high is None or value <= self.high

    def expected(self) -> str:
        kind = {"int": "an integer", "number": "a number", "bool": "true or false"}
        if self.kind == "words":
            return " or ".join(repr(word) for word in self.also)
        text = kind[self.kind]
        if self.low is not None and self.high is not None:
            text += f" in {'(' if self.above else '['}{self.low:g}, {self.high:g}]"
        elif self.low is not None:
            text += f" {'>' if self.above else '>='} {self.low:g}"
        text += "".join(f" or {word!r}" for word in self.also)
        return text + (" or null" if self.nullable else "")


# Every key a user may set that the code reads as a plain value (targets' own arguments are
# checked by their constructors); a key missing from a config is not checked.
SCHEMA: dict[str, Rule] = {
    "seed": Rule("int", "the run's seed"),
    "backbone_lr_mult": Rule("number", "the backbone's learning rate relative to the head's", 0),
    "bn_momentum": Rule(
        "number",
        "every BatchNorm's running-statistics momentum (null: each family's own)",
        0,
        1,
        above=True,
        nullable=True,
    ),
    "linear_probe": Rule("bool", "whether the backbone is frozen"),
    "channels_last": Rule("bool", "whether activations are NHWC"),
    "compile": Rule("bool", "whether the model is torch.compile'd"),
    "test_after_fit": Rule("bool", "whether the best checkpoint is tested"),
    "export_backbone": Rule("bool", "whether the best backbone is exported"),
    "pictures": Rule("bool", "whether the pictures are drawn"),
    "data.batch_size": Rule("int", "the number of images per batch (per device)", 1),
    "data.num_workers": Rule(
        "int",
        "the number of DataLoader worker processes (0 loads in the main process)",
        0,
        also=("auto",),
    ),
    "data.num_train": Rule("int", "the number of training images", 1),
    "data.num_val": Rule("int", "the number of validation images", 1),
    "data.num_test": Rule("int", "the number of test images", 1),
    "data.image_size": Rule("int", "the side of the images in pixels", 16),
    "optim.lr": Rule("number", "the learning rate", 0),
    "optim.weight_decay": Rule("number", "the weight decay", 0),
    "optim.momentum": Rule("number", "the momentum", 0, 1),
    "scheduler.name": Rule("words", "the learning-rate schedule", also=("cosine", "none")),
    "scheduler.warmup_epochs": Rule("number", "the warm-up length in epochs", 0),
    "scheduler.final_ratio": Rule("number", "the last learning rate over the first", 0, 1),
    "trainer.max_epochs": Rule("int", "the number of epochs (-1: no limit)", -1),
    "trainer.accumulate_grad_batches": Rule("int", "batches per optimiser step", 1),
    "trainer.gradient_clip_val": Rule(
        "number",
        "the gradient norm clipped to (null: no clipping)",
        0,
        above=True,
        nullable=True,
    ),
    "trainer.log_every_n_steps": Rule("int", "the optimiser steps between logged values", 1),
    "trainer.num_sanity_val_steps": Rule("int", "the validation batches before fit", -1),
    "trainer.overfit_batches": Rule(
        "words",
        "Lightning's overfitting option, which the seeded sampler of this project does "
        "not take (use debug=overfit)",
        also=(0,),
    ),
    "trainer.num_nodes": Rule("int", "the number of nodes", 1),
    "callbacks.checkpoint.save_top_k": Rule(
        "int",
        "how many best checkpoints are kept (best.ckpt always; -1: every epoch's)",
        1,
        also=(-1,),
    ),
}


def check_config(cfg: DictConfig) -> None:
    """The values of a train.py config that no run can use; before anything is built.

    Interpolations are resolved first (an unset `${oc.env:...}` is named); a value read from
    the environment as text where a number belongs is typed (`data.batch_size=${oc.env:N}`)."""
    try:  # Hydra's own node, where composed with it, is Hydra's to resolve
        for key, value in cfg.items():  # (a top-level value resolves as it is read)
            if key != "hydra" and OmegaConf.is_config(value):
                OmegaConf.to_container(value, resolve=True)
    except OmegaConfBaseException as error:
        key = getattr(error, "full_key", None) or "the config"
        raise ConfigError(f"{key}: {_first_line(error)}") from None
    for key, rule in SCHEMA.items():
        if OmegaConf.select(cfg, key, default=_ABSENT, throw_on_missing=False) is _ABSENT:
            continue
        value = _typed(cfg, key, rule)
        if rule.accepts(value):
            continue
        raise ConfigError(f"{key}={value} cannot work: it is {rule.meaning}, {rule.expected()}")
    check_run_name(_select(cfg, "run_name"))
    requeue = _select(cfg, "requeue_signal")
    if requeue is not None and f"SIG{requeue}" not in signal.Signals.__members__:
        raise ConfigError(f"requeue_signal={requeue} is not a signal name; use USR1 or USR2")
    check_trackers(cfg)
    pretrained = _select(cfg, "backbone.pretrained")
    if isinstance(pretrained, str) and pretrained.endswith(".ckpt"):
        run = Path(pretrained).parent.parent
        raise ConfigError(
            f"backbone.pretrained={pretrained} is a training checkpoint (the whole model, "
            f"optimiser and all); a run exports its backbone as {run / CHECKPOINTS / BACKBONE}: "
            "pass that file (or ckpt_path= to resume the run)"
        )


_ABSENT = object()


def _typed(cfg: DictConfig, key: str, rule: Rule) -> Any:
    """The value at `key`; text where a number or a switch belongs (what `${oc.env:...}` gives)
    is read as one, and put back typed so that config.yaml records the number."""
    value = _select(cfg, key)
    if not isinstance(value, str) or rule.kind == "words" or value in rule.also:
        return value
    try:
        typed = yaml.safe_load(value)
    except yaml.YAMLError:
        return value
    if rule.kind == "bool" and value.lower() not in ("true", "false"):  # not YAML 1.1's yes/on
        return value
    if rule.kind in ("int", "number") and (
        isinstance(typed, bool) or not isinstance(typed, int | float)
    ):
        return value
    with open_dict(cfg):
        OmegaConf.update(cfg, key, typed, merge=False)
    return typed


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


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


def check_finite_weights(state_dict: dict[str, Any], path: Any) -> None:
    """Refuse a checkpoint whose weights hold NaN or inf: its scores would mean nothing."""
    bad = [
        key
        for key, value in state_dict.items()
        if value.is_floating_point() and not bool(value.isfinite().all())
    ]
    if bad:
        more = f" and {len(bad) - 1} more" if len(bad) > 1 else ""
        raise CheckpointError(
            f"{path}: its weights are not finite ({bad[0]}{more}): a diverged model, nothing "
            "to score. Evaluate an earlier checkpoint of the run"
        )


def writable_dir(directory: Path, key: str) -> None:
    """Create `directory` (the place results go, named by config `key`) or say why not."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ConfigError(
            f"{key}={directory} cannot be written ({error.strerror}); choose a folder you can write"
        ) from None

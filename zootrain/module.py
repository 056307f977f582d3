"""One LightningModule for every task; the task strategy supplies the loss and the metrics."""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import lightning as L
import torch
from torch import nn
from torch.nn.utils import get_total_norm

from .data.transforms import DeviceNormalize, EncodedImages
from .errors import ConfigError, DivergedError, NonFiniteLossError
from .tasks import get_task

# Lightning warns whenever a module that overrides a batch hook is fitted with a data module (in
# case the data module meant to own the hook): ours is the module's by design (see
# `TaskModule.on_after_batch_transfer`), so the warning would greet every run.
warnings.filterwarnings(
    "ignore", message="You have overridden `on_after_batch_transfer` in `LightningModule`"
)


@contextlib.contextmanager
def bincount_on_cpu(device: torch.device) -> Iterator[None]:
    """Let torchmetrics count with `torch.bincount` on CPU in a deterministic run.

    With deterministic algorithms on, torchmetrics' confusion matrices (IoU, F1) count by
    comparing every element with every bin, an N x K tensor (a 32-image 64 px segmentation
    batch with 7 classes: 6.4M comparisons, 51 MB of indices), because CUDA's `bincount` is not
    deterministic. On CPU `bincount` is: the same counts, several times faster. The flag (and
    its warn-only setting) is put back afterwards; CUDA tensors keep torchmetrics' choice.
    """
    if device.type != "cpu" or not torch.are_deterministic_algorithms_enabled():
        yield
        return
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(False)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(True, warn_only=warn_only)


@dataclass
class WarmupCosine:
    """LR factor: linear warm-up from 0, then cosine decay to `final_ratio`.

    A callable object (not a lambda), so the scheduler's state dict holds plain numbers and
    checkpoints stay loadable with `weights_only=True`.
    """

    warmup_steps: int
    total_steps: int
    final_ratio: float = 0.0

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        progress = (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps)
        cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        return self.final_ratio + (1 - self.final_ratio) * cosine


# A training loss this many times its first step's (or 1, whichever is larger) has diverged:
# a cross-entropy starts near ln(classes), a detector's sum near 1-5; a run whose loss grew a
# thousandfold learns nothing more (optim.lr=1e3 reaches 1e8 within ten steps).
DIVERGENCE_FACTOR = 1000.0


class NonFiniteGuard:
    """Notices a NaN/inf or diverging training loss on the device, without a host sync per step.

    `update` records, on the loss's device, the first step's loss and the step and value of the
    first non-finite loss; `check` reads that record together with the last loss and the norm
    of every weight (parameters and floating buffers, e.g. BatchNorm statistics) in one host
    sync and raises `NonFiniteLossError` naming the step, or the weights that are no longer
    finite, or `DivergedError` when the last loss is `DIVERGENCE_FACTOR` times the first.
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.first_step: torch.Tensor | None = None  # -1 until a loss is not finite
        self.first_value: torch.Tensor | None = None
        self.start: torch.Tensor | None = None  # the first step's loss
        self.batches: dict[int, tuple[int, int]] = {}  # step -> (epoch, batch) since the check
        self.checked_step = -1

    def update(self, loss: torch.Tensor, step: int, epoch: int, batch_idx: int) -> None:
        loss = loss.detach()
        if self.first_step is None or self.first_step.device != loss.device:
            self.first_step = torch.full((), -1, dtype=torch.int64, device=loss.device)
            self.first_value = torch.zeros((), device=loss.device)
        if self.start is None:
            self.start = loss.float().clone()
        new = ~torch.isfinite(loss) & (self.first_step < 0)
        self.first_step = torch.where(new, step, self.first_step)
        self.first_value = torch.where(new, loss.float(), self.first_value)
        self.batches.setdefault(step, (epoch, batch_idx))

    def check(self, module: L.LightningModule, extra: torch.Tensor | None = None) -> float:
        """One host sync; raises if something is not finite, else returns `extra` as a float."""
        weights = [t.detach() for t in (*module.parameters(), *module.buffers())]
        weights = [t for t in weights if t.is_floating_point()]
        device = weights[0].device if weights else torch.device("cpu")
        dtype = torch.float32 if device.type == "mps" else torch.float64  # exact step numbers
        # The largest magnitude: NaN if any weight is NaN, inf if any is infinite.
        state = get_total_norm(weights, float("inf")) if weights else torch.zeros((), device=device)
        if self.first_step is None:  # no training step yet
            self.first_step = torch.full((), -1, dtype=torch.int64, device=device)
            self.first_value = torch.zeros((), device=device)
        first_step, first_value = self.first_step, self.first_value
        if extra is None:
            extra = torch.full((), torch.nan, device=device)
        start = torch.full((), torch.nan, device=device) if self.start is None else self.start
        bound = DIVERGENCE_FACTOR * torch.clamp(start.to(device, dtype), min=1.0)
        diverged = extra.to(device, dtype) > bound  # False while either is NaN
        flags = torch.stack([(first_step >= 0), ~torch.isfinite(state), diverged])
        flags = flags.to(device, dtype)
        trainer = module._trainer
        if trainer is not None and trainer.world_size > 1:  # every rank raises, or none
            # (not the strategy's `reduce`: it adds a barrier, which blocks the host)
            torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
        record = [first_step, first_value, extra, start]
        values = torch.cat([flags, torch.stack([v.to(device, dtype) for v in record])])
        bad_loss, bad_weights, grew, step, value, extra_value, start_value = values.tolist()
        step, global_step = int(step), module.global_step
        if bad_loss:
            where = (
                f" at step {step} (epoch {self.batches[step][0]}, batch {self.batches[step][1]})"
                if step in self.batches
                else " in another process"
            )
            raise NonFiniteLossError(
                f"the training loss became {value}{where}; lower optim.lr, set "
                "trainer.gradient_clip_val, or use precision=32-true"
            )
        if bad_weights:
            named = [*module.named_parameters(), *module.named_buffers()]
            names = [n for n, t in named if t.is_floating_point() and not t.isfinite().all()]
            shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
            since = f" (finite at step {self.checked_step})" if self.checked_step >= 0 else ""
            raise NonFiniteLossError(
                f"the weights are no longer finite at step {global_step}{since}: "
                f"{shown or 'in another process'}; lower optim.lr, set "
                "trainer.gradient_clip_val, or use precision=32-true"
            )
        if grew:
            raise DivergedError(
                f"the training loss diverged: {extra_value:.4g} at step {global_step}, more than "
                f"{DIVERGENCE_FACTOR:g} times the first step's {start_value:.4g} (or 1); lower "
                "optim.lr, set trainer.gradient_clip_val, or add a warm-up "
                "(scheduler.warmup_epochs)"
            )
        self.checked_step = global_step
        self.batches.clear()
        return extra_value


class TaskModule(L.LightningModule):
    """Trains `model` (backbone + head) for a task: loss, metrics, optimiser and schedule.

    Args:
        model: an `nn.Module` with a `.backbone` attribute, images in, task outputs out.
        task: "classification", "segmentation" or "detection" (the head config's task).
        num_classes: from the data module.
        optimizer: a partial optimiser (`params` missing), e.g. `partial(AdamW, lr=1e-3)`.
        scheduler: `{"name": "cosine", "warmup_epochs": 1, "final_ratio": 0.01}` or
            `{"name": "none"}`; stepped every optimiser step.
        backbone_lr_mult: the backbone's learning rate relative to the head's.
        channels_last: run the model and its inputs in channels_last memory format.
        compile: `torch.compile` the model (in place, so state dict keys do not change).
        config: the plain-container run config, stored in checkpoints for `eval.py`.
        mean, std: the data module's per-channel statistics, which its uint8 batches are
            normalised with once on the device (`on_after_batch_transfer`); None: scaled to
            [0, 1] only.
    """

    def __init__(
        self,
        model: nn.Module,
        task: str,
        num_classes: int,
        optimizer: Callable[..., torch.optim.Optimizer],
        scheduler: dict[str, Any] | None = None,
        backbone_lr_mult: float = 1.0,
        channels_last: bool = False,
        compile: bool = False,
        config: dict[str, Any] | None = None,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        # Plain containers only: OmegaConf objects would break weights_only loading.
        self.save_hyperparameters(
            {"task": task, "num_classes": num_classes, "config": config or {}}
        )
        self.model = model
        self.task = get_task(task)
        self.num_classes = num_classes
        self.optimizer_factory = optimizer
        self.scheduler_cfg = dict(scheduler or {"name": "none"})
        self.backbone_lr_mult = backbone_lr_mult
        self.channels_last = channels_last
        self.compile_model = compile
        self.normalize = DeviceNormalize(mean, std)
        self._guard = NonFiniteGuard()
        self._resumed_total: int | None = None  # the schedule's length in a resumed checkpoint
        self._last_loss: torch.Tensor | None = None
        # Read by the progress bar: the step values read from the device at the last check.
        self.step_values: dict[str, float] = {}
        metrics = self.task.metrics(num_classes)
        self.val_metrics = metrics.clone(prefix="val/")
        self.test_metrics = metrics.clone(prefix="test/")
        if channels_last:
            self.model.to(memory_format=torch.channels_last)

    def configure_model(self) -> None:
        if self.compile_model and not getattr(self, "_compiled", False):
            self.model.compile()
            self._compiled = True

    def forward(self, x: Any, target: Any = None) -> Any:
        # Detection batches are lists of (3, H, W) images, which the detector batches itself.
        if self.channels_last and isinstance(x, torch.Tensor):
            x = x.contiguous(memory_format=torch.channels_last)
        return self.model(x) if target is None else self.model(x, target)

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        # Images cross to the device as uint8 (a quarter of float32's bytes) and become the
        # model's float input here, a whole batch at once (timm's PrefetchLoader does the same);
        # anything but an (images, target) pair (the summary's example input) passes as it is.
        if not (isinstance(batch, tuple | list) and len(batch) == 2):
            return batch
        images, target = batch
        if isinstance(images, EncodedImages):  # data.decode=device: JPEGs decoded here
            images = images.decode()
        if self.channels_last and isinstance(images, torch.Tensor) and images.ndim == 4:
            images = images.contiguous(memory_format=torch.channels_last)  # cheaper in uint8
        return self.normalize(images), target

    def training_step(self, batch: tuple[Any, Any], batch_idx: int) -> torch.Tensor:
        x, target = batch
        losses = self.task.training_losses(self, x, target)
        loss = sum(losses.values())
        self._guard.update(loss, self.global_step, self.current_epoch, batch_idx)
        # Epoch means only: a value logged on step is read back by the host every step (the
        # progress bar) or every log_every_n_steps; `on_train_batch_end` logs the step loss
        # with the one read that the non-finite check makes anyway. len(x): a detection batch
        # is a list, from which Lightning would infer a wrong size.
        self.log("train/loss_epoch", loss, on_step=False, on_epoch=True, batch_size=len(x))
        if len(losses) > 1:  # the detectors' parts: classification, box regression, ...
            for name, value in losses.items():
                self.log(f"train/{name}", value, on_step=False, on_epoch=True, batch_size=len(x))
        self._last_loss = loss.detach()
        return loss

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Called before `configure_optimizers` on resume; Lightning then loads the schedule's
        # stored length over the one just computed, so it is compared there.
        for scheduler in checkpoint.get("lr_schedulers", []):
            for factor in scheduler.get("lr_lambdas", []):
                if isinstance(factor, dict) and "total_steps" in factor:
                    self._resumed_total = int(factor["total_steps"])

    def on_train_start(self) -> None:
        self._guard.reset()

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        # After the optimiser step. Every log_every_n_steps optimiser steps: one read of the
        # device for the check and the step loss (`global_step` counts optimiser steps, so with
        # gradient accumulation the same step is seen several times and checked once).
        every, step = self.trainer.log_every_n_steps, self.global_step
        if not every or not step or step % every or self._guard.checked_step == step:
            return
        loss = self.check_finite(extra=self._last_loss)
        self.step_values = {"train/loss": loss}
        # The step axis and `epoch` column of Lightning's own logging of step values.
        metrics = {"train/loss_step": loss, "epoch": self.current_epoch}
        for logger in self.loggers:  # as Lightning's logger connector does
            logger.log_metrics(metrics, step=self.global_step - 1)
            logger.save()

    def on_validation_epoch_start(self) -> None:
        # Weights that became non-finite since the last check are neither validated nor saved.
        if self.trainer.state.fn == "fit" and not self.trainer.sanity_checking:
            self._check_unless_checked()

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Every checkpoint (best, last, a SLURM requeue's) holds finite weights, so the one
        # on disk is always the last good one.
        self._check_unless_checked()

    def _check_unless_checked(self) -> None:
        if self._guard.checked_step != self.global_step:  # no optimiser step since the check
            self.check_finite()

    def check_finite(self, extra: torch.Tensor | None = None) -> float:
        """Raise `NonFiniteLossError` if a training loss since the last check, or a parameter or
        floating buffer now, is NaN or infinite; one host sync (all ranks agree under DDP).

        Returns `extra` (e.g. the last loss) as a float, read in the same sync (NaN if None).
        """
        return self._guard.check(self, extra)

    def _evaluate(self, batch: tuple[Any, Any], stage: str) -> None:
        x, target = batch
        output, loss = self.task.evaluate(self, x, target)
        metrics = self.val_metrics if stage == "val" else self.test_metrics
        with bincount_on_cpu(x.device if isinstance(x, torch.Tensor) else self.device):
            metrics.update(output, target)
        if loss is not None:
            self.log(f"{stage}/loss", loss, batch_size=len(x), sync_dist=True)  # DDP: all ranks
        if self.task.logged is None:
            for name, metric in metrics.items():  # names carry the stage prefix
                self.log(name, metric, prog_bar=name == self.task.monitor, batch_size=len(x))

    def _log_epoch_metrics(self, stage: str) -> None:
        """Metrics that return several values (mean average precision): log the chosen ones."""
        if self.task.logged is None:
            return
        metrics = self.val_metrics if stage == "val" else self.test_metrics
        values = metrics.compute()  # over every process's detections (torchmetrics syncs)
        metrics.reset()
        for name in self.task.logged:
            key = f"{stage}/{name}"
            # sync_dist averages values that are already equal on every rank; it keeps
            # Lightning from warning about unsynchronised epoch-level logs under DDP
            self.log(key, values[key], prog_bar=key == self.task.monitor, sync_dist=True)

    def validation_step(self, batch: tuple[Any, Any], batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def on_validation_epoch_end(self) -> None:
        self._log_epoch_metrics("val")

    def test_step(self, batch: tuple[Any, Any], batch_idx: int) -> None:
        self._evaluate(batch, "test")

    def on_test_epoch_end(self) -> None:
        self._log_epoch_metrics("test")

    def parameter_groups(self) -> list[dict[str, Any]]:
        """Backbone / head x decay / no decay (norms and biases get no weight decay)."""
        backbone = getattr(self.model, "backbone", None)
        backbone_ids = {id(p) for p in backbone.parameters()} if backbone is not None else set()
        groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
        for param in self.model.parameters():
            if param.requires_grad:
                key = (id(param) in backbone_ids, param.ndim > 1)
                groups.setdefault(key, []).append(param)
        decay = self.optimizer_factory.keywords.get("weight_decay", 0.0)
        return [
            {
                "params": params,
                "lr_mult": self.backbone_lr_mult if in_backbone else 1.0,
                "weight_decay": decay if decays else 0.0,
            }
            for (in_backbone, decays), params in sorted(groups.items())
            if not (in_backbone and self.backbone_lr_mult == 0)
        ]

    def configure_optimizers(self) -> dict[str, Any]:
        groups = self.parameter_groups()
        if not groups:
            raise ConfigError(
                "nothing to train: every parameter is frozen (linear_probe=true with a head "
                "of no parameters, or backbone.frozen_stages over a frozen head)"
            )
        optimizer = self.optimizer_factory(groups)
        for group in optimizer.param_groups:
            group["lr"] *= group["lr_mult"]
        name = self.scheduler_cfg.get("name", "none")
        if name == "none":
            return {"optimizer": optimizer}
        if name != "cosine":
            raise ConfigError(f"unknown scheduler {name!r}; use 'cosine' or 'none'")
        total = int(self.trainer.estimated_stepping_batches)
        if self._resumed_total is not None and self._resumed_total != total:
            raise ConfigError(
                f"this resume takes {total} optimiser steps in all, the checkpoint's schedule "
                f"{self._resumed_total}: the steps per epoch changed (data size, "
                "data.batch_size, trainer.accumulate_grad_batches or trainer.devices), which a "
                "schedule fixes when the run starts. Resume with the run's values (its "
                "config.yaml), or start a new run from its weights"
            )
        steps_per_epoch = max(1, total // max(1, self.trainer.max_epochs or 1))
        warmup = round(self.scheduler_cfg.get("warmup_epochs", 0) * steps_per_epoch)
        factor = WarmupCosine(warmup, total, self.scheduler_cfg.get("final_ratio", 0.0))
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }

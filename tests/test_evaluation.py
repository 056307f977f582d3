"""Validation and testing: the model in eval mode, and metrics equal to a hand loop's."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from torch import nn

from zootrain.build import build_datamodule, build_module
from zootrain.report import quiet_lightning

from .test_training import TINY, config, hand_scores

HEADS = {"classification": "val/acc", "fpn": "val/pixel_acc"}


def trainer(**kwargs: object) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
        **kwargs,
    )


class EvalModeProbe(L.Callback):
    """Records, per validation epoch, whether any module ran in train mode and whether any
    buffer or parameter moved (BatchNorm statistics do in train mode)."""

    def __init__(self) -> None:
        self.modules_in_train_mode: set[str] = set()
        self.moved: list[str] = []

    def on_validation_epoch_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self._before = {k: v.clone() for k, v in module.state_dict().items()}

    def on_validation_batch_end(self, trainer: L.Trainer, module: L.LightningModule, *_) -> None:
        self.modules_in_train_mode |= {name for name, m in module.named_modules() if m.training}

    def on_validation_epoch_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        after = module.state_dict()
        self.moved += [k for k, v in self._before.items() if not torch.equal(v, after[k])]


def with_dropout(module: L.LightningModule) -> None:
    """Put a dropout layer in front of the model, so that train-mode evaluation is random."""
    module.model = nn.Sequential(nn.Dropout(0.2), module.model)


@pytest.mark.parametrize("head", list(HEADS))
def test_validation_runs_the_model_in_eval_mode(head: str, tmp_path: Path) -> None:
    """Inside fit and in `validate`: no module in train mode, no BatchNorm statistic moved,
    and loss and accuracy equal those of a hand loop over the eval-mode model."""
    quiet_lightning()
    cfg = config(tmp_path, *TINY, f"head={head}", "data.num_train=32", "data.num_val=48")
    L.seed_everything(cfg.seed, verbose=False)
    datamodule = build_datamodule(cfg)
    module = build_module(cfg, datamodule)
    with_dropout(module)
    probe = EvalModeProbe()
    trainer(max_epochs=1, callbacks=[probe]).fit(module, datamodule=datamodule)
    assert not probe.modules_in_train_mode
    assert not probe.moved, f"validation changed {probe.moved[:3]}"

    probe = EvalModeProbe()
    scores = trainer(callbacks=[probe]).validate(module, datamodule=datamodule, verbose=False)[0]
    assert not probe.modules_in_train_mode and not probe.moved
    loss, accuracy = hand_scores(module, datamodule)
    assert scores["val/loss"] == pytest.approx(loss, rel=1e-5)
    assert scores[HEADS[head]] == pytest.approx(accuracy, abs=1e-6)

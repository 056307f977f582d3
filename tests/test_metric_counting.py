"""Validation metrics count with `torch.bincount` on CPU, also in a deterministic run."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.test_training import TINY, config
from zootrain.build import build_datamodule, build_module
from zootrain.module import bincount_on_cpu


@pytest.fixture
def deterministic(request: pytest.FixtureRequest):
    """Deterministic algorithms on (warn-only as given), as a CPU run of train.py has them."""
    before = torch.are_deterministic_algorithms_enabled()
    before_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=request.param)
    yield request.param
    torch.use_deterministic_algorithms(before, warn_only=before_warn)


@pytest.mark.parametrize("deterministic", [True, False], indirect=True, ids=["warn", "strict"])
def test_the_flags_are_put_back(deterministic: bool) -> None:
    with bincount_on_cpu(torch.device("cpu")):
        assert not torch.are_deterministic_algorithms_enabled()
    assert torch.are_deterministic_algorithms_enabled()
    assert torch.is_deterministic_algorithms_warn_only_enabled() == deterministic
    with pytest.raises(RuntimeError, match="inside"), bincount_on_cpu(torch.device("cpu")):
        raise RuntimeError("inside")
    assert torch.are_deterministic_algorithms_enabled()
    # Not on CPU: torchmetrics keeps its own choice (CUDA's bincount is not deterministic).
    with bincount_on_cpu(torch.device("meta")):
        assert torch.are_deterministic_algorithms_enabled()


@pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")  # no Trainer here
@pytest.mark.parametrize("deterministic", [True], indirect=True, ids=["warn"])
def test_segmentation_validation_counts_with_bincount(
    deterministic: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The validation step's IoU uses `torch.bincount` (not torchmetrics' N x K comparison,
    several times slower), with the same values as the comparison gives."""
    cfg = config(tmp_path, *TINY, "head=fpn", "backbone=resnet18", "data.batch_size=4")
    datamodule = build_datamodule(cfg)
    datamodule.setup("fit")
    module = build_module(cfg, datamodule).eval()
    batch = module.on_after_batch_transfer(next(iter(datamodule.val_dataloader())), 0)
    calls = []
    bincount = torch.bincount
    monkeypatch.setattr(torch, "bincount", lambda *a, **k: calls.append(1) or bincount(*a, **k))
    with torch.no_grad():
        module.validation_step(batch, 0)
    assert calls  # the IoU's confusion matrix
    assert torch.are_deterministic_algorithms_enabled()
    counted = {k: float(v) for k, v in module.val_metrics.compute().items()}

    # The reference: torchmetrics' own path under deterministic algorithms.
    reference = module.val_metrics.clone()
    reference.reset()
    with torch.no_grad():
        output, _ = module.task.evaluate(module, *batch)
    calls.clear()
    reference.update(output, batch[1])
    assert not calls
    assert counted == {k: float(v) for k, v in reference.compute().items()}
    assert 0 < counted["val/miou"] < 1

"""A checkpoint holding pickled code is refused, and the code never runs, on every way in:
`load_checkpoint`, `eval.py`, `train.py` resuming, and Lightning's own reads in fit and test.

The payload (`Payload`) creates the file `marker` if anything unpickles it.
"""

from __future__ import annotations

import pickle
import re
from collections.abc import Callable
from pathlib import Path

import lightning as L
import pytest
import torch
from omegaconf import DictConfig

import zootrain.run
import zootrain.runs
from zootrain.checkpoints import load_checkpoint
from zootrain.errors import CheckpointError
from zootrain.evaluate import evaluate
from zootrain.run import train

from .test_files import Payload
from .test_training import TINY, config

SMALL = [
    *TINY,
    "backbone=mobilenetv3_small",  # a small checkpoint
    "data.num_train=32",
    "data.num_val=32",
    "data.num_test=32",
    "trainer.max_epochs=1",
]
REFUSED = r"holds objects that only load by running pickled code \(weights_only=True refuses them\)"
LIGHTNING_REFUSED = "Weights only load failed"


def assert_refused(call: Callable[[], object], kind: type[Exception], pattern: str) -> None:
    """`call()` raises `kind` matching `pattern`. Anything else fails with a one-line report:
    pytest's report of an error raised deep in `torch.load` would print its storages."""
    try:
        call()
    except Exception as error:
        raised: Exception | None = error
    else:
        raised = None
    # Asserted outside the handler: no chained report of the original traceback.
    assert raised is not None, f"not refused: expected {kind.__name__} matching {pattern!r}"
    message = f"{type(raised).__name__}: {str(raised)[:300]}"
    raised.__traceback__ = None
    assert isinstance(raised, kind) and re.search(pattern, str(raised)), message


@pytest.fixture(scope="module")
def clean(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The last.ckpt of one tiny epoch of train.py."""
    tmp_path = tmp_path_factory.mktemp("clean")
    result = train(config(tmp_path, *SMALL))
    return Path(result.output_dir) / "checkpoints" / "last.ckpt"


def poisoned(clean: Path, directory: Path) -> tuple[Path, Path]:
    """`clean` with one extra entry that runs code when unpickled; the file and its marker."""
    marker, path = directory / "pwned", directory / "poisoned.ckpt"
    checkpoint = torch.load(clean, map_location="cpu", weights_only=True)
    checkpoint["hook"] = Payload(marker)
    torch.save(checkpoint, path)
    return path, marker


def test_the_loader_refuses_pickled_code(clean: Path, tmp_path: Path) -> None:
    path, marker = poisoned(clean, tmp_path)
    assert_refused(lambda: load_checkpoint(path), CheckpointError, REFUSED)
    assert not marker.exists()


def test_eval_refuses_pickled_code(clean: Path, tmp_path: Path) -> None:
    path, marker = poisoned(clean, tmp_path)
    cfg = config(tmp_path, f"ckpt_path={path}", "trainer.accelerator=cpu", name="eval")
    assert_refused(lambda: evaluate(cfg), CheckpointError, REFUSED)
    assert not marker.exists()


def test_resume_refuses_pickled_code(clean: Path, tmp_path: Path) -> None:
    path, marker = poisoned(clean, tmp_path)
    cfg = config(tmp_path, *SMALL, "trainer.max_epochs=2", f"ckpt_path={path}")
    assert_refused(lambda: train(cfg), CheckpointError, REFUSED)
    assert not marker.exists()


def test_lightning_resume_reads_weights_only(
    clean: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With train.py's own check of the file out of the way, `trainer.fit` still refuses it:
    the second line of defence is not `weights_only=False`."""
    path, marker = poisoned(clean, tmp_path)
    checked = load_checkpoint(clean)
    monkeypatch.setattr(zootrain.run, "load_checkpoint", lambda *_, **__: checked)
    # and its refusal of a longer schedule on resume (the clean run was 1 epoch of a cosine)
    monkeypatch.setattr(zootrain.runs, "check_unchanged", lambda *_, **__: None)
    cfg = config(tmp_path, *SMALL, "trainer.max_epochs=2", f"ckpt_path={path}")
    assert_refused(lambda: train(cfg), pickle.UnpicklingError, LIGHTNING_REFUSED)
    assert not marker.exists()


class TamperBest(L.Callback):
    """After fit, replaces the best checkpoint by one holding pickled code."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.marker: Path | None = None

    def on_fit_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        best = Path(trainer.checkpoint_callback.best_model_path)
        path, self.marker = poisoned(best, self.directory)
        path.replace(best)


def test_testing_the_best_checkpoint_reads_weights_only(tmp_path: Path) -> None:
    cfg: DictConfig = config(tmp_path, *SMALL, "test_after_fit=true")
    tamper = TamperBest(tmp_path)
    run = lambda: train(cfg, extra_callbacks=[tamper])  # noqa: E731
    assert_refused(run, pickle.UnpicklingError, LIGHTNING_REFUSED)
    assert tamper.marker is not None and not tamper.marker.exists()

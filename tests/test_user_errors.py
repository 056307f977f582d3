"""The user mistakes of issue 18: each is one line (`error: ...`) and exit status 1, no traceback.

Run in-process as `main` runs them: the config composed by Hydra, `train()` / `evaluate()`
inside `user_errors()`. (tests/test_cli.py checks the same on the command line.)
"""

from __future__ import annotations

import errno
import socket
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import DictConfig
from PIL import Image

from zootrain.build import build_datamodule, build_module
from zootrain.evaluate import evaluate
from zootrain.report import user_errors
from zootrain.run import train

from .test_training import TINY, config

FAST = [*TINY, "trainer.max_epochs=1", "export_backbone=false"]


def error_of(run: Callable[[DictConfig], object], cfg: DictConfig, capsys) -> str:
    """The one line `run(cfg)` prints under `user_errors`, which exits with status 1."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exited, user_errors():
        run(cfg)
    assert exited.value.code == 1
    printed = capsys.readouterr().err
    assert "Traceback" not in printed
    errors = [line for line in printed.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, printed
    assert printed.rstrip("\n").endswith(errors[0]), printed  # the message is one line
    return errors[0].removeprefix("error: ")


@pytest.mark.parametrize(
    "override, message",
    [
        ("data.batch_size=0", "data.batch_size=0 cannot work: it is the number of images per batch"),
        ("data.batch_size=-4", "data.batch_size=-4 cannot work: it is the number of images per"),
        ("data.num_train=0", "data.num_train=0 cannot work: it is the number of training images, an integer >= 1"),
        ("optim.lr=-1", "optim.lr=-1 cannot work: it is the learning rate, a number >= 0"),
        ("optim.lr=nan", "optim.lr=nan cannot work: it is the learning rate, a number >= 0"),
        ("backbone_lr_mult=-1", "backbone_lr_mult=-1 cannot work: it is the backbone's learning rate"),
        ("data.num_workers=-1", "data.num_workers=-1 cannot work: it is the number of DataLoader"),
        ("data.num_workers=many", "data.num_workers=many cannot work: it is the number of DataLoader worker processes (0 loads in the main process), an integer >= 0 or 'auto'"),
        ("data.classes=[circle]", "the classification data has 1 class (circle): there is nothing to tell apart"),
        ("data.batch_size=1", "data.batch_size=1 cannot train the model's 20 BatchNorm layers (e.g. model.backbone.stem.norm)"),
    ],
)  # fmt: skip
def test_config_mistakes(override: str, message: str, tmp_path: Path, capsys) -> None:
    cfg = config(tmp_path, *FAST, override)
    assert error_of(train, cfg, capsys).startswith(message)


def test_the_default_config_passes_the_checks(tmp_path: Path) -> None:
    """Every default value is one that can work (`data.num_workers: auto` included)."""
    from zootrain.checks import check_config

    cfg = config(tmp_path)
    assert cfg.data.num_workers == "auto"
    check_config(cfg)


def test_batch_size_1_with_frozen_batchnorm_trains(tmp_path: Path) -> None:
    """norm_eval keeps BatchNorm statistics fixed: a batch of one is fine then."""
    cfg = config(
        tmp_path, *FAST, "data.batch_size=1", "data.num_train=2", "data.num_val=2",
        "data.num_test=2", "backbone.norm_eval=true", "trainer.fast_dev_run=true",
    )  # fmt: skip
    assert train(cfg).metrics


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("notes.txt", "lr 0.1 worked best", "notes.txt: unknown weights format '.txt'"),
        (
            "notes.pth",
            "lr 0.1 worked best",
            "notes.pth is not a readable PyTorch checkpoint (not a torch.save archive)",
        ),
    ],
)
def test_a_text_file_as_pretrained(
    name: str, content: str, message: str, tmp_path: Path, capsys
) -> None:
    (tmp_path / name).write_text(content)
    cfg = config(tmp_path, *FAST, f"backbone.pretrained={tmp_path / name}")
    assert error_of(train, cfg, capsys).startswith(f"{tmp_path}/{message}")


def checkpoint_of(tmp_path: Path, *overrides: str) -> Path:
    """A checkpoint (as train.py writes them) of the model that `overrides` configure."""
    cfg = config(tmp_path, *FAST, *overrides)
    module = build_module(cfg, build_datamodule(cfg))
    path = tmp_path / "other.ckpt"
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}, path)
    return path


@pytest.mark.parametrize(
    "overrides, stored, fit",
    [
        (["backbone=resnet34"], "resnet34 + classification, 6 classes", "96 unexpected"),
        (["data.classes=[circle,ring,star]"], "resnet18 + classification, 3 classes", "2 of another shape (e.g. model.head.fc.weight)"),
        (["head=fpn"], "resnet18 + fpn, 7 classes", "missing"),
    ],
)  # fmt: skip
def test_resuming_another_model(
    overrides: list[str], stored: str, fit: str, tmp_path: Path, capsys
) -> None:
    path = checkpoint_of(tmp_path, *overrides)
    cfg = config(tmp_path, *FAST, f"ckpt_path={path}")
    message = error_of(train, cfg, capsys)
    assert message.startswith(
        f"ckpt_path={path} is a checkpoint of {stored}; this run builds resnet18 + "
        "classification, 6 classes, which its weights do not fit ("
    )
    assert fit in message and "Resume with the config it was trained with" in message


def test_eval_without_ckpt_path(tmp_path: Path, capsys) -> None:
    cfg = config(tmp_path, name="eval")
    assert error_of(evaluate, cfg, capsys) == (
        "eval.py needs a checkpoint: ckpt_path=<run dir> (scores its checkpoints/best.ckpt) or "
        "ckpt_path=<file>.ckpt"
    )


def test_eval_takes_a_run_directory(tmp_path: Path) -> None:
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    checkpoint_of(tmp_path).rename(run / "checkpoints" / "best.ckpt")
    cfg = config(tmp_path, f"ckpt_path={run}", "trainer.accelerator=cpu", name="eval")
    result = evaluate(cfg)
    assert result.best_model_path == str(run / "checkpoints" / "best.ckpt")
    assert {"val/acc", "val/loss"} <= set(result.metrics)


def test_a_truncated_jpeg_in_the_first_batch_is_named(tmp_path: Path, capsys) -> None:
    root = tmp_path / "photos"
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for label in ("cat", "dog"):
            for i in range(2):
                path = root / split / label / f"{i}.jpg"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(rng.integers(0, 256, (40, 40, 3), np.uint8)).save(path)
    bad = root / "train" / "cat" / "0.jpg"
    data = bad.read_bytes()
    bad.write_bytes(data[: len(data) // 2])  # the header reads; decoding fails
    cfg = config(
        tmp_path, *FAST[5:], "data=imagefolder", f"data.root={root}", "data.image_size=32",
        "data.batch_size=4", "data.num_workers=0",
    )  # fmt: skip
    assert error_of(train, cfg, capsys).startswith(
        f"cannot decode the image {bad} (OSError: image file is truncated"
    )


def test_offline_download(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    def offline(*args, **kwargs):
        raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")

    monkeypatch.setattr(socket, "getaddrinfo", offline)
    cfg = config(
        tmp_path, *FAST[5:], "data=cifar10", f"data.root={tmp_path / 'cifar'}",
        "data.download=true",
    )  # fmt: skip
    assert error_of(train, cfg, capsys).startswith(
        f"CIFAR-10: data.download=true could not download it into {tmp_path / 'cifar'} (URLError:"
    )


def test_disk_full_while_saving(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    from zootrain import checkpoints

    def full(obj: object, file: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoints.torch, "save", full)
    cfg = config(tmp_path, *FAST)
    message = error_of(train, cfg, capsys)
    best = Path(cfg.paths.output_dir) / "checkpoints" / "best.ckpt"
    assert message.startswith(f"No space left on device while writing {best}: free space there")
    assert not list(best.parent.glob("*"))  # no temp file left behind

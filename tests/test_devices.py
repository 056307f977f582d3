"""Device-dependent defaults: trainer settings and DataLoader settings follow the device."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from hydra.errors import InstantiationException
from lightning.pytorch.accelerators import CPUAccelerator, CUDAAccelerator
from omegaconf import OmegaConf

from tests.test_training import TINY, config
from zootrain.build import build_datamodule
from zootrain.data import base
from zootrain.data.base import loader_workers
from zootrain.devices import device_defaults, resolve_device_defaults, trains_on_cuda
from zootrain.errors import ConfigError
from zootrain.run import train

CPU = {"precision": "32-true", "deterministic": "warn", "benchmark": None}
CUDA = {"precision": "bf16-mixed", "deterministic": False, "benchmark": True}


@pytest.fixture
def cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    """A machine with a bf16-capable CUDA GPU, as far as the defaults can tell."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)


def test_a_cpu_run_keeps_the_reproducible_defaults(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    assert resolve_device_defaults(cfg) == CPU
    assert {k: cfg.trainer[k] for k in CPU} == CPU


@pytest.mark.usefixtures("cuda")
def test_a_gpu_run_gets_bf16_and_cudnn_autotuning(tmp_path: Path) -> None:
    cfg = config(tmp_path)  # accelerator: auto
    assert trains_on_cuda(cfg.trainer) and resolve_device_defaults(cfg) == CUDA
    assert {k: cfg.trainer[k] for k in CUDA} == CUDA


@pytest.mark.usefixtures("cuda")
def test_explicit_settings_win_and_determinism_is_one_flag_away(tmp_path: Path) -> None:
    cfg = config(tmp_path, "trainer.deterministic=true")
    assert resolve_device_defaults(cfg) == {"precision": "bf16-mixed", "benchmark": True}
    assert cfg.trainer.deterministic is True
    cfg = config(tmp_path, "trainer.accelerator=cpu")  # a GPU machine, told to use the CPU
    assert resolve_device_defaults(cfg) == CPU


def test_gpus_without_bf16_get_16_bit_autocast(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    assert device_defaults(on_cuda=True)["precision"] == "16-mixed"


def test_trainer_gpu_fills_the_device(tmp_path: Path) -> None:
    cfg = config(tmp_path, "trainer=gpu")
    assert cfg.trainer.accelerator == "gpu" and cfg.data.batch_size == 256
    assert {k: cfg.trainer[k] for k in CUDA} == CUDA
    assert config(tmp_path, "trainer=gpu", "data.batch_size=64").data.batch_size == 64


def test_the_recorded_config_holds_the_resolved_values(tmp_path: Path) -> None:
    cfg = config(tmp_path, *TINY, "trainer.fast_dev_run=true")
    train(cfg)
    recorded = OmegaConf.load(Path(cfg.paths.output_dir) / "config.yaml").trainer
    assert {k: recorded[k] for k in CPU} == CPU


@pytest.mark.parametrize(
    "requested, on_cuda, cpus, devices, expected",
    [
        ("auto", False, 64, 1, 0),  # CPU training: the model's kernels use every core
        ("auto", True, 16, 1, 8),  # capped
        ("auto", True, 6, 1, 5),  # one core left for the main process
        ("auto", True, 16, 4, 3),  # the node's cores shared among its GPUs
        ("auto", True, 1, 1, 1),
        (3, True, 16, 1, 3),
        (0, False, 2, 1, 0),
    ],
)
def test_loader_workers(
    requested, on_cuda: bool, cpus: int, devices: int, expected: int, monkeypatch
) -> None:
    monkeypatch.setattr(base, "usable_cpus", lambda: cpus)
    assert loader_workers(requested, on_cuda, devices) == expected


@pytest.mark.parametrize("bad", [-1, "four", 2.5, True])
def test_bad_worker_counts_are_one_clear_error(bad, tmp_path: Path) -> None:
    with pytest.raises(
        ConfigError, match=rf"num_workers must be 'auto' or an integer >= 0, got {bad!r}"
    ):
        loader_workers(bad, on_cuda=False)
    with pytest.raises(InstantiationException, match="num_workers must be 'auto'"):
        build_datamodule(config(tmp_path, f"data.num_workers={bad}"))


@pytest.mark.filterwarnings("ignore:This DataLoader will create 7 worker processes")
def test_loaders_follow_the_trainer_device(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(base, "usable_cpus", lambda: 16)
    datamodule = build_datamodule(config(tmp_path, "data.num_train=64"))
    loader = datamodule.train_dataloader()  # no trainer: the CPU's settings
    assert (loader.num_workers, loader.pin_memory, loader.persistent_workers) == (0, False, False)
    datamodule.trainer = SimpleNamespace(
        accelerator=CPUAccelerator(), num_devices=1, world_size=1, global_rank=0
    )
    assert datamodule.train_dataloader().num_workers == 0
    datamodule.trainer = SimpleNamespace(
        accelerator=CUDAAccelerator(), num_devices=2, world_size=2, global_rank=0
    )
    loader = datamodule.train_dataloader()
    assert (loader.num_workers, loader.pin_memory, loader.persistent_workers) == (7, True, True)
    assert loader.dataset.dataset._cache.filled.is_shared()  # before the workers start

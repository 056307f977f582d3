"""Trainer settings that depend on the device, resolved once at start-up.

`configs/trainer/default.yaml` leaves `precision`, `deterministic` and `benchmark` null; a run
that will train on a CUDA GPU gets what a GPU user expects (bf16 autocast, cuDNN autotuning),
a CPU run keeps the reproducible settings whose numbers the README quotes. Any explicit value
wins: `trainer.deterministic=true` makes a GPU run reproducible.
"""

from __future__ import annotations

from typing import Any

import torch
from omegaconf import DictConfig, open_dict


def trains_on_cuda(trainer: DictConfig | dict[str, Any]) -> bool:
    """Whether Lightning will pick a CUDA device for these trainer settings."""
    accelerator = str(trainer.get("accelerator", "auto"))
    devices = trainer.get("devices", "auto")
    return (
        accelerator in ("auto", "gpu", "cuda")
        and devices not in (0, "0", [])
        and torch.cuda.is_available()
    )


def device_defaults(on_cuda: bool) -> dict[str, Any]:
    """`precision`, `deterministic` and `benchmark` for a run on CUDA or not.

    CUDA: bf16-mixed where the GPU has bf16 (Ampere and later), else 16-mixed (whose loss
    scaler reads the device once per step); cuDNN picks the fastest kernel per shape
    (`benchmark`), which rules out deterministic algorithms. Elsewhere: 32-bit, and
    deterministic kernels where PyTorch has them ("warn" where not): the same seed gives the
    same numbers.
    """
    if on_cuda:
        precision = "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
        return {"precision": precision, "deterministic": False, "benchmark": True}
    return {"precision": "32-true", "deterministic": "warn", "benchmark": None}


def resolve_device_defaults(cfg: DictConfig) -> dict[str, Any]:
    """Fill the null device-dependent keys of `cfg.trainer` in place (so that config.yaml
    records what ran); returns the values filled in."""
    defaults = device_defaults(trains_on_cuda(cfg.trainer))
    filled = {key: value for key, value in defaults.items() if cfg.trainer.get(key) is None}
    with open_dict(cfg.trainer):
        for key, value in filled.items():
            cfg.trainer[key] = value
    return filled

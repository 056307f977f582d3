"""Shared by the data tests: tiny images and masks in each dataset's on-disk layout, configs."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from zootrain.run import train

from ..test_training import CONFIGS, config

RED, BLUE = (230, 20, 20), (20, 20, 230)


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIGS / group).glob("*.yaml") if not p.stem.startswith("_"))


def save_image(
    path: Path, size: tuple[int, int], colour=RED, box=None, background=BLUE, exact=False
) -> None:
    """An RGB image (width, height) of `background` with `colour` inside box (x0, y0, x1, y1).

    `exact` stores PNG data whatever the suffix (PIL reads by content): no JPEG colour bleed,
    so tests can check that labels and pixels stay aligned to the pixel.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.empty((size[1], size[0], 3), dtype=np.uint8)
    pixels[:] = background
    x0, y0, x1, y1 = box or (0, 0, *size)
    pixels[y0:y1, x0:x1] = colour
    Image.fromarray(pixels).save(path, format="PNG" if exact else None)


def save_mask(path: Path, size: tuple[int, int], values: dict[tuple[int, ...], int], fill: int):
    """A class-map PNG: `fill` everywhere, `value` inside each box (later boxes on top)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    mask = np.full((size[1], size[0]), fill, dtype=np.uint8)
    for (x0, y0, x1, y1), value in values.items():
        mask[y0:y1, x0:x1] = value
    Image.fromarray(mask).save(path)


def rgb(image: torch.Tensor) -> torch.Tensor:
    """A (3, H, W) image as the loaders give it (uint8) in [0, 1]."""
    assert image.dtype == torch.uint8, image.dtype
    return image.float() / 255


def interior(region: torch.Tensor) -> torch.Tensor:
    """(H, W) bool: the pixels of `region` whose 8 neighbours are in it too (edges blur)."""
    eroded = -torch.nn.functional.max_pool2d(-region[None].float(), 3, stride=1, padding=1)
    return eroded[0] > 0.5


def dilate(region: torch.Tensor) -> torch.Tensor:
    """(H, W) bool: `region` grown by one pixel."""
    return torch.nn.functional.max_pool2d(region[None].float(), 3, stride=1, padding=1)[0] > 0.5


def is_red(image: torch.Tensor) -> torch.Tensor:
    """(H, W) bool: the pixels that are the object colour (red), not background blue or padding."""
    red, _, blue = rgb(image)
    return (red > 0.6) & (blue < 0.4)


def fast_dev_run(tmp_path: Path, *overrides: str) -> dict[str, float]:
    """`train(cfg)` for one batch of each split (Lightning's fast_dev_run); its finite metrics."""
    cfg = config(
        tmp_path,
        *overrides,
        "data.num_workers=0",
        "callbacks=none",
        "trainer.accelerator=cpu",
        "trainer.fast_dev_run=true",
        "trainer.enable_progress_bar=false",
        "trainer.enable_model_summary=false",
    )
    metrics = train(cfg).metrics
    assert all(math.isfinite(v) for v in metrics.values()), metrics
    return metrics


def natural(height: int, width: int, seed: int = 0) -> np.ndarray:
    """An (H, W, 3) uint8 image with a photograph's 1/f spectrum (noise or flat colour would make
    an untypical JPEG: all high or no high frequencies)."""
    rng = np.random.default_rng(seed)
    fy, fx = np.fft.fftfreq(height)[:, None], np.fft.rfftfreq(width)[None]
    falloff = np.hypot(fx, fy)
    falloff[0, 0] = 1.0
    spectra = rng.normal(size=(3, *falloff.shape)) + 1j * rng.normal(size=(3, *falloff.shape))
    pixels = np.fft.irfft2(spectra / falloff**1.25, s=(height, width)).transpose(1, 2, 0)
    pixels = 128 + 50 * (pixels - pixels.mean()) / pixels.std()
    return np.clip(pixels, 0, 255).astype(np.uint8)

"""Image files as the data modules read them: 8-bit RGB from any PNG depth, damaged files named.

PIL opens a 16-bit greyscale PNG in mode "I;16" (values 0-65535), and its `convert("RGB")`
clips those at 255: nearly every pixel turns white. Such images are scaled to 8 bits here
(value >> 8, the high byte, as PIL already does for 16-bit RGB). A file that fails to decode
(a truncated JPEG) is a `DatasetError` that names it, whichever worker reads it.
"""

from __future__ import annotations

import os

import numpy as np
from PIL import Image

from ..errors import DatasetError


def open_image(path: str | os.PathLike) -> Image.Image:
    """The decoded image at `path`, as stored (masks keep their label values)."""
    try:
        with Image.open(path) as image:
            image.load()  # decode now: a truncated file fails here, with its name
            return image
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise DatasetError(
            f"cannot decode the image {path} ({type(error).__name__}: {error}): the file is "
            "truncated or damaged; replace or remove it"
        ) from None


def read_rgb(path: str | os.PathLike) -> Image.Image:
    """The image at `path` as 8-bit RGB; 16-bit greyscale is scaled, not clipped."""
    return to_rgb(open_image(path))


def to_rgb(image: Image.Image) -> Image.Image:
    """`image` in RGB with 8 bits per channel; 16-bit greyscale keeps its high byte."""
    if image.mode.startswith("I;16") or (image.mode == "I" and image.format == "PNG"):
        # older Pillow opens 16-bit greyscale PNGs as "I" (32-bit), with the same values
        pixels = np.minimum(np.asarray(image, dtype=np.uint32), 0xFFFF)  # (H, W)
        image = Image.fromarray((pixels >> 8).astype(np.uint8))
    return image.convert("RGB")

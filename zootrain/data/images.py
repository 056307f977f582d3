"""Image files as the data modules read them: uint8 RGB tensors, JPEGs by libjpeg-turbo, damaged
files named.

`read_image` decodes a JPEG (found by its content, not its name) with
`torchvision.io.decode_jpeg`: libjpeg-turbo, as Pillow decodes them, without PIL's image
object, its RGB conversion copy and the array copy after it (the pixels are bit-identical with
the wheels of torchvision 0.29 and Pillow 13: libjpeg-turbo 3.1.3 and 3.2.0). Everything else goes through PIL, which reads every
format and mode (PNG of any depth, palettes, CMYK, TIFF, WebP, ...), as does a JPEG that
libjpeg-turbo refuses: PIL then either reads it or names it as damaged.

PIL opens a 16-bit greyscale PNG in mode "I;16" (values 0-65535), and its `convert("RGB")`
clips those at 255: nearly every pixel turns white. Such images are scaled to 8 bits here
(value >> 8, the high byte, as PIL already does for 16-bit RGB). A file that fails to decode
(a truncated JPEG) is a `DatasetError` that names it, whichever worker reads it.

For decoding on the device (`data.decode=device`), `read_encoded` gives a JPEG as its bytes and
the size in its header (PIL reads the header only), and `decode_jpegs` decodes a batch of them
in one call on a device (nvJPEG on CUDA); a file that fails there is read by `read_image` on the
host, which decodes it or names it.
"""

from __future__ import annotations

import io
import os
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg

from ..errors import DatasetError

# torchvision 0.29 deprecates its decoders in favour of TorchCodec (warned at every call); they
# are what this reader is built on until TorchCodec decodes images from a file's bytes as fast.
warnings.filterwarnings(
    "ignore",
    message="The image decoding and encoding capabilities of TorchVision are deprecated",
    category=DeprecationWarning,
)

JPEG_START = b"\xff\xd8\xff"  # SOI marker and the first byte of the next one: every JPEG file


def read_image(path: str | os.PathLike) -> torch.Tensor:
    """The image at `path` as a (3, H, W) uint8 RGB tensor; 16-bit greyscale is scaled."""
    return decode_image(read_bytes(path), path)


def decode_image(data: bytearray, path: str | os.PathLike) -> torch.Tensor:
    """`read_image` of the file at `path` whose bytes `data` were read already."""
    if data.startswith(JPEG_START):
        try:
            return decode_jpeg(torch.frombuffer(data, dtype=torch.uint8), mode=ImageReadMode.RGB)
        except RuntimeError:
            pass  # damaged, or a kind libjpeg-turbo refuses (12-bit): PIL reads it or names it
    # PIL reads the file again (from the page cache): its errors then name the file, not a buffer
    image = to_rgb(open_image(path))
    return torch.from_numpy(np.array(image)).permute(2, 0, 1)  # (3, H, W) view of HWC memory


def read_bytes(path: str | os.PathLike) -> bytearray:
    """The bytes of the file at `path`; a file that cannot be read is a `DatasetError` naming it."""
    try:
        with open(path, "rb") as file:
            data = bytearray(os.fstat(file.fileno()).st_size)  # writable: no copy for torch
            file.readinto(data)
    except OSError as error:
        raise DatasetError(
            f"cannot read the image {path} ({type(error).__name__}: {error})"
        ) from None
    return data


@dataclass
class EncodedJpeg:
    """A JPEG file not decoded yet: its bytes and the size its header gives."""

    data: torch.Tensor  # (N,) uint8, the whole file
    height: int
    width: int
    path: str


def read_encoded(path: str | os.PathLike) -> EncodedJpeg | torch.Tensor:
    """The JPEG at `path` as an `EncodedJpeg`; any other file, or a JPEG whose header PIL cannot
    read, decoded now as `read_image` does (which names a damaged one)."""
    data = read_bytes(path)
    if data.startswith(JPEG_START):
        try:
            with Image.open(io.BytesIO(data)) as image:  # the header only: ~20 us
                width, height = image.size
            encoded = torch.frombuffer(data, dtype=torch.uint8)
            return EncodedJpeg(encoded, height, width, os.fspath(path))
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
            pass  # decode_image decodes it or names it
    return decode_image(data, path)


def decode_jpegs(
    files: list[torch.Tensor], paths: list[str], device: torch.device
) -> list[torch.Tensor]:
    """Each JPEG file's bytes (a 1-D uint8 tensor on the host) as a (3, H, W) uint8 RGB tensor
    on `device`, decoded in one call (nvJPEG's batch on CUDA, libjpeg-turbo on the CPU).

    When the batch fails, each file is decoded alone, and one that fails alone is read from its
    path by `read_image` on the host (as a worker would: PIL decodes a JPEG that the decoder
    refuses, or names it as damaged) and moved to `device`.
    """
    if not files:
        return []
    try:
        return decode_jpeg(files, mode=ImageReadMode.RGB, device=device)
    except RuntimeError:
        pass  # a damaged file, or one of a kind this decoder refuses: which one, alone
    decoded = []
    for data, path in zip(files, paths, strict=True):
        try:
            decoded.append(decode_jpeg(data, mode=ImageReadMode.RGB, device=device))
        except RuntimeError:
            decoded.append(read_image(path).to(device))
    return decoded


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


def to_rgb(image: Image.Image) -> Image.Image:
    """`image` in RGB with 8 bits per channel; 16-bit greyscale keeps its high byte."""
    if image.mode.startswith("I;16") or (image.mode == "I" and image.format == "PNG"):
        # older Pillow opens 16-bit greyscale PNGs as "I" (32-bit), with the same values
        pixels = np.minimum(np.asarray(image, dtype=np.uint32), 0xFFFF)  # (H, W)
        image = Image.fromarray((pixels >> 8).astype(np.uint8))
    return image.convert("RGB")

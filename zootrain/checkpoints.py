"""Checkpoint files: written atomically, read with `weights_only=True`, the backbone exported.

A checkpoint may come from anyone: its tensors are read without unpickling code, and the run
config stored in it (which `eval.py` rebuilds model and data from) is checked before anything
is built from it (`zootrain.runs.trusted_config`: every `_target_` on the allow-list, no
interpolation left to resolve). Where a run keeps its checkpoints is `zootrain.runs`'s.
"""

from __future__ import annotations

import os
import pickle
import zipfile
from collections.abc import Collection
from pathlib import Path
from typing import Any, BinaryIO

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from backbones.files import atomic_path, save_safetensors, starts_a_pickle

from .errors import CheckpointError
from .runs import trusted_config


class AtomicCheckpointIO(TorchCheckpointIO):
    """Save to a temp file in the same directory, then rename: never half a checkpoint."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | os.PathLike, storage_options: Any = None
    ) -> None:
        with atomic_path(path) as tmp, open(tmp, "wb") as file:
            save(checkpoint, file)


def save(obj: Any, file: BinaryIO) -> None:
    """`torch.save` to an open file; a failed write (a full disk) raises its own `OSError`.

    torch's writer turns a failed write into "RuntimeError: unexpected pos", whatever the
    cause; the error the file raised is kept here and raised instead.
    """
    writer = _KeepWriteError(file)
    try:
        torch.save(obj, writer)
    except RuntimeError:
        if writer.error is not None:
            raise writer.error from None
        raise


class _KeepWriteError:
    """A binary file whose first failed write's `OSError` is kept (torch's writer drops it)."""

    def __init__(self, file: BinaryIO) -> None:
        self.file, self.error = file, None

    def write(self, data: bytes) -> int:
        try:
            return self.file.write(data)
        except OSError as error:
            self.error = self.error or error
            raise

    def flush(self) -> None:
        self.file.flush()


def load_checkpoint(
    path: str | os.PathLike, *, also_allowed: Collection[str] = ()
) -> dict[str, Any]:
    """Read a Lightning checkpoint written by `train.py`, safely (no code execution).

    The stored run config (`hyper_parameters.config`) comes back with moved `_target_`s
    updated, so checkpoints of older versions still rebuild, and checked: a `_target_` off
    `zootrain.runs.ALLOWED_TARGETS` (plus the exact names in `also_allowed`) or a `${...}`
    interpolation is a `CheckpointError`. `train.py` resuming a run passes the targets its own
    command line names: a run with a callback of the user's own (`+callbacks.mine._target_=...`)
    resumes, and a checkpoint naming anything else is still refused.
    Tensors are memory-mapped: reading one to check it costs no copy of the rest.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(
            f"checkpoint {str(path)!r} does not exist; pass ckpt_path=<run dir>/checkpoints/"
            "best.ckpt (or last.ckpt)"
        )
    if not zipfile.is_zipfile(path):
        what = (
            "a pickle (pickle.dump, or torch.save's legacy format), which is not read: pickled "
            "code is never executed here"
            if starts_a_pickle(path)
            else "not a PyTorch checkpoint (not a torch.save archive, maybe truncated)"
        )
        raise CheckpointError(f"{path} is {what}; pass a .ckpt written by train.py")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError:
        raise CheckpointError(
            f"{path} holds objects that only load by running pickled code (weights_only=True "
            "refuses them); pass a .ckpt written by train.py"
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointError(f"{path} could not be read ({first})") from None
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise CheckpointError(f"{path} holds no 'state_dict': not a Lightning checkpoint")
    config = checkpoint.get("hyper_parameters", {}).get("config")
    if not config:
        raise CheckpointError(
            f"{path} has no stored run config (hyper_parameters.config): it was not written "
            "by train.py"
        )
    checkpoint["hyper_parameters"]["config"] = trusted_config(config, path, also_allowed)
    return checkpoint


# Where `TaskModule` checkpoints hold the backbone: classifiers and segmenters as
# `model.backbone`, a `heads.detection.Detector` inside torchvision's `BackboneWithFPN`.
BACKBONE_PREFIXES = ("model.backbone.", "model.detector.backbone.body.")


def export_backbone(
    state_dict: dict[str, torch.Tensor], path: str | os.PathLike, backbone_name: str
) -> Path:
    """Write the backbone's weights in the backbones' own keys (for `create(pretrained=)`)."""
    for prefix in BACKBONE_PREFIXES:
        weights = {k.removeprefix(prefix): v for k, v in state_dict.items() if k.startswith(prefix)}
        if weights:
            break
    else:
        raise CheckpointError(
            f"the checkpoint holds no backbone weights to export (no key starts with any of "
            f"{list(BACKBONE_PREFIXES)})"
        )
    return save_safetensors(weights, path, metadata={"backbone": backbone_name, "source": "ours"})

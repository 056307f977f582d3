"""Checkpoints: written atomically, read with `weights_only=True`, found for `ckpt_path=last`."""

from __future__ import annotations

import os
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from backbones.weights import atomic_path, save_safetensors

from .errors import CheckpointError

# The `_target_`s that moved since older checkpoints stored their run config, and where each
# lives now. `load_checkpoint` applies this table to the stored config, the one place a config
# comes back from a file (`eval.py` rebuilds model and data from it); exact paths only.
MOVED_TARGETS: dict[str, str] = {
    # issue 17: training/data/ became a package, one classifier builder in heads/
    "training.build.classifier": "heads.build_classifier",
    "training.data.ShapesDataModule": "training.data.shapes.ShapesDataModule",
    "training.datasets.ImageFolderDataModule": "training.data.imagefolder.ImageFolderDataModule",
    "training.datasets.CIFAR10DataModule": "training.data.cifar.CIFAR10DataModule",
    "training.datasets.CIFAR100DataModule": "training.data.cifar.CIFAR100DataModule",
    "training.datasets.OxfordPetDataModule": "training.data.pet.OxfordPetDataModule",
    "training.datasets.VOCSegmentationDataModule": "training.data.voc.VOCSegmentationDataModule",
    "training.datasets.COCODetectionDataModule": "training.data.coco.COCODetectionDataModule",
}


class AtomicCheckpointIO(TorchCheckpointIO):
    """Save to a temp file in the same directory, then rename: never half a checkpoint."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | os.PathLike, storage_options: Any = None
    ) -> None:
        with atomic_path(path) as tmp:
            torch.save(checkpoint, tmp)


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read a Lightning checkpoint written by `train.py`, safely (no code execution).

    The stored run config (`hyper_parameters.config`) comes back with the `_target_`s of
    `MOVED_TARGETS` updated, so checkpoints of older versions still rebuild.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(
            f"checkpoint {str(path)!r} does not exist; pass ckpt_path=<run dir>/checkpoints/"
            "best.ckpt (or last.ckpt)"
        )
    if not zipfile.is_zipfile(path):
        raise CheckpointError(
            f"{path} is not a PyTorch checkpoint (not a torch.save archive, maybe truncated); "
            "pass a .ckpt written by train.py"
        )
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
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
    checkpoint["hyper_parameters"]["config"] = _current_targets(config)
    return checkpoint


def _current_targets(node: Any) -> Any:
    """The stored config `node` with every moved `_target_` replaced by where it lives now."""
    if isinstance(node, dict):
        return {
            key: MOVED_TARGETS.get(value, value)
            if key == "_target_" and isinstance(value, str)
            else _current_targets(value)
            for key, value in node.items()
        }
    if isinstance(node, list):
        return [_current_targets(item) for item in node]
    return node


def find_resume(run_dir: str | os.PathLike) -> Path | None:
    """The newest checkpoint a run directory can go on from: `checkpoints/last.ckpt` (every
    epoch) or `hpc_ckpt_<n>.ckpt` (Lightning's save on a SLURM requeue signal); None if neither."""
    run_dir = Path(run_dir)
    candidates = [run_dir / "checkpoints" / "last.ckpt", *run_dir.glob("hpc_ckpt_*.ckpt")]
    existing = [p for p in candidates if p.is_file()]
    return max(existing, key=lambda p: p.stat().st_mtime) if existing else None


def find_last(
    roots: tuple[str | os.PathLike, str | os.PathLike],
    run_name: str,
    exclude: str | os.PathLike,
) -> Path:
    """The newest `last.ckpt` of `run_name` among single runs and multirun jobs.

    `roots` are the single-run root (`<root>/<run_name>/<time>/`) and the multirun root
    (`<root>/<time>/<job number>-<run_name>/`).
    """
    outputs, multirun = Path(roots[0]), Path(roots[1])
    job = re.compile(rf"\d+-{re.escape(run_name)}")
    runs = [
        *(outputs / run_name).glob("*/"),
        *(d for d in multirun.glob("*/*/") if job.fullmatch(d.name)),
    ]
    exclude = Path(exclude).resolve()
    candidates = [
        run / "checkpoints" / "last.ckpt"
        for run in runs
        if (run / "checkpoints" / "last.ckpt").is_file()
        and exclude not in (run.resolve(), *run.resolve().parents)
    ]
    if not candidates:
        raise CheckpointError(
            f"ckpt_path=last: no earlier run of {run_name!r} has a last.ckpt under "
            f"{outputs / run_name}/ or {multirun}/<time>/<n>-{run_name}/; train once without "
            "ckpt_path, or pass a checkpoint file or run directory"
        )
    return max(candidates, key=lambda p: p.stat().st_mtime)


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

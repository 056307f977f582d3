"""Checkpoints: written atomically, read with `weights_only=True`, found in run directories.

A checkpoint may come from anyone: its tensors are read without unpickling code, and the run
config stored in it (which `eval.py` rebuilds model and data from) is checked before anything
is built from it: every `_target_` on an allow-list, no interpolation left to resolve.
"""

from __future__ import annotations

import os
import pickle
import zipfile
from collections.abc import Collection, Iterator
from pathlib import Path
from typing import Any, BinaryIO

import torch
from hydra.utils import get_object
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from torch import nn

from backbones.weights import atomic_path, save_safetensors

from .errors import CheckpointError

# The `_target_`s that moved since older checkpoints stored their run config, and where each
# lives now. `load_checkpoint` applies this table to the stored config, the one place a config
# comes back from a file (`eval.py` rebuilds model and data from it); exact paths only.
MOVED_TARGETS: dict[str, str] = {
    # issue 17: training/data/ became a package, one classifier builder in heads/
    "training.build.classifier": "heads.build_classifier",
    "training.data.ShapesDataModule": "zootrain.data.shapes.ShapesDataModule",
    "training.datasets.ImageFolderDataModule": "zootrain.data.imagefolder.ImageFolderDataModule",
    "training.datasets.CIFAR10DataModule": "zootrain.data.cifar.CIFAR10DataModule",
    "training.datasets.CIFAR100DataModule": "zootrain.data.cifar.CIFAR100DataModule",
    "training.datasets.OxfordPetDataModule": "zootrain.data.pet.OxfordPetDataModule",
    "training.datasets.VOCSegmentationDataModule": "zootrain.data.voc.VOCSegmentationDataModule",
    "training.datasets.COCODetectionDataModule": "zootrain.data.coco.COCODetectionDataModule",
}
# Packages renamed since: a stored target under the old prefix (not in the table above) is
# read under the new one. Issue 30: `training` became `zootrain` (a user's own `training/`
# package no longer shadows ours).
MOVED_PACKAGES: dict[str, str] = {"training.": "zootrain."}

# What a stored run config may name as a `_target_`: nothing else is imported or built from a
# checkpoint. An entry ending in "." admits the objects defined in that package (checked where
# the named object really lives, so `heads.torch.load` is refused); any other entry, exactly
# that name. The configs in configs/ name only these.
ALLOWED_TARGETS: tuple[str, ...] = (
    "backbones.create",
    "heads.",
    "zootrain.data.",
    "zootrain.callbacks.",
    "zootrain.loggers.CSVLogger",
    "torch.optim.",
    "lightning.Trainer",
    "lightning.pytorch.Trainer",
    "lightning.pytorch.callbacks.",
    "lightning.pytorch.loggers.",
    "lightning.pytorch.strategies.",
)


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

    The stored run config (`hyper_parameters.config`) comes back with the `_target_`s of
    `MOVED_TARGETS` updated, so checkpoints of older versions still rebuild, and checked: a
    `_target_` off `ALLOWED_TARGETS` (plus the exact names in `also_allowed`) or a `${...}`
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
        raise CheckpointError(
            f"{path} is not a PyTorch checkpoint (not a torch.save archive, maybe truncated); "
            "pass a .ckpt written by train.py"
        )
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
    config = _current_targets(config)
    problems = [
        (where, what)
        for where, what, target in _untrusted(config, "")
        if target not in also_allowed
    ]
    if problems:
        where, what = problems[0]
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise CheckpointError(
            f"{path}: its stored run config {what} at {where}{more}. Nothing was built from "
            "it: train.py stores only the project's own targets, resolved, so this file was "
            "written or edited elsewhere. A checkpoint may name only these targets: "
            f"{', '.join(ALLOWED_TARGETS)}"
        )
    checkpoint["hyper_parameters"]["config"] = config
    return checkpoint


def moved_target(target: str) -> str:
    """Where the `_target_` an older version stored lives now (itself if it did not move)."""
    if target in MOVED_TARGETS:
        return MOVED_TARGETS[target]
    for old, new in MOVED_PACKAGES.items():
        if target.startswith(old):
            return new + target.removeprefix(old)
    return target


def _current_targets(node: Any) -> Any:
    """The stored config `node` with every moved `_target_` replaced by where it lives now."""
    if isinstance(node, dict):
        return {
            key: moved_target(value)
            if key == "_target_" and isinstance(value, str)
            else _current_targets(value)
            for key, value in node.items()
        }
    if isinstance(node, list):
        return [_current_targets(item) for item in node]
    return node


def config_targets(node: Any) -> set[str]:
    """Every `_target_` string in a config (plain containers)."""
    if isinstance(node, dict):
        own = {node["_target_"]} if isinstance(node.get("_target_"), str) else set()
        return own.union(*(config_targets(value) for value in node.values()))
    if isinstance(node, list):
        return set().union(*(config_targets(item) for item in node))
    return set()


def _untrusted(node: Any, where: str) -> Iterator[tuple[str, str, str | None]]:
    """(key path, what is wrong, the target) for every `_target_` not allowed and every
    interpolation (whose target is None)."""
    if isinstance(node, dict):
        for key, value in node.items():
            path = f"{where}.{key}" if where else str(key)
            if key == "_target_":
                problem = _target_problem(value)
                if problem:
                    yield path, problem, value
            else:
                yield from _untrusted(value, path)
    elif isinstance(node, list):
        for index, item in enumerate(node):
            yield from _untrusted(item, f"{where}[{index}]")
    elif isinstance(node, str) and "${" in node:
        # stored resolved: an interpolation could only read the environment or call resolvers
        yield where, f"holds an interpolation ({node!r}), which is not resolved", None


def _target_problem(target: Any) -> str | None:
    """Why `target` may not be built from a checkpoint, or None when it may."""
    if not isinstance(target, str):
        return f"names a target that is not a dotted name ({target!r})"
    refusal = f"names {target!r}, which is not on the allow-list"
    # A private or dunder step (`__globals__`, `_load`) leads anywhere: never followed.
    if any(not part or part.startswith("_") for part in target.split(".")):
        return refusal
    for allowed in ALLOWED_TARGETS:
        if target == allowed:
            return None
        if allowed.endswith(".") and target.startswith(allowed):
            # Import only within the allowed package, then check where the object is defined:
            # a module's imports (`heads.torch`) would otherwise lead out of it.
            try:
                found = get_object(target)
            except Exception:  # any import or lookup failure: there is nothing to build
                return f"names {target!r}, which does not exist in this version"
            home = getattr(found, "__module__", None) or ""
            if not callable(found) or not (home.startswith(allowed) or home == allowed[:-1]):
                return f"{refusal} (it is {home or 'no module'}'s, not {allowed[:-1]}'s)"
            return None
    return refusal


def check_resumable(
    path: str | os.PathLike, module: nn.Module, also_allowed: Collection[str] = ()
) -> dict[str, Any]:
    """Refuse to resume `module`'s run from a checkpoint of another model, naming both.

    `also_allowed`: the targets the resuming run's own config names (see `load_checkpoint`).
    Returns the checkpoint it read (what the other resume checks look at)."""
    checkpoint = load_checkpoint(path, also_allowed=also_allowed)
    stored, hparams = checkpoint["hyper_parameters"]["config"], checkpoint["hyper_parameters"]
    ours = getattr(module, "hparams", {}).get("config", {})

    def describe(config: dict[str, Any], num_classes: Any) -> str:
        backbone = config.get("backbone", {}).get("name", "?")
        head = config.get("head", {}).get("name", "?")
        return f"{backbone} + {head}, {num_classes} classes"

    theirs = describe(stored, hparams.get("num_classes"))
    mine = describe(ours, getattr(module, "num_classes", "?"))
    expected = {k: v.shape for k, v in module.state_dict().items()}
    got = {k: v.shape for k, v in checkpoint["state_dict"].items()}
    if theirs == mine and expected == got:
        return checkpoint
    missing = [k for k in expected if k not in got]
    unexpected = [k for k in got if k not in expected]
    wrong = [k for k in expected if k in got and got[k] != expected[k]]
    counts = ", ".join(
        f"{len(keys)} {label} (e.g. {keys[0]})"
        for label, keys in (
            ("missing", missing),
            ("unexpected", unexpected),
            ("of another shape", wrong),
        )
        if keys
    )
    if not counts:
        return checkpoint  # another name for the same architecture: its weights fit
    raise CheckpointError(
        f"ckpt_path={path} is a checkpoint of {theirs}; this run builds {mine}, which its "
        f"weights do not fit ({counts}). Resume with the config it was trained with, or "
        "start a new run (its backbone weights: backbone.pretrained=<its run dir>/checkpoints/"
        "backbone.safetensors)"
    )


def find_best(run_dir: str | os.PathLike) -> Path:
    """The checkpoint `eval.py` scores for a run directory: `checkpoints/best.ckpt`."""
    best = Path(run_dir) / "checkpoints" / "best.ckpt"
    if not best.is_file():
        found = sorted(p.name for p in (Path(run_dir) / "checkpoints").glob("*.ckpt"))
        raise CheckpointError(
            f"ckpt_path={run_dir} is a directory without checkpoints/best.ckpt (it holds "
            f"{', '.join(found) or 'no checkpoint'}); pass a run directory of train.py or a "
            ".ckpt file"
        )
    return best


def find_resume(run_dir: str | os.PathLike) -> Path | None:
    """The newest checkpoint a run directory can go on from: `checkpoints/last.ckpt` (every
    epoch) or `hpc_ckpt_<n>.ckpt` (Lightning's save on a SLURM requeue signal); None if neither."""
    run_dir = Path(run_dir)
    candidates = [run_dir / "checkpoints" / "last.ckpt", *run_dir.glob("hpc_ckpt_*.ckpt")]
    existing = [p for p in candidates if p.is_file()]
    return max(existing, key=lambda p: p.stat().st_mtime) if existing else None


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

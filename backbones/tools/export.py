"""Export a backbone to ONNX (dynamo exporter) or a torch.export `.pt2`, verified against eager.

Batch, height and width are dynamic: the exported graph is traced once at an example size and
checked, by running it, at that size and at a second one (another batch, a non-square size
that is not a multiple of 32). ONNX runs in onnxruntime, `.pt2` through `torch.export.load`.
"""

from __future__ import annotations

import contextlib
import io
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.export import Dim, ExportedProgram

from ..contract import Backbone

FORMATS = ("onnx", "pt2")
ONNX_PACKAGES = ("onnx", "onnxscript", "onnxruntime")


class ExportError(RuntimeError):
    """An export could not be made or does not reproduce the eager model; the message says why."""


@dataclass(frozen=True)
class Check:
    """How the exported graph compares with eager at one input shape."""

    shape: tuple[int, ...]
    max_abs_diff: float
    max_rel_diff: float  # max |diff| / max |eager|, over every level


def require_onnx() -> None:
    """Raise one clear error when a package ONNX export needs is missing."""
    import importlib.util

    missing = [p for p in ONNX_PACKAGES if importlib.util.find_spec(p) is None]
    if missing:
        raise ExportError(
            f"ONNX export needs {', '.join(ONNX_PACKAGES)}; {', '.join(missing)} "
            f"{'is' if len(missing) == 1 else 'are'} not installed. Install them with "
            f"`pip install {' '.join(ONNX_PACKAGES)}` (or use --format pt2)."
        )


def export_program(model: Backbone, example: torch.Tensor) -> ExportedProgram:
    """torch.export of `model` (in eval mode) with dynamic batch, height and width."""
    if model.training:
        raise ExportError(
            f"{type(model).__name__} is in train mode: an export freezes the forward pass, and "
            "BatchNorm would be exported with batch statistics and dropout/drop-path active. "
            "Call model.eval() first."
        )
    if example.shape[0] == 1:  # traced at size 1, a dim is specialized to 1
        example = example.expand(2, -1, -1, -1)
    dims = ({0: Dim.DYNAMIC, 2: Dim.DYNAMIC, 3: Dim.DYNAMIC},)
    try:
        with torch.no_grad():
            return torch.export.export(model, (example,), dynamic_shapes=dims)
    except Exception as e:
        raise ExportError(f"torch.export could not trace {type(model).__name__}: {e}") from e


def second_shape(example: torch.Tensor) -> tuple[int, int, int, int]:
    """Another batch and a non-square size that is not a multiple of 32, to prove dynamic dims."""
    batch, channels, height, width = example.shape
    return batch + 1, channels, height + 32, width + 48


def export(
    model: Backbone,
    path: str | os.PathLike,
    example: torch.Tensor,
    format: str | None = None,
    program: ExportedProgram | None = None,
) -> list[Check]:
    """Write `model` to `path` (ONNX or `.pt2`, from the suffix unless `format` is given),
    reload it, and compare it with eager at `example`'s shape and a second shape.

    `program`, from `export_program(model, example)`, saves tracing again for a second format.
    """
    path = Path(path)
    format = format or path.suffix.lstrip(".")
    if format not in FORMATS:
        raise ExportError(f"unknown export format {format!r}; choose one of {', '.join(FORMATS)}")
    if format == "onnx":
        require_onnx()
    if program is None:
        program = export_program(model, example)
    path.parent.mkdir(parents=True, exist_ok=True)
    levels = list(model.out_features)
    if format == "pt2":
        torch.export.save(program, path)
        loaded = torch.export.load(path).module()

        def run(x: torch.Tensor) -> list[torch.Tensor]:
            with torch.no_grad():
                outputs = loaded(x)
            return [outputs[level] for level in levels]

    else:
        import onnxruntime

        # The exporter reports its progress on stdout; the command prints its own summary.
        with contextlib.redirect_stdout(io.StringIO()):
            onnx_program = torch.onnx.export(
                program, dynamo=True, input_names=["image"], output_names=levels
            )
        onnx_program.save(str(path))
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])

        def run(x: torch.Tensor) -> list[torch.Tensor]:
            outputs = session.run(levels, {"image": x.numpy()})
            return [torch.from_numpy(o) for o in outputs]

    checks = []
    generator = torch.Generator().manual_seed(0)
    for shape in (tuple(example.shape), second_shape(example)):
        x = torch.randn(shape, generator=generator)
        with torch.no_grad():
            expected = model(x)
        try:
            actual = run(x)
        except Exception as e:
            raise ExportError(
                f"the exported {format} graph fails on an input of shape {shape}: {e}"
            ) from e
        abs_diff = max(
            (a - expected[k]).abs().max().item() for a, k in zip(actual, levels, strict=True)
        )
        scale = max(expected[k].abs().max().item() for k in levels)
        checks.append(Check(shape=shape, max_abs_diff=abs_diff, max_rel_diff=abs_diff / scale))
    return checks

"""Per-level shapes, parameters, FLOPs and theoretical receptive fields of any backbone.

Everything is computed on the meta device (shapes only, no memory, no arithmetic), so a
summary of resnet152 at 1024x1024 takes as long as one at 64x64.

Receptive field: every ATen op of one forward pass is intercepted, and each tensor derived
from the input carries the receptive field and effective stride ("jump") of its pixels. A
convolution or pooling with kernel k, stride s and dilation d gives
`r_out = r_in + (k - 1) * d * jump_in` and `jump_out = jump_in * s` (the recurrence of Araujo
et al. 2019, "Computing Receptive Fields of Convolutional Neural Networks"); any other op
takes the maximum over its inputs, so a residual sum or a dense concatenation gets the largest
receptive field of its branches. This is the theoretical (maximal) field, padding included.
Global operations (squeeze-excite's spatial mean, GroupNorm's statistics) make every output
pixel depend on the whole image; they are reported as `global context`, not as a size.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import FlopCounterMode

from ..contract import Backbone
from ..factory import create

aten = torch.ops.aten
_CONV_OPS = {aten.convolution, aten._convolution}
_POOL_OPS = {aten.max_pool2d_with_indices, aten.avg_pool2d, aten.max_pool2d}
# Ops whose output pixels see every input pixel (when they reduce over the spatial dims).
_GLOBAL_OPS = {
    aten.mean,
    aten.sum,
    aten.amax,
    aten._adaptive_avg_pool2d,
    aten.adaptive_max_pool2d,
    aten.native_group_norm,
}


@dataclass(frozen=True)
class Field:
    """Receptive field (rows, cols) and effective stride of a tensor's pixels."""

    size: tuple[int, int] = (1, 1)
    jump: tuple[int, int] = (1, 1)
    global_context: bool = False

    def merge(self, other: Field) -> Field:
        return Field(
            size=(max(self.size[0], other.size[0]), max(self.size[1], other.size[1])),
            jump=(max(self.jump[0], other.jump[0]), max(self.jump[1], other.jump[1])),
            global_context=self.global_context or other.global_context,
        )

    def window(
        self, kernel: tuple[int, int], stride: tuple[int, int], dilation: tuple[int, int]
    ) -> Field:
        size = tuple(
            r + (k - 1) * d * j
            for r, k, d, j in zip(self.size, kernel, dilation, self.jump, strict=True)
        )
        jump = tuple(j * s for j, s in zip(self.jump, stride, strict=True))
        return Field(size=size, jump=jump, global_context=self.global_context)  # type: ignore[arg-type]


def _pair(value: int | list[int] | tuple[int, ...]) -> tuple[int, int]:
    if isinstance(value, int):
        return value, value
    return (value[0], value[0]) if len(value) == 1 else (value[0], value[1])


class ReceptiveFieldMode(TorchDispatchMode):
    """Propagates a `Field` through every ATen op, starting from the tensors in `track`."""

    def __init__(self, *inputs: torch.Tensor) -> None:
        super().__init__()
        self.fields: dict[int, Field] = {id(t): Field() for t in inputs}
        self._alive = list(inputs)  # tensors stay referenced, so their ids stay unique

    def field(self, tensor: torch.Tensor) -> Field:
        return self.fields[id(tensor)]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        known = [self.fields[id(t)] for t in _tensors((args, kwargs)) if id(t) in self.fields]
        if not known:
            return out  # weights, constants
        field = known[0]
        for other in known[1:]:
            field = field.merge(other)
        op = func.overloadpacket
        if op in _CONV_OPS:
            weight, stride, dilation = args[1], args[3], args[5]
            field = field.window(tuple(weight.shape[2:]), _pair(stride), _pair(dilation))
        elif op in _POOL_OPS:
            kernel = _pair(args[1])
            stride = _pair(args[2]) if len(args) > 2 and args[2] else kernel
            dilation = _pair(args[4]) if op is not aten.avg_pool2d and len(args) > 4 else (1, 1)
            field = field.window(kernel, stride, dilation)
        elif op in _GLOBAL_OPS and _reduces_space(op, args):
            field = Field(field.size, field.jump, global_context=True)
        for tensor in _tensors(out):
            self.fields[id(tensor)] = field
            self._alive.append(tensor)
        return out


def _tensors(obj: object) -> list[torch.Tensor]:
    """The tensors in nested containers (an op's arguments or outputs)."""
    return [leaf for leaf in tree_leaves(obj) if isinstance(leaf, torch.Tensor)]


def _reduces_space(op: object, args: tuple) -> bool:
    if op in (aten.mean, aten.sum, aten.amax):
        x, dims = args[0], args[1] if len(args) > 1 else None
        if x.ndim != 4:
            return False
        dims = range(4) if not dims else [d % 4 for d in dims]
        return 2 in dims or 3 in dims
    return True  # adaptive pools and GroupNorm work over the whole map


@dataclass(frozen=True)
class LevelSummary:
    """One level of a backbone at a given input size."""

    name: str
    shape: tuple[int, ...]
    stride: int
    receptive_field: tuple[int, int]
    effective_stride: tuple[int, int]
    global_context: bool
    params: int  # of the modules since the previous level
    flops: int  # of the modules since the previous level; 2 per multiply-add, batch 1


def meta_backbone(name: str, in_chans: int = 3) -> Backbone:
    """Backbone `name` on the meta device, in eval mode, returning every level it has."""
    with torch.device("meta"):
        levels = create(name, in_chans=in_chans, out_features=("C5",)).feature_info
        return create(name, in_chans=in_chans, out_features=tuple(f.name for f in levels)).eval()


def runs_at(model: Backbone, height: int, width: int) -> bool:
    """Whether a meta-device `model` accepts a `height` x `width` input with every level >= 1x1."""
    x = torch.empty(1, model.in_chans, height, width, device="meta")
    try:
        with torch.no_grad():
            features = model(x)
    except RuntimeError:
        return False
    return all(f.shape[-2] >= 1 and f.shape[-1] >= 1 for f in features.values())


def minimum_size(model: Backbone, limit: int = 4096) -> int:
    """The smallest square input size a meta-device `model` runs on, every level >= 1x1."""
    if runs_at(model, 1, 1):
        return 1
    if not runs_at(model, limit, limit):
        raise ValueError(f"{type(model).__name__} does not run on a {limit}x{limit} input")
    low, high = 1, limit  # fails at low, runs at high (every net here is monotonic in size)
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (low, middle) if runs_at(model, middle, middle) else (middle, high)
    return high


def check_size(name: str, model: Backbone, height: int, width: int) -> None:
    """A clear error when a meta-device `model` cannot run at `height` x `width`, naming the
    minimum size."""
    if height >= 1 and width >= 1 and runs_at(model, height, width):
        return
    smallest = minimum_size(model)
    raise ValueError(
        f"{name} needs inputs of at least {smallest}x{smallest} pixels (every level at least "
        f"1x1); got {height}x{width}"
    )


def summarize(
    name: str, height: int = 224, width: int | None = None, in_chans: int = 3
) -> list[LevelSummary]:
    """Every level of backbone `name` at a `height` x `width` input (batch 1), fine to coarse."""
    width = height if width is None else width
    model = meta_backbone(name, in_chans)
    check_size(name, model, height, width)
    x = torch.empty(1, in_chans, height, width, device="meta")
    pieces: list[nn.Module] = [model.stem, *model.stages]
    levels = {f.name: f for f in model.feature_info}
    summaries = []
    params = flops = 0
    with torch.no_grad(), ReceptiveFieldMode(x) as fields:
        for index, piece in enumerate(pieces):
            with FlopCounterMode(display=False) as counter:
                x = piece(x)
            flops += counter.get_total_flops()
            params += sum(p.numel() for p in piece.parameters())
            level = model._taps.get(index)
            if level is None:
                continue
            field = fields.field(x)
            summaries.append(
                LevelSummary(
                    name=level,
                    shape=tuple(x.shape),
                    stride=levels[level].stride,
                    receptive_field=field.size,
                    effective_stride=field.jump,
                    global_context=field.global_context,
                    params=params,
                    flops=flops,
                )
            )
            params = flops = 0
    return summaries


def receptive_field(module: nn.Module, height: int, width: int, in_chans: int = 3) -> Field:
    """The `Field` of the output of any module built on the meta device (e.g. part of a net)."""
    x = torch.empty(1, in_chans, height, width, device="meta")
    with torch.no_grad(), ReceptiveFieldMode(x) as fields:
        out = module(x)
    return fields.field(_tensors(out)[0])

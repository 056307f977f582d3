"""Exact BatchNorm folding for inference: `fuse_batchnorm(model)`.

In eval mode a BatchNorm2d is a per-channel affine map. Where its input is the output of a
Conv2d that nothing else reads, that map folds into the conv's weight and bias
(`torch.nn.utils.fuse_conv_bn_weights`) and the norm becomes a `FoldedBatchNorm`, an identity:
one pass over the activation less, the same numbers up to float rounding. Which norm reads
which conv's output is found from the dataflow of one forward pass (forward hooks, and a
`TorchFunctionMode` that counts every other use of each conv output), so it works on any
model and the model code carries nothing for it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from typing import TypeVar

import torch
from torch import nn
from torch.nn.utils import fuse_conv_bn_weights
from torch.overrides import TorchFunctionMode

ModuleT = TypeVar("ModuleT", bound=nn.Module)

TRACE_SIZE = 32  # height and width of the default input that the dataflow is traced with


class FoldedBatchNorm(nn.Identity):
    """The place of a BatchNorm2d that `fuse_batchnorm` folded into the conv before it."""

    def train(self, mode: bool = True) -> FoldedBatchNorm:
        if mode:
            raise RuntimeError(fused_training_error("model"))  # the model's class is unknown here
        return super().train(mode)


def fused_training_error(what: str) -> str:
    """The message for `.train()` on a model (`what`: its class name) with folded BatchNorms."""
    return (
        f"this {what} was fuse()d for inference: its BatchNorms are folded into "
        "the convolutions and cannot be trained. Build a new model to train."
    )


def has_folded_norms(model: nn.Module) -> bool:
    """Whether `fuse_batchnorm` folded any BatchNorm of `model`."""
    return any(isinstance(m, FoldedBatchNorm) for m in model.modules())


@torch.no_grad()
def fuse_batchnorm(model: ModuleT, example: torch.Tensor | None = None) -> ModuleT:
    """Fold every BatchNorm2d whose input is a Conv2d output used by nothing else into that
    conv, and switch `model` to channels_last; returns `model` (changed in place).

    For inference only: `model` must be in eval mode, and afterwards `.train()` raises.
    `example` is the input the dataflow is traced with (one forward pass); by default zeros of
    shape (1, model.in_chans, 32, 32), which suits every `Backbone`.
    """
    if model.training:
        raise RuntimeError(
            "fuse() folds BatchNorm running statistics into the convolutions, which is only "
            "valid for inference: call .eval() first, e.g. create(name).eval().fuse()"
        )
    if example is None:
        if not isinstance(getattr(model, "in_chans", None), int):
            raise TypeError(
                f"fuse_batchnorm: {type(model).__name__} has no `in_chans`; pass an example "
                "input to trace it with"
            )
        param = next(model.parameters())
        example = param.new_zeros(1, model.in_chans, TRACE_SIZE, TRACE_SIZE)
    paths: dict[nn.Module, list[str]] = {}
    for path, module in model.named_modules(remove_duplicate=False):
        paths.setdefault(module, []).append(path)
    for conv, norm in conv_norm_pairs(model, example):
        conv.weight, conv.bias = fuse_conv_bn_weights(
            conv.weight,
            conv.bias,
            norm.running_mean,
            norm.running_var,
            norm.eps,
            norm.weight,
            norm.bias,
        )
        for path in paths[norm]:
            model.set_submodule(path, FoldedBatchNorm().eval())
    return model.to(memory_format=torch.channels_last)


def conv_norm_pairs(model: nn.Module, example: torch.Tensor) -> list[tuple[nn.Conv2d, nn.Module]]:
    """(conv, norm) for each BatchNorm2d (with running statistics) whose input is the output
    of a Conv2d that no other op reads and that the model does not return; both run once."""
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    calls: Counter[nn.Module] = Counter()
    produced_by: dict[int, nn.Conv2d] = {}  # id of a conv output -> the conv
    fed: dict[nn.Module, int] = {}  # norm -> id of its input
    alive: list[torch.Tensor] = []  # keeps every watched id unique while the model runs
    mode = _Uses()

    def after_conv(conv: nn.Conv2d, args: tuple, output: torch.Tensor) -> None:
        calls[conv] += 1
        produced_by[id(output)] = conv
        mode.uses[id(output)] = 0
        alive.append(output)

    def before_norm(norm: nn.Module, args: tuple) -> None:
        calls[norm] += 1
        fed[norm] = id(args[0])
        alive.append(args[0])
        mode.paused = True  # the norm's own read of its input is not another use

    def after_norm(norm: nn.Module, args: tuple, output: torch.Tensor) -> None:
        mode.paused = False

    handles = [m.register_forward_hook(after_conv) for m in convs]
    handles += [m.register_forward_pre_hook(before_norm) for m in norms]
    handles += [m.register_forward_hook(after_norm) for m in norms]
    try:
        with mode:
            outputs = model(example)
    finally:
        for handle in handles:
            handle.remove()
    for tensor in _tensors(outputs):  # a returned conv output must keep its values
        if id(tensor) in mode.uses:
            mode.uses[id(tensor)] += 1

    readers = Counter(fed.values())
    pairs = []
    for norm, source in fed.items():
        conv = produced_by.get(source)
        if (
            conv is not None
            and calls[conv] == calls[norm] == 1
            and readers[source] == 1
            and mode.uses[source] == 0
            and norm.running_mean is not None
            and norm.num_features == conv.out_channels
        ):
            pairs.append((conv, norm))
    return pairs


class _Uses(TorchFunctionMode):
    """Counts the torch calls that take a watched tensor and return a tensor (metadata such as
    `.shape` or `.dim()` is not a use), except while `paused`."""

    def __init__(self) -> None:
        super().__init__()
        self.uses: dict[int, int] = {}  # id of a watched tensor -> uses so far
        self.paused = False

    def __torch_function__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        if not self.paused and any(True for _ in _tensors(result)):
            for arg in _tensors((args, kwargs)):
                if id(arg) in self.uses:
                    self.uses[id(arg)] += 1
        return result


def _tensors(obj: object) -> Iterator[torch.Tensor]:
    """The tensors in nested tuples, lists and dict values."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, tuple | list):
        for item in obj:
            yield from _tensors(item)
    elif isinstance(obj, dict):
        for item in obj.values():
            yield from _tensors(item)

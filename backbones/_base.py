"""The backbone contract (stem + stages -> dict of named levels) and the registry."""

from __future__ import annotations

import difflib
import fnmatch
import inspect
import math
import re
import typing
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.checkpoint import checkpoint

from ._fusion import (
    ONEDNN_ACTIVATIONS,
    RESIDUAL_ACTIVATIONS,
    ClampInput,
    FusedConv2d,
    FusedResidual,
    onednn_usable,
)
from .layers import LayerFn, Residual

if TYPE_CHECKING:
    from .weights import Pretrained

DEFAULT_OUT_FEATURES = ("C3", "C4", "C5")

# (regex fully matching a source key, replacement in our key space or None to drop the key)
Rules = tuple[tuple[str, str | None], ...]


@dataclass(frozen=True)
class FeatureInfo:
    """One pyramid level: its name `C<k>`, channel count and stride (2**k)."""

    name: str
    channels: int
    stride: int


class FeatureInfoList(list[FeatureInfo]):
    """`Backbone.feature_info`: every level the backbone has, answering timm's questions too.

    It is a list of `FeatureInfo`, fine to coarse. Like timm's `FeatureInfo` of a
    `features_only` model, `channels()`, `reduction()` (the stride) and `get_dicts()` describe
    the levels the backbone returns (`out_features`), in the order `forward` returns them,
    or, given `idx`, the levels at those list positions. So code written for timm's feature
    extractors reads ours unchanged; `heads.FeatureList` returns the maps as a list.
    """

    def __init__(self, out_features: Sequence[str]) -> None:
        super().__init__()
        self.out_features = tuple(out_features)

    def get(self, key: str, idx: int | Sequence[int] | None = None) -> object:
        """timm's accessor: `key` of the returned levels, of level `idx`, or of each of `idx`."""
        if isinstance(idx, int):
            return self.get_dicts(idx=idx)[key]
        return [info[key] for info in self.get_dicts(idx=idx)]

    def get_dicts(
        self, keys: Sequence[str] | None = None, idx: int | Sequence[int] | None = None
    ) -> list[dict[str, object]] | dict[str, object]:
        """timm's dicts (`num_chs`, `reduction`, plus our level `name`) of the returned levels,
        of level `idx` (one dict) or of each of `idx`, with only `keys` if given."""
        if isinstance(idx, int):
            return self._as_dict(idx, keys)
        indices = self._returned() if idx is None else idx
        return [self._as_dict(i, keys) for i in indices]

    def channels(self, idx: int | Sequence[int] | None = None) -> list[int] | int:
        """Channels of the returned levels, fine to coarse (or of level `idx`)."""
        return self.get("num_chs", idx)

    def reduction(self, idx: int | Sequence[int] | None = None) -> list[int] | int:
        """Strides of the returned levels, fine to coarse (or of level `idx`)."""
        return self.get("reduction", idx)

    def _returned(self) -> list[int]:
        return [i for i, info in enumerate(self) if info.name in self.out_features]

    def _as_dict(self, index: int, keys: Sequence[str] | None) -> dict[str, object]:
        info = self[index]
        full = {"num_chs": info.channels, "reduction": info.stride, "name": info.name}
        if keys is None:
            return full
        unknown = [k for k in keys if k not in full]
        if unknown:
            raise KeyError(f"feature_info has no {unknown}; its keys are {list(full)}")
        return {k: full[k] for k in keys}


@dataclass(frozen=True)
class ClassifierCfg:
    """The reference classifier of a family, as data for `heads.ClassificationHead`.

    pool -> optional norm -> flatten -> hidden (linear, act, dropout)* -> dropout -> fc;
    the dropout before `fc` is only there when there are no hidden layers.
    """

    pool: str = "avg"
    pool_size: int = 1
    norm_layer: LayerFn | None = None
    hidden_channels: tuple[int, ...] = ()
    act_layer: LayerFn = nn.ReLU
    dropout: float = 0.0


class Backbone(nn.Module):
    """A stem plus `stages` returning `dict[str, Tensor]` of the requested levels, fine to coarse.

    Subclasses build `self.stem` and `self.stages` and, right after building the module
    that produces a level, call `self.add_level(channels, stride)`. They end their
    `__init__` with `self.finalize()`, which drops stages past the coarsest requested level,
    freezes what `frozen_stages` asks for and validates the settings.
    """

    # Source library -> rules that turn its classifier state dict into ours; a family whose
    # rules depend on the variant (e.g. VGG's `features.<i>` numbering, a number of blocks)
    # sets them per instance.
    weight_rules: Mapping[str, Rules] = {}
    # What `heads.build_classifier` puts on top to rebuild the reference classifier; a family
    # whose variants differ (e.g. in dropout) sets it per instance.
    classifier_cfg: ClassifierCfg = ClassifierCfg()

    def __init__(
        self,
        *,
        out_features: Sequence[str] = DEFAULT_OUT_FEATURES,
        in_chans: int = 3,
        frozen_stages: int = -1,
        norm_eval: bool = False,
    ) -> None:
        super().__init__()
        if isinstance(out_features, str):
            out_features = (out_features,)
        if not isinstance(in_chans, int) or in_chans < 1:
            raise ValueError(f"in_chans must be a positive int, got {in_chans!r}")
        if not isinstance(frozen_stages, int) or frozen_stages < -1:
            raise ValueError(
                "frozen_stages must be -1 (nothing frozen), 0 (the stem) or k > 0 "
                f"(the stem and the first k stages), got {frozen_stages!r}"
            )
        self.out_features = tuple(out_features)
        self.in_chans = in_chans
        self.frozen_stages = frozen_stages
        self.norm_eval = norm_eval
        self.feature_info = FeatureInfoList(self.out_features)
        self._level_module: dict[str, int] = {}  # level name -> index in (stem, *stages)
        self._grad_checkpointing = False
        self._fused = False

    def add_level(self, channels: int, stride: int) -> None:
        """Record that the module built last (the stem or the newest stage) outputs a level.

        Called again for the same stride, the later module replaces the earlier one:
        `Ck` is the last module whose output has stride 2**k.
        """
        k = int(math.log2(stride))
        if 2**k != stride:
            raise ValueError(f"level strides must be powers of two, got {stride}")
        name = f"C{k}"
        built = len(self.stages) if hasattr(self, "stages") else 0
        if name in self._level_module:
            self.feature_info[:] = [f for f in self.feature_info if f.name != name]
        self.feature_info.append(FeatureInfo(name=name, channels=channels, stride=stride))
        self._level_module[name] = built

    def finalize(self) -> None:
        """Validate `out_features`, drop unused stages and apply `frozen_stages`."""
        known = [f.name for f in self.feature_info]
        unknown = [name for name in self.out_features if name not in known]
        if unknown or not self.out_features:
            raise ValueError(
                f"{type(self).__name__} has levels {known}; out_features={self.out_features} "
                f"asks for {unknown or 'nothing'}. Choose a non-empty subset of {known}."
            )
        if len(set(self.out_features)) != len(self.out_features):
            raise ValueError(f"out_features has duplicates: {self.out_features}")
        num_stages = len(self.stages)
        if self.frozen_stages > num_stages:
            raise ValueError(
                f"frozen_stages={self.frozen_stages} but {type(self).__name__} has "
                f"{num_stages} stages; use -1..{num_stages}"
            )
        # Only run (and keep) the stages up to the coarsest requested level.
        last = max(self._level_module[name] for name in self.out_features)
        del self.stages[last:]
        self._taps = {
            self._level_module[f.name]: f.name
            for f in self.feature_info
            if f.name in self.out_features
        }
        for module in self._frozen_modules():
            for param in module.parameters():
                param.requires_grad_(False)
        self.train(self.training)

    @property
    def channels(self) -> dict[str, int]:
        """Channels of each returned level, fine to coarse."""
        return {f.name: f.channels for f in self.feature_info if f.name in self.out_features}

    @property
    def strides(self) -> dict[str, int]:
        """Stride of each returned level, fine to coarse."""
        return {f.name: f.stride for f in self.feature_info if f.name in self.out_features}

    def _frozen_modules(self) -> list[nn.Module]:
        if self.frozen_stages < 0:
            return []
        return [self.stem, *self.stages[: self.frozen_stages]]

    def train(self, mode: bool = True) -> Backbone:
        if mode and self._fused:
            raise RuntimeError(
                f"this {type(self).__name__} was fuse()d for inference: its BatchNorms are folded "
                "into the convolutions and cannot be trained. Build a new model to train."
            )
        super().train(mode)
        if mode:
            frozen = [self] if self.norm_eval else self._frozen_modules()
            for module in frozen:
                for norm in module.modules():
                    if isinstance(norm, _BatchNorm):
                        norm.eval()
        return self

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each stage in the backward pass instead of storing its activations."""
        self._grad_checkpointing = enable

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        if x.ndim != 4 or x.shape[1] != self.in_chans:
            raise ValueError(
                f"{type(self).__name__} expects a (batch, {self.in_chans}, height, width) "
                f"tensor, got shape {tuple(x.shape)}"
            )
        features = {}
        x = self.stem(x)
        if 0 in self._taps:
            features[self._taps[0]] = x
        for index, stage in enumerate(self.stages, start=1):
            if self._grad_checkpointing and torch.is_grad_enabled():
                context_fn = partial(_keep_norm_stats_on_recompute, stage)
                x = checkpoint(stage, x, use_reentrant=False, context_fn=context_fn)
            else:
                x = stage(x)
            if index in self._taps:
                features[self._taps[index]] = x
        return features

    @torch.no_grad()
    def fuse(self, winograd: bool = True) -> Backbone:
        """Fold every BatchNorm that directly follows a conv into it, switch to channels_last.

        For inference only (eval mode): the running statistics become the conv's weight and
        bias, which saves one pass over each conv output. Which norm follows which conv is
        found by running the model once on a small input, so it works for any family; a
        BatchNorm is folded only where it is the sole consumer of the conv's output. A norm ->
        ReLU -> conv chain with no padding (DenseNet's pre-activation layers) is folded too:
        the norm's scale and shift move into the conv and a per-channel clamp
        (`ClampInput`) replaces the two passes of norm and ReLU.
        Where PyTorch has oneDNN, the convs become `FusedConv2d`s that also take in the
        activation that is the sole consumer of their output, and a `layers.Residual` sum (+
        ReLU) that directly follows one, run as one oneDNN call on CPU (plain conv2d +
        activation on CUDA, with autograd on, and when traced; see `backbones._fusion`); with
        `winograd`, wide 3x3 convs use Winograd F(2x2, 3x3) or F(4x4, 3x3) there. An average
        pool that is the sole consumer of a 1x1 conv runs before it (they commute; the conv
        then sees a quarter of the positions in DenseNet's transitions). Returns `self`, in
        channels_last; outputs equal the unfused model's up to rounding.
        """
        if self.training:
            raise RuntimeError(
                "fuse() folds BatchNorm running statistics into the convolutions, which is only "
                "valid for inference: call .eval() first, e.g. create(name).eval().fuse()"
            )
        names = {module: name for name, module in self.named_modules()}  # paths stay valid
        for conv, norm in _sole_consumers(self, (nn.BatchNorm2d,)):
            if conv.out_channels == norm.num_features and norm.running_mean is not None:
                _fold_norm_into_conv(conv, norm)
                self.set_submodule(names[norm], nn.Identity())
        _fold_pre_activations(self, names)
        if onednn_usable():
            follows = dict(_sole_consumers(self, tuple(ONEDNN_ACTIVATIONS)))
            for act in follows.values():
                self.set_submodule(names[act], nn.Identity())
            residuals = {
                conv: residual
                for conv, residual in _sole_consumers(self, (Residual,))
                if conv not in follows and type(residual.act) in RESIDUAL_ACTIVATIONS
            }
            pools = dict(_sole_consumers(self, (nn.AvgPool2d,)))
            convs = [(n, m) for n, m in self.named_modules() if FusedConv2d.supports(m)]
            for name, conv in convs:
                if conv in residuals:
                    fused = FusedConv2d(conv, residuals[conv].act, winograd=winograd)
                    self.set_submodule(names[residuals[conv]], FusedResidual(fused))
                else:
                    fused = FusedConv2d(conv, follows.get(conv), winograd=winograd)
                if conv in pools and fused.pool_commutes(pools[conv]):
                    fused.pool_first = pools[conv]
                    self.set_submodule(names[pools[conv]], nn.Identity())
                self.set_submodule(name, fused)
        self._fused = True
        return self.to(memory_format=torch.channels_last)

    def input_conv_name(self) -> str:
        """Qualified name of the first convolution, the one that sees `in_chans` channels."""
        for name, module in self.named_modules():
            if isinstance(module, nn.Conv2d):
                return name
        raise RuntimeError(f"{type(self).__name__} has no Conv2d")


class _TensorUses(torch.overrides.TorchFunctionMode):
    """Counts the torch calls that take a watched tensor and return a tensor (metadata queries
    such as `.shape` or `.dim()` are not uses), except calls made while `paused`.

    Watched tensors are kept alive by the caller, so their ids stay unique.
    """

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


def _sole_consumers(
    model: Backbone,
    kinds: tuple[type[nn.Module], ...],
    producers: tuple[type[nn.Module], ...] = (nn.Conv2d,),
) -> list[tuple[nn.Module, nn.Module]]:
    """(producer, consumer) for each module of exactly one of `kinds` whose input is the output
    of a module of one of `producers` (a Conv2d by default) that nothing else uses (an
    in-place sum with a shortcut is a use, and so is another consumer), found by running
    `model` once; both modules run once."""
    producing = [m for m in model.modules() if isinstance(m, producers)]
    consumers = [m for m in model.modules() if type(m) in kinds]
    calls: dict[nn.Module, int] = {}
    produced_by: dict[int, nn.Module] = {}  # id of a producer's output -> the producer
    keep: list[torch.Tensor] = []  # keeps ids unique while the model runs
    fed: dict[nn.Module, int] = {}  # consumer -> id of its input
    settled: dict[int, int] = {}  # uses of outputs that an in-place consumer overwrote
    mode = _TensorUses()

    def after_producer(producer: nn.Module, args: tuple, output: torch.Tensor) -> None:
        calls[producer] = calls.get(producer, 0) + 1
        produced_by[id(output)] = producer
        mode.uses[id(output)] = 0
        keep.append(output)

    def before_consumer(consumer: nn.Module, args: tuple) -> None:
        calls[consumer] = calls.get(consumer, 0) + 1
        fed[consumer] = id(args[0])
        keep.append(args[0])
        mode.paused = True  # the consumer's own use of its input does not count

    def after_consumer(consumer: nn.Module, args: tuple, output: torch.Tensor) -> None:
        mode.paused = False
        if output is args[0] and id(output) in mode.uses:
            # in place (ReLU(inplace=True)): later uses of this tensor see the consumer's
            # output, not the producer's
            settled[id(output)] = mode.uses.pop(id(output))

    handles = [m.register_forward_hook(after_producer) for m in producing]
    handles += [m.register_forward_pre_hook(before_consumer) for m in consumers]
    handles += [m.register_forward_hook(after_consumer) for m in consumers]
    param = next(model.parameters())
    x = torch.zeros(1, model.in_chans, 32, 32, device=param.device, dtype=param.dtype)
    try:
        with mode:
            model(x)
    finally:
        for handle in handles:
            handle.remove()

    uses = mode.uses | settled
    consumers_of = Counter(fed.values())
    pairs = []
    for consumer, source in fed.items():
        producer = produced_by.get(source)
        if producer is None or calls[producer] != 1 or calls[consumer] != 1:
            continue  # not after a producer, or a module that runs twice
        if uses[source] or consumers_of[source] > 1:
            continue  # the output is used elsewhere too
        pairs.append((producer, consumer))
    return pairs


def _fold_norm_into_conv(conv: nn.Conv2d, norm: _BatchNorm) -> None:
    # norm(conv(x)) = scale * (w * x + b - mean) + beta, with scale = gamma / sqrt(var + eps)
    scale, shift = _norm_scale_shift(norm)
    bias = conv.bias if conv.bias is not None else torch.zeros_like(norm.running_mean)
    conv.weight.copy_(conv.weight * scale.reshape(-1, 1, 1, 1))
    conv.bias = nn.Parameter(bias * scale + shift, requires_grad=conv.weight.requires_grad)


def _norm_scale_shift(norm: _BatchNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """(a, b) with norm(x) = a * x + b per channel in eval mode."""
    scale = torch.rsqrt(norm.running_var + norm.eps)
    shift = -norm.running_mean * scale
    if norm.affine:
        scale, shift = scale * norm.weight, shift * norm.weight + norm.bias
    return scale, shift


def _fold_pre_activations(model: Backbone, names: dict[nn.Module, str]) -> None:
    """Fold each BatchNorm -> ReLU -> unpadded conv chain (every output sole-used) into the
    conv, leaving a `ClampInput` in the norm's place and an Identity in the ReLU's."""
    after_norm = {
        relu: norm
        for norm, relu in _sole_consumers(model, (nn.ReLU,), producers=(_BatchNorm,))
        if norm.running_mean is not None
    }
    for relu, conv in _sole_consumers(model, (nn.Conv2d,), producers=(nn.ReLU,)):
        norm = after_norm.get(relu)
        if (
            norm is None
            or any(conv.padding)
            or norm.num_features != conv.in_channels
            or not FusedConv2d.supports(conv)
        ):
            continue
        low, high = _fold_norm_relu_into_conv(norm, conv)
        model.set_submodule(names[norm], ClampInput(low, high))
        model.set_submodule(names[relu], nn.Identity())


def _fold_norm_relu_into_conv(norm: _BatchNorm, conv: nn.Conv2d) -> tuple[Tensor, Tensor]:
    # relu(a x + b) = a * clamp(x, -b/a) + b, clamped from below for a > 0 and from above for
    # a < 0 (for a = 0 it is the constant relu(b)). The conv is linear and unpadded, so
    # conv(a * c + b) = conv_{w * a}(c) + conv_w(b): a scales the weight's input channels, and
    # the constant b becomes bias (the conv of a constant map, one output position).
    scale, shift = (t.double() for t in _norm_scale_shift(norm))
    limit = -shift / torch.where(scale == 0, 1.0, scale)
    inf = torch.full_like(limit, math.inf)
    low = torch.where(scale > 0, limit, torch.where(scale < 0, -inf, 0.0))
    high = torch.where(scale < 0, limit, torch.where(scale > 0, inf, 0.0))
    constant = torch.where(scale == 0, shift.clamp(min=0), shift)
    weight = conv.weight.double()
    span = [(k - 1) * d + 1 for k, d in zip(conv.kernel_size, conv.dilation, strict=True)]
    constant_map = constant.reshape(1, -1, 1, 1).expand(1, -1, *span)  # one output position
    bias = F.conv2d(constant_map, weight, dilation=conv.dilation, groups=conv.groups)
    bias = bias.reshape(-1)  # conv_w(b)
    if conv.bias is not None:
        bias = bias + conv.bias.double()
    per_input = scale.reshape(conv.groups, 1, -1, 1, 1)  # input channel c = group * in/g + i
    weight = (weight.reshape(conv.groups, -1, *weight.shape[1:]) * per_input).reshape_as(weight)
    conv.weight.copy_(weight)
    conv.bias = nn.Parameter(bias.to(conv.weight.dtype), requires_grad=conv.weight.requires_grad)
    dtype = conv.weight.dtype
    return low.to(dtype), high.to(dtype)


@contextmanager
def _restore_running_stats(module: nn.Module) -> Iterator[None]:
    norms = [m for m in module.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]
    saved = [{k: v.clone() for k, v in m.named_buffers(recurse=False)} for m in norms]
    try:
        yield
    finally:
        with torch.no_grad():
            for norm, buffers in zip(norms, saved, strict=True):
                for key, value in buffers.items():
                    getattr(norm, key).copy_(value)


def _keep_norm_stats_on_recompute(
    stage: nn.Module,
) -> tuple[AbstractContextManager, AbstractContextManager]:
    # The backward pass re-runs the stage in train mode; without this, every BatchNorm
    # would update its running statistics a second time for the same batch.
    return nullcontext(), _restore_running_stats(stage)


# ---------------------------------------------------------------------------------- registry


# Per-channel RGB statistics of ImageNet, which every family's pretrained weights (torchvision's
# and the timm ones we convert) were trained on.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class _Entry:
    fn: Callable[..., Backbone]
    sources: dict[str, str] = field(default_factory=dict)  # library -> its model name
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD


_REGISTRY: dict[str, _Entry] = {}


def register_backbone(
    *,
    torchvision: bool = True,
    timm: str | None = None,
    mean: tuple[float, float, float] = IMAGENET_MEAN,
    std: tuple[float, float, float] = IMAGENET_STD,
) -> Callable[[Callable[..., Backbone]], Callable[..., Backbone]]:
    """Register a constructor under its function name.

    Args:
        torchvision: whether torchvision has the same network under the same name.
        timm: timm's name for the same network, if it has one.
        mean, std: per-channel RGB statistics (of inputs in [0, 1]) that its pretrained
            weights expect images to be normalised with.
    """

    def decorator(fn: Callable[..., Backbone]) -> Callable[..., Backbone]:
        if fn.__name__ in _REGISTRY:
            raise ValueError(f"backbone {fn.__name__!r} is already registered")
        sources = {"torchvision": fn.__name__} if torchvision else {}
        if timm is not None:
            sources["timm"] = timm
        _REGISTRY[fn.__name__] = _Entry(fn=fn, sources=sources, mean=mean, std=std)
        return fn

    return decorator


def list_backbones(pattern: str | None = None) -> list[str]:
    """Registered names, sorted; `pattern` is a shell-style filter such as `"resne*"`."""
    names = sorted(_REGISTRY, key=_natural_key)  # resnet18 before resnet101
    return [n for n in names if fnmatch.fnmatch(n, pattern)] if pattern else names


def _natural_key(name: str) -> list[int | str]:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def input_normalization(name: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) per RGB channel, for inputs in [0, 1], that backbone `name`'s weights expect."""
    entry = get_entry(name)
    return entry.mean, entry.std


def get_entry(name: str) -> _Entry:
    if name not in _REGISTRY:
        close = difflib.get_close_matches(name, _REGISTRY, n=5, cutoff=0.5)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        raise ValueError(
            f"unknown backbone {name!r}.{hint} `list_backbones()` (or `python -m backbones "
            "list`) shows all names."
        )
    return _REGISTRY[name]


def create(
    name: str, *, pretrained: Pretrained | None = None, strict: bool = True, **kwargs
) -> Backbone:
    """Build a registered backbone, optionally with pretrained weights.

    Args:
        name: a registered name, e.g. "resnet50" (see `list_backbones()`).
        pretrained: "torchvision" or "timm" (downloaded through that library), a path to a
            .pth/.pt/.safetensors file (torchvision's, timm's or ours), or a state dict.
        strict: with False, load what matches and warn about the rest instead of raising.
        **kwargs: the family's constructor arguments (out_features, in_chans,
            frozen_stages, norm_eval, drop_path_rate, norm_layer, ...); one the family does
            not take is a TypeError that lists those it does.
    """
    entry = get_entry(name)
    _check_arguments(name, entry, kwargs)
    model = entry.fn(**kwargs)
    if pretrained is not None:
        from .weights import load_pretrained  # weights imports this module

        load_pretrained(model, name, pretrained, strict=strict)
    return model


def _family(entry: _Entry) -> type[Backbone] | None:
    """The class a registered constructor builds, from its return annotation."""
    try:
        family = typing.get_type_hints(entry.fn).get("return")
    except (NameError, TypeError):  # unresolvable annotations: no check, Python's error stands
        return None
    return family if isinstance(family, type) and issubclass(family, Backbone) else None


def _arguments(family: type[Backbone]) -> list[str] | None:
    """The options `family.__init__` takes by keyword, or None when it takes **kwargs.

    Arguments without a default (the variant's cfg) are the registered constructor's to pass.
    """
    params = inspect.signature(family.__init__).parameters.values()
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return None
    keyword = (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return [p.name for p in params if p.kind in keyword and p.default is not p.empty]


def _check_arguments(name: str, entry: _Entry, kwargs: Mapping[str, object]) -> None:
    # Families differ in their options (memory_efficient, drop_path_rate, ...): say which
    # ones this family has, and which families have the one asked for, instead of Python's
    # bare "unexpected keyword argument".
    family = _family(entry)
    accepted = _arguments(family) if family is not None else None
    if accepted is None:
        return
    for key in kwargs:
        if key in accepted:
            continue
        others = sorted(
            {
                f.__name__
                for f in map(_family, _REGISTRY.values())
                if f is not None and key in (_arguments(f) or ())
            }
        )
        close = difflib.get_close_matches(key, accepted, n=1)
        if others:
            hint = f"{key!r} is an argument of {', '.join(others)}, not of {family.__name__}. "
        elif close:
            hint = f"Did you mean {close[0]!r}? "
        else:
            hint = ""
        raise TypeError(
            f"{name} got an unexpected keyword argument {key!r}. {hint}"
            f"{family.__name__} takes: {', '.join(accepted)}."
        )

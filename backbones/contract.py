"""The backbone contract: a stem plus stages returning a dict of named levels.

What every family builds on and every head relies on: `FeatureInfo` (a level's name,
channels and stride), `Backbone` (level bookkeeping, `out_features`, freezing, `norm_eval`,
grad checkpointing) and `ClassifierCfg` (the reference classifier, as data for the heads).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field, replace
from functools import partial

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.checkpoint import checkpoint

from .fuse import fuse_batchnorm, fused_training_error, has_folded_norms
from .layers import LayerFn

DEFAULT_OUT_FEATURES = ("C3", "C4", "C5")

# (regex fully matching a source key, replacement in our key space or None to drop the key)
Rules = tuple[tuple[str, str | None], ...]


@dataclass(frozen=True)
class FeatureInfo:
    """One pyramid level: its name `C<k>`, channel count and stride (2**k, less if dilated).

    It also answers timm's dict keys, `info["num_chs"]`, `info["reduction"]` and
    `info["module"]` (the path of the module that outputs the level: `stem`, `stages.<i>`;
    not compared, it says where the level comes from, not what it is).
    """

    name: str
    channels: int
    stride: int
    module: str = field(default="", compare=False)

    def __getitem__(self, key: str) -> str | int:
        if key not in TIMM_KEYS:
            raise KeyError(f"FeatureInfo has no {key!r}; its keys are {list(TIMM_KEYS)}")
        return getattr(self, TIMM_KEYS[key])

    def get(self, key: str, default: object = None) -> object:
        """`info[key]`, or `default` for a key it does not have (as a timm feature dict)."""
        return self[key] if key in TIMM_KEYS else default

    def keys(self) -> list[str]:
        """timm's keys (so `dict(info)` is timm's feature dict, plus our `name`)."""
        return list(TIMM_KEYS)


# timm's feature-dict key -> FeatureInfo attribute
TIMM_KEYS = {"num_chs": "channels", "reduction": "stride", "module": "module", "name": "name"}


class FeatureInfoList(list[FeatureInfo]):
    """`Backbone.feature_info`: every level the backbone has, answering timm's questions too.

    It is a list of `FeatureInfo`, fine to coarse, indexed as timm indexes its levels. Like
    timm's `FeatureInfo` of a `features_only` model, `channels()`, `reduction()` (the stride),
    `module_name()` and `get_dicts()` describe the levels the backbone returns
    (`out_features`; their positions are `out_indices`), in the order `forward` returns them,
    or, given `idx`, the levels at those list positions. So code written for timm's feature
    extractors reads ours unchanged; `heads.FeatureList` returns the maps as a list.
    """

    def __init__(self, out_features: Sequence[str], levels: Sequence[FeatureInfo] = ()) -> None:
        super().__init__(levels)
        self.out_features = tuple(out_features)

    @property
    def out_indices(self) -> tuple[int, ...]:
        """The positions of the returned levels (timm's `out_indices`)."""
        return tuple(self._returned())

    def under(self, prefix: str) -> FeatureInfoList:
        """The same levels with `prefix.` before each module path: for a model that holds the
        backbone as its `prefix` attribute."""
        moved = [replace(info, module=f"{prefix}.{info.module}") for info in self]
        return FeatureInfoList(self.out_features, moved)

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

    def module_name(self, idx: int | Sequence[int] | None = None) -> list[str] | str:
        """Paths of the modules that output the returned levels (or level `idx`)."""
        return self.get("module", idx)

    def _returned(self) -> list[int]:
        return [i for i, info in enumerate(self) if info.name in self.out_features]

    def _as_dict(self, index: int, keys: Sequence[str] | None) -> dict[str, object]:
        info = self[index]
        unknown = [k for k in keys or () if k not in TIMM_KEYS]
        if unknown:
            raise KeyError(f"feature_info has no {unknown}; its keys are {list(TIMM_KEYS)}")
        return {k: info[k] for k in (TIMM_KEYS if keys is None else keys)}


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

    The contract's arguments are taken here, once, and mean the same in every family; a
    family's constructor takes its own options and passes `**common` on. A family without
    stochastic depth or dilation lists the argument in `unsupported`: it then accepts only
    the value that asks for nothing (`drop_path_rate=0`, `output_stride=32`).

    Args:
        out_features: levels to return, e.g. ("C3", "C4", "C5"); any of `feature_info`'s.
        in_chans: input channels.
        frozen_stages: -1 nothing, 0 the stem, k the stem and the first k stages: no
            gradients, and their BatchNorms stay in eval mode.
        norm_eval: keep every BatchNorm in eval mode while training.
        norm_layer: the norm, called with a channel count; None for the family's default.
        drop_path_rate: stochastic depth of the residual blocks, rising over the blocks to
            this rate, in [0, 1).
        output_stride: 32, or 16 / 8 to dilate the stages past that stride instead of
            striding them (DeepLab, Chen et al. 2017); the levels keep their names, and
            `feature_info`, `channels`, `strides` report their real strides.
    """

    # Source library -> rules that turn its classifier state dict into ours; a family whose
    # rules depend on the variant (e.g. VGG's `features.<i>` numbering, a number of blocks)
    # sets them per instance.
    weight_rules: Mapping[str, Rules] = {}
    # What `heads.build_classifier` puts on top to rebuild the reference classifier; a family
    # whose variants differ (e.g. in dropout) sets it per instance.
    classifier_cfg: ClassifierCfg = ClassifierCfg()
    # Common arguments this family does not have (no residual blocks to drop, say).
    unsupported: tuple[str, ...] = ()

    def __init__(
        self,
        *,
        out_features: Sequence[str] = DEFAULT_OUT_FEATURES,
        in_chans: int = 3,
        frozen_stages: int = -1,
        norm_eval: bool = False,
        norm_layer: LayerFn | None = None,
        drop_path_rate: float = 0.0,
        output_stride: int = 32,
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
        if not 0.0 <= drop_path_rate < 1.0:
            raise ValueError(f"drop_path_rate must be in [0, 1), got {drop_path_rate}")
        if output_stride not in (8, 16, 32):
            raise ValueError(
                f"output_stride must be 8, 16 or 32 (the stride of C5, dilated past it), got "
                f"{output_stride!r}"
            )
        asked = {"drop_path_rate": drop_path_rate, "output_stride": output_stride}
        refused = [k for k in self.unsupported if asked[k] != COMMON_DEFAULTS[k]]
        if refused:
            raise TypeError(
                f"{type(self).__name__} has no {refused[0]} (got {asked[refused[0]]!r}); "
                f"leave it at {COMMON_DEFAULTS[refused[0]]!r}"
            )
        self.out_features = tuple(out_features)
        self.in_chans = in_chans
        self.frozen_stages = frozen_stages
        self.norm_eval = norm_eval
        self.norm_layer = norm_layer
        self.drop_path_rate = drop_path_rate
        self.output_stride = output_stride
        self.feature_info = FeatureInfoList(self.out_features)
        self._level_module: dict[str, int] = {}  # level name -> index in (stem, *stages)
        self._grad_checkpointing = False

    def add_level(self, channels: int, stride: int) -> None:
        """Record that the module built last (the stem or the newest stage) outputs a level.

        `stride` is the module's stride without dilation, 2**k for `Ck`: it names the level,
        which keeps its name when `output_stride` dilates it; `feature_info` records the real
        stride, min(stride, output_stride). Called again for the same stride, the later module
        replaces the earlier one: `Ck` is the last module whose output has stride 2**k.
        """
        k = int(math.log2(stride))
        if 2**k != stride:
            raise ValueError(f"level strides must be powers of two, got {stride}")
        name = f"C{k}"
        built = len(self.stages) if hasattr(self, "stages") else 0
        if name in self._level_module:
            self.feature_info[:] = [f for f in self.feature_info if f.name != name]
        real = min(stride, self.output_stride)
        module = f"stages.{built - 1}" if built else "stem"
        self.feature_info.append(FeatureInfo(name, channels, real, module))
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
        if mode and has_folded_norms(self):  # checked first, so a refusal changes nothing
            raise RuntimeError(fused_training_error(type(self).__name__))
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
                context_fn = partial(keep_norm_stats_on_recompute, stage)
                x = checkpoint(stage, x, use_reentrant=False, context_fn=context_fn)
            else:
                x = stage(x)
            if index in self._taps:
                features[self._taps[index]] = x
        return features

    def fuse(self) -> Backbone:
        """Fold every BatchNorm that directly follows a conv into it, for inference (eval mode);
        returns `self` in channels_last. See `backbones.fuse.fuse_batchnorm`."""
        return fuse_batchnorm(self)

    def input_conv_name(self) -> str:
        """Qualified name of the first convolution, the one that sees `in_chans` channels."""
        for name, module in self.named_modules():
            if isinstance(module, nn.Conv2d):
                return name
        raise RuntimeError(f"{type(self).__name__} has no Conv2d")


# The contract's arguments, each with the value that asks for nothing (its default).
COMMON_DEFAULTS: dict[str, object] = {
    name: param.default
    for name, param in inspect.signature(Backbone.__init__).parameters.items()
    if param.kind is param.KEYWORD_ONLY
}


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


def keep_norm_stats_on_recompute(
    stage: nn.Module,
) -> tuple[AbstractContextManager, AbstractContextManager]:
    """`context_fn` for `torch.utils.checkpoint`: the recomputation leaves norm statistics alone."""
    # The backward pass re-runs the stage in train mode; without this, every BatchNorm
    # would update its running statistics a second time for the same batch.
    return nullcontext(), _restore_running_stats(stage)

"""The registry: `register_backbone`, `list_backbones`, `get_entry` and the argument checks.

Each family registers its variants' constructors under their torchvision names, with the
libraries that have the same network and the input statistics their weights expect.
"""

from __future__ import annotations

import difflib
import fnmatch
import inspect
import re
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from .contract import COMMON_DEFAULTS, Backbone

# Per-channel RGB statistics of ImageNet, which every family's pretrained weights (torchvision's
# and the timm ones we convert) were trained on.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Entry:
    """A registered constructor, the libraries with the same network, its input statistics."""

    fn: Callable[..., Backbone]
    sources: dict[str, str] = field(default_factory=dict)  # library -> its model name
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    @property
    def family(self) -> type[Backbone] | None:
        """The class the constructor builds, from its return annotation (None if it has none)."""
        try:
            family = typing.get_type_hints(self.fn).get("return")
        except (NameError, TypeError):  # unresolvable annotations: no check, Python's error stands
            return None
        return family if isinstance(family, type) and issubclass(family, Backbone) else None


_REGISTRY: dict[str, Entry] = {}


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
        _REGISTRY[fn.__name__] = Entry(fn=fn, sources=sources, mean=mean, std=std)
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


def get_entry(name: str) -> Entry:
    """The registry entry of `name`; an unknown name is an error that lists close matches."""
    if name not in _REGISTRY:
        close = difflib.get_close_matches(name, _REGISTRY, n=5, cutoff=0.5)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        raise ValueError(
            f"unknown backbone {name!r}.{hint} `list_backbones()` (or `python -m backbones "
            "list`) shows all names."
        )
    return _REGISTRY[name]


def family_arguments(family: type[Backbone]) -> list[str] | None:
    """The options `family` takes by keyword: the contract's (less those it lacks), then its own.

    A family constructor passes `**common` on to `Backbone`; arguments without a default (the
    variant's cfg) are the registered constructor's to pass. None: no signature to check.
    """
    params = inspect.signature(family.__init__).parameters.values()
    keyword = (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    own = [p.name for p in params if p.kind in keyword and p.default is not p.empty]
    if not any(p.kind is p.VAR_KEYWORD for p in params):
        return own
    if not issubclass(family, Backbone):
        return None
    common = [name for name in COMMON_DEFAULTS if name not in family.unsupported]
    return [*common, *(name for name in own if name not in common)]


def check_arguments(name: str, kwargs: Mapping[str, object]) -> None:
    """Raise a TypeError naming the options of `name`'s family for one it does not take.

    A contract argument the family lacks (`drop_path_rate` of VGG) passes when it asks for
    nothing: the family builds what it would without it.
    """
    # Families differ in their options (memory_efficient, drop_path_rate, ...): say which
    # ones this family has, and which families have the one asked for, instead of Python's
    # bare "unexpected keyword argument".
    family = get_entry(name).family
    accepted = family_arguments(family) if family is not None else None
    if accepted is None:
        return
    for key, value in kwargs.items():
        if key in accepted or (key in COMMON_DEFAULTS and value == COMMON_DEFAULTS[key]):
            continue
        raise TypeError(_unknown_argument(name, family, key, accepted))


def _unknown_argument(name: str, family: type[Backbone], key: str, accepted: list[str]) -> str:
    """The message for backbone `name` asked for an option `key` it does not have."""
    others = sorted(
        {
            entry.family.__name__
            for entry in _REGISTRY.values()
            if entry.family is not None and key in (family_arguments(entry.family) or ())
        }
    )
    close = difflib.get_close_matches(key, accepted, n=1)
    if others:
        hint = f"{key!r} is an argument of {', '.join(others)}, not of {family.__name__}. "
    elif close:
        hint = f"Did you mean {close[0]!r}? "
    else:
        hint = ""
    return (
        f"{name} got an unexpected keyword argument {key!r}. {hint}"
        f"{family.__name__} takes: {', '.join(accepted)}."
    )

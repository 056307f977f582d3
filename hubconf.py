"""torch.hub entry points: every registered backbone, and `build_classifier`.

    torch.hub.load("<checkout or owner/repo>", "resnet50", pretrained="torchvision")
    torch.hub.load(repo, "resnet50", source="local", pretrained=True, out_features=("C4", "C5"))
    torch.hub.load(repo, "build_classifier", backbone="resnet18", num_classes=10)
    torch.hub.list(repo)                   # the backbones' names and build_classifier
    print(torch.hub.help(repo, "convnext_tiny"))

Each backbone entry is `backbones.create(<name>, pretrained=..., **kwargs)`; `pretrained=True`
fetches the weights of the first library that has the network (torchvision, else timm), as
torchvision's and timm's hub entries do. Only the core install is needed: torch, torchvision,
safetensors (no Lightning, no Hydra).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import backbones as _backbones
from backbones.registry import family_arguments as _family_arguments
from heads import build_classifier

if TYPE_CHECKING:  # torch.hub lists every public callable of this module: only the entries
    import os
    from collections.abc import Callable, Mapping
    from typing import Any

    from backbones import Backbone

dependencies = ["torch", "torchvision", "safetensors"]

__all__ = ["build_classifier", *_backbones.list_backbones()]


def _entrypoint(name: str) -> Callable[..., Backbone]:
    entry = _backbones.get_entry(name)
    sources = list(entry.sources)
    options = _family_arguments(entry.family) or []

    def entrypoint(
        pretrained: bool | str | os.PathLike | Mapping[str, Any] | None = None, **kwargs: Any
    ) -> Backbone:
        if pretrained is True:
            pretrained = sources[0]
        elif pretrained is False:
            pretrained = None
        return _backbones.create(name, pretrained=pretrained, **kwargs)

    entrypoint.__name__ = entrypoint.__qualname__ = name
    entrypoint.__doc__ = (
        f"The {name} backbone: backbones.create({name!r}, pretrained=..., **kwargs).\n\n"
        f"pretrained: True ({sources[0] if sources else 'no library has it'}'s weights), "
        f"{' or '.join(repr(s) for s in sources) or 'no library name'}, or a .pth/.pt/"
        f".safetensors file; kwargs: {', '.join(options)} (out_features defaults to ('C3', "
        "'C4', 'C5')). Returns a backbone whose forward gives {level: feature map}; .channels "
        "and .strides describe the levels."
    )
    return entrypoint


globals().update({name: _entrypoint(name) for name in _backbones.list_backbones()})

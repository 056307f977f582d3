"""Pretrained weights: converting torchvision/timm keys into ours, downloading, loading.

Our key space is that of `heads.build_classifier(name)`: `backbone.*` and `head.*`.
Conversion is key by key from rules each family declares (`Backbone.weight_rules`); every
source key must be matched, and the backbone keys must come out complete and of the right
shapes, or a `WeightsError` names the offending keys. Nothing is loaded until all checks pass.
Reading and writing the files is `files.py`'s.
"""

from __future__ import annotations

import math
import os
import re
import warnings
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from .contract import Backbone, Rules
from .files import (  # WeightsError and read_state_dict are also users' names for them here
    StateDict,
    WeightsError,
    check_file_metadata,
    first_line,
    name_list,
    read_state_dict,
    save_safetensors,
    unwrap_state_dict,
)
from .registry import get_entry

Pretrained = str | os.PathLike | Mapping[str, torch.Tensor]

SOURCES = ("torchvision", "timm")


# ---------------------------------------------------------------------------- converting


def convert(
    name: str,
    state_dict: Mapping[str, torch.Tensor],
    source: str = "torchvision",
    **backbone_kwargs,
) -> StateDict:
    """Rename a torchvision or timm classifier's state dict into `build_classifier(name)`'s keys.

    `backbone_kwargs` are the constructor arguments the weights were made for, where they
    change the architecture (e.g. `width_mult=0.5`). Raises `WeightsError` naming every source
    key no rule matches, and every backbone key that is missing or has the wrong shape (a
    checkpoint of another architecture).
    """
    _library_name(name, source)
    reference = _meta_backbone(name, **backbone_kwargs)
    converted, unmatched = _apply_rules(state_dict, reference.weight_rules[source])
    if unmatched:
        raise WeightsError(
            f"{len(unmatched)} keys of this checkpoint are not part of {source}'s {name}: "
            f"{name_list(unmatched)}. Is it a checkpoint of another architecture?"
        )
    converted = _fit_singleton_dims(converted, reference)
    _check_backbone(name, converted, reference)
    return converted


def to_ours(name: str, state_dict: Mapping[str, torch.Tensor]) -> StateDict:
    """Bring a state dict in any supported layout (ours, torchvision's, timm's) to our keys."""
    keys = list(state_dict)
    if all(k.startswith(("backbone.", "head.")) for k in keys):
        ours = dict(state_dict)
    elif all(k.startswith(("stem.", "stages.")) for k in keys):
        ours = {f"backbone.{k}": v for k, v in state_dict.items()}
    else:
        entry, reference = get_entry(name), _meta_backbone(name)
        attempts = {
            source: _apply_rules(state_dict, reference.weight_rules[source])
            for source in entry.sources
        }
        matched = [source for source, (_, unmatched) in attempts.items() if not unmatched]
        if not matched:
            _, (_, unmatched) = min(attempts.items(), key=lambda kv: len(kv[1][1]))
            raise WeightsError(
                f"this checkpoint is neither ours nor {' / '.join(attempts) or 'any library'}'s "
                f"{name}: {len(unmatched)} of its {len(keys)} keys are unknown, e.g. "
                f"{name_list(unmatched)}. Is it a checkpoint of another architecture?"
            )
        ours = _fit_singleton_dims(attempts[matched[0]][0], reference)
        _check_backbone(name, ours, reference)
    # Our own checkpoints may come from a model built with other arguments (fewer stages,
    # other in_chans): `load_into` checks them against the model they are loaded into.
    return ours


def _apply_rules(
    state_dict: Mapping[str, torch.Tensor], rules: Rules
) -> tuple[StateDict, list[str]]:
    compiled = [(re.compile(pattern), target) for pattern, target in rules]
    converted: StateDict = {}
    unmatched = []
    for key, value in state_dict.items():
        for pattern, target in compiled:
            match = pattern.fullmatch(key)
            if match:
                if target is not None:  # None: a key the family accounts for and drops
                    converted[match.expand(target)] = value
                break
        else:
            unmatched.append(key)
    return converted, unmatched


def _library_name(name: str, source: str) -> str:
    """That library's name for the backbone, or an error saying which libraries have it."""
    if source not in SOURCES:
        raise ValueError(f"source must be one of {SOURCES}, got {source!r}")
    sources = get_entry(name).sources
    if source not in sources:
        raise WeightsError(
            f"{name} has no {source} counterpart with the same architecture; "
            f"weights convert from: {', '.join(sources) or 'none'}"
        )
    return sources[source]


def _meta_backbone(name: str, **kwargs) -> Backbone:
    # Shapes and keys only: building on the meta device allocates nothing.
    with torch.device("meta"):
        return get_entry(name).fn(**{**kwargs, "out_features": ("C5",)})


def _fit_singleton_dims(ours: StateDict, reference: Backbone) -> StateDict:
    """Reshape tensors that differ from ours only by size-1 dims, e.g. a per-channel scale
    stored as (C, 1, 1) by torchvision and (C,) by timm: same values, same order."""
    expected = {f"backbone.{k}": v.shape for k, v in reference.state_dict().items()}
    fitted = dict(ours)
    for key, value in ours.items():
        shape = expected.get(key)
        if (
            shape is not None
            and value.shape != shape
            and [n for n in value.shape if n != 1] == [n for n in shape if n != 1]
        ):
            fitted[key] = value.reshape(shape)
    return fitted


def _check_backbone(name: str, ours: Mapping[str, torch.Tensor], reference: Backbone) -> None:
    expected = {f"backbone.{k}": v.shape for k, v in reference.state_dict().items()}
    got = {k: v.shape for k, v in ours.items() if k.startswith("backbone.")}
    problems = _diff(expected, got)
    if problems:
        raise WeightsError(f"these weights do not fit {name}: {problems}")


def _diff(expected: Mapping[str, torch.Size], got: Mapping[str, torch.Size]) -> str:
    missing = [k for k in expected if k not in got]
    unexpected = [k for k in got if k not in expected]
    wrong = [
        f"{k} {tuple(got[k])} vs {tuple(expected[k])}"
        for k in expected
        if k in got and got[k] != expected[k]
    ]
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing ({name_list(missing)})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected ({name_list(unexpected)})")
    if wrong:
        parts.append(f"{len(wrong)} of the wrong shape (checkpoint vs model: {name_list(wrong)})")
    return "; ".join(parts)


# ------------------------------------------------------------------------------- loading


def download(name: str, source: str) -> StateDict:
    """Fetch the reference classifier's weights through torchvision or timm (needs internet)."""
    library_name = _library_name(name, source)
    if source == "torchvision":
        import torchvision

        weights = torchvision.models.get_model_weights(library_name).DEFAULT
        where = weights.url
        fetch = lambda: weights.get_state_dict(progress=True, check_hash=True)  # noqa: E731
    else:
        import timm

        hub_id = timm.models.get_pretrained_cfg(library_name).hf_hub_id
        where = f"https://huggingface.co/{hub_id}" if hub_id else f"timm's {library_name}"
        fetch = lambda: timm.create_model(library_name, pretrained=True).state_dict()  # noqa: E731
    try:
        return fetch()
    except Exception as e:  # network errors differ by library and version
        raise WeightsError(
            f"could not download {source}'s {name} weights from {where} ({first_line(e)}). "
            "If this machine is offline: on one with internet run `python -m backbones "
            f"fetch-weights {name} --source {source} --out DIR`, copy the .safetensors file "
            "it writes here and pass its path as `pretrained=` (a file downloaded by hand from "
            "the address above works too)."
        ) from e


def fetch_weights(name: str, source: str, out_dir: str | os.PathLike) -> Path:
    """Download, convert to our keys and save as `<out_dir>/<name>-<source>.safetensors`."""
    ours = to_ours(name, download(name, source))
    path = Path(out_dir) / f"{name}-{source}.safetensors"
    return save_safetensors(ours, path, metadata={"backbone": name, "source": source})


def resolve(name: str, pretrained: Pretrained) -> StateDict:
    """`pretrained` (a source, a file or a state dict) -> state dict in our key space."""
    if isinstance(pretrained, Mapping):
        raw = unwrap_state_dict(pretrained, origin="the state dict passed as pretrained")
    elif isinstance(pretrained, str) and pretrained in SOURCES:
        raw = download(name, pretrained)
    elif isinstance(pretrained, str | os.PathLike):
        check_file_metadata(name, Path(pretrained))
        raw = read_state_dict(pretrained)
    else:
        raise TypeError(
            "pretrained must be 'torchvision', 'timm', a file path or a state dict, "
            f"got {type(pretrained).__name__}"
        )
    return to_ours(name, raw)


def backbone_part(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The backbone's keys of a converted state dict ("backbone.*"), without the prefix: what
    `Backbone.load_state_dict` takes."""
    return {
        k.removeprefix("backbone."): v for k, v in state_dict.items() if k.startswith("backbone.")
    }


def load_pretrained(
    model: Backbone, name: str, pretrained: Pretrained, strict: bool = True
) -> None:
    """Load weights into a backbone built by `create(name, ...)`; the head's keys are dropped."""
    state_dict = backbone_part(resolve(name, pretrained))
    # Stages past the coarsest requested level are not kept: their weights have no home.
    built = len(model.stages)
    state_dict = {
        k: v
        for k, v in state_dict.items()
        if not (k.startswith("stages.") and int(k.split(".")[1]) >= built)
    }
    adapt_input_conv(model, state_dict)
    load_into(model, state_dict, strict=strict, origin=f"pretrained {name} weights")


def adapt_input_conv(model: Backbone, state_dict: StateDict) -> None:
    """Fit RGB stem weights to `model.in_chans`: summed for 1 channel, repeated and rescaled else."""
    key = f"{model.input_conv_name()}.weight"
    weight = state_dict.get(key)
    if weight is None or weight.shape[1] == model.in_chans:
        return
    if weight.shape[1] != 3:
        raise WeightsError(
            f"can only adapt a 3-channel stem to in_chans={model.in_chans}; "
            f"{key} has {weight.shape[1]} input channels"
        )
    if model.in_chans == 1:
        adapted = weight.sum(dim=1, keepdim=True)
    else:
        repeats = math.ceil(model.in_chans / 3)
        adapted = weight.repeat(1, repeats, 1, 1)[:, : model.in_chans] * (3 / model.in_chans)
    state_dict[key] = adapted


def load_into(
    module: nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    strict: bool = True,
    origin: str = "weights",
) -> None:
    """Load after checking every key and shape; with `strict=False`, load the fitting subset and warn."""
    expected = {k: v.shape for k, v in module.state_dict().items()}
    problems = _diff(expected, {k: v.shape for k, v in state_dict.items()})
    if problems and strict:
        raise WeightsError(
            f"{origin} do not fit {type(module).__name__}: {problems}. Nothing was loaded; "
            "pass strict=False to load the keys that fit."
        )
    fitting = {k: v for k, v in state_dict.items() if k in expected and v.shape == expected[k]}
    if problems:
        warnings.warn(
            f"{origin}: loaded {len(fitting)} tensors, skipped the rest: {problems}", stacklevel=3
        )
    module.load_state_dict(fitting, strict=not problems)

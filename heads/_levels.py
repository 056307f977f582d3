"""Level names (`C<k>`, `P<k>`: stride 2**k) and the input checks every head shares."""

from __future__ import annotations

import itertools
import re
from collections.abc import Mapping

import torch

_LEVEL = re.compile(r"([A-Z])(\d+)")


def describe(channels: Mapping[str, int]) -> str:
    """`{C3: 512, C4: 1024}` style: the levels and their channels, for error messages."""
    return "{" + ", ".join(f"{name}: {c}" for name, c in channels.items()) + "}"


def parse_levels(
    owner: str, in_channels: Mapping[str, int], prefix: str | None = None
) -> list[int]:
    """The level indices k of `in_channels`, checked to be `<prefix><k>` names of consecutive strides.

    Returns the indices fine to coarse; `in_channels` must already be ordered that way
    (as `backbone.channels` and `FPN.channels` are).
    """
    if not isinstance(in_channels, Mapping) or not in_channels:
        raise ValueError(
            f"{owner} takes in_channels as a non-empty dict of levels to channels, such as "
            f"backbone.channels = {{'C3': 512, 'C4': 1024, 'C5': 2048}}; got {in_channels!r}"
        )
    matches = {name: _LEVEL.fullmatch(name) for name in in_channels}
    prefixes = {m.group(1) for m in matches.values() if m}
    bad = [name for name, m in matches.items() if m is None]
    if bad or len(prefixes) != 1 or (prefix is not None and prefixes != {prefix}):
        form = f"{prefix}<k>" if prefix else "C<k> (or P<k>), all with the same letter,"
        raise ValueError(
            f"{owner} expects levels named {form} with stride 2**k; got {list(in_channels)}"
        )
    bad_channels = {n: c for n, c in in_channels.items() if not isinstance(c, int) or c < 1}
    if bad_channels:
        raise ValueError(f"{owner} needs positive int channel counts; got {in_channels!r}")
    indices = [int(m.group(2)) for m in matches.values()]
    if any(b != a + 1 for a, b in itertools.pairwise(indices)):
        strides = ", ".join(
            f"{name} (stride {2**k})" for name, k in zip(in_channels, indices, strict=True)
        )
        raise ValueError(
            f"{owner} needs consecutive levels, fine to coarse, each with twice the stride of "
            f"the one before; got {strides}. Build the backbone with consecutive out_features, "
            "e.g. ('C3', 'C4', 'C5')."
        )
    return indices


def check_undilated(owner: str, strides: Mapping[str, int]) -> None:
    """Refuse levels not at the stride their name says: a backbone built with `output_stride`.

    An FPN merges each level into the one twice as fine, and the detectors size anchors by
    the level's name; dilated levels share one stride and would be mislabelled.
    """
    dilated = any(stride != 2 ** int(name[1:]) for name, stride in strides.items())
    if dilated:
        levels = ", ".join(f"{name} (stride {stride})" for name, stride in strides.items())
        raise ValueError(
            f"{owner} builds an FPN, which needs each level at twice the stride of the one "
            f"before; this backbone is dilated: {levels}. Build it with output_stride=32 (the "
            "default) for an FPN; dilated levels serve heads that keep one resolution, such as "
            "DeepLabV3's (segmentation_models_pytorch's DeepLabV3Plus on a `tu-zoo_` encoder)."
        )


def check_features(
    owner: str, expected: Mapping[str, int], features: Mapping[str, torch.Tensor]
) -> None:
    """Fail with both sides named when `features` lacks a level or has the wrong channels."""
    if not isinstance(features, Mapping):
        raise ValueError(
            f"{owner} takes a dict of feature maps {describe(expected)} (name: channels); got "
            f"{type(features).__name__}"
        )
    received = {name: f.shape[1] if f.ndim == 4 else -1 for name, f in features.items()}
    missing = [name for name in expected if name not in received]
    wrong = [name for name in expected if name in received and received[name] != expected[name]]
    if missing or wrong:
        problems = []
        if missing:
            problems.append(f"missing {', '.join(missing)}")
        if wrong:
            problems.append(", ".join(f"{n} has {received[n]} channels" for n in wrong))
        raise ValueError(
            f"{owner} was built for levels {describe(expected)} (name: channels) but got "
            f"{describe(received)}: {'; '.join(problems)}. Build it from the channels of what "
            "feeds it (`backbone.channels`, `fpn.channels`); a channel count of -1 means the "
            "tensor is not (batch, channels, height, width)."
        )

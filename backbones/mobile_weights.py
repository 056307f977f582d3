"""Weight rules of the inverted-residual families (MobileNetV2/V3, EfficientNet).

torchvision numbers the stem, every block and the head conv in one `features` sequence (flat,
or nested by row for EfficientNet), so its rules are generated from the blocks as built; timm
nests blocks by row, as we do, and one set of regexes covers every variant.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from .contract import Rules
from .layers import InvertedResidual

# (block, source key prefix regex, our key prefix) -> that block's rules
BlockRules = Callable[[InvertedResidual, str, str], Rules]


def torchvision_rules(
    stages: nn.ModuleList, block_rules: BlockRules, classifier: Rules, nested: bool = False
) -> Rules:
    """Rules for torchvision's `features`: stem, blocks (flat, or nested by row), head conv."""
    rules: list[tuple[str, str | None]] = [
        (r"features\.0\.0\.weight", "backbone.stem.conv.weight"),
        (r"features\.0\.1\.(\w+)", r"backbone.stem.norm.\1"),
    ]
    index = 1
    for s, stage in enumerate(stages[:-1]):
        for b, block in enumerate(stage):
            source = rf"features\.{s + 1}\.{b}\." if nested else rf"features\.{index}\."
            rules += block_rules(block, source, f"backbone.stages.{s}.{b}.")
            index += 1
    head = len(stages) if nested else index
    rules += conv_norm_rules(rf"features\.{head}\.", f"backbone.stages.{len(stages) - 1}.")
    return (*rules, *classifier)


def conv_norm_rules(source: str, target: str) -> Rules:
    """torchvision's conv-norm(-act) `Sequential` (`<source>0`, `<source>1`) -> our `ConvNormAct`."""
    return (
        (rf"{source}0\.weight", f"{target}conv.weight"),
        (rf"{source}1\.(\w+)", rf"{target}norm.\1"),
    )


def torchvision_block_rules(block: InvertedResidual, source: str, target: str) -> Rules:
    """torchvision's V3 / EfficientNet block: `block.j` is (expand,) depthwise, (se,) project."""
    parts = [
        name
        for name, module in (
            ("expand", block.expand),
            ("depthwise", block.depthwise),
            ("se", block.se),
            ("project", block.project),
        )
        if not isinstance(module, nn.Identity)
    ]
    rules: list[tuple[str, str | None]] = []
    for j, part in enumerate(parts):
        if part == "se":
            rules.append((rf"{source}block\.{j}\.(fc[12]\.\w+)", rf"{target}se.\1"))
        else:
            rules += conv_norm_rules(rf"{source}block\.{j}\.", f"{target}{part}.")
    return tuple(rules)


def timm_rules(num_stages: int) -> Rules:
    """timm's MobileNetV2 / EfficientNet keys; its row 0 blocks are depthwise-separable."""
    head = f"backbone.stages.{num_stages - 1}"
    return (
        (r"conv_stem\.weight", "backbone.stem.conv.weight"),
        (r"bn1\.(\w+)", r"backbone.stem.norm.\1"),
        # row 0: conv_dw, bn1, (se,) conv_pw, bn2
        (r"blocks\.0\.(\d+)\.conv_dw\.weight", r"backbone.stages.0.\1.depthwise.conv.weight"),
        (r"blocks\.0\.(\d+)\.bn1\.(\w+)", r"backbone.stages.0.\1.depthwise.norm.\2"),
        (r"blocks\.0\.(\d+)\.conv_pw\.weight", r"backbone.stages.0.\1.project.conv.weight"),
        (r"blocks\.0\.(\d+)\.bn2\.(\w+)", r"backbone.stages.0.\1.project.norm.\2"),
        # other rows: conv_pw, bn1, conv_dw, bn2, (se,) conv_pwl, bn3
        (r"blocks\.(\d+)\.(\d+)\.conv_pw\.weight", r"backbone.stages.\1.\2.expand.conv.weight"),
        (r"blocks\.(\d+)\.(\d+)\.bn1\.(\w+)", r"backbone.stages.\1.\2.expand.norm.\3"),
        (r"blocks\.(\d+)\.(\d+)\.conv_dw\.weight", r"backbone.stages.\1.\2.depthwise.conv.weight"),
        (r"blocks\.(\d+)\.(\d+)\.bn2\.(\w+)", r"backbone.stages.\1.\2.depthwise.norm.\3"),
        (r"blocks\.(\d+)\.(\d+)\.conv_pwl\.weight", r"backbone.stages.\1.\2.project.conv.weight"),
        (r"blocks\.(\d+)\.(\d+)\.bn3\.(\w+)", r"backbone.stages.\1.\2.project.norm.\3"),
        (r"blocks\.(\d+)\.(\d+)\.se\.conv_reduce\.(\w+)", r"backbone.stages.\1.\2.se.fc1.\3"),
        (r"blocks\.(\d+)\.(\d+)\.se\.conv_expand\.(\w+)", r"backbone.stages.\1.\2.se.fc2.\3"),
        (r"conv_head\.weight", f"{head}.conv.weight"),
        (r"bn2\.(\w+)", rf"{head}.norm.\1"),
        (r"classifier\.(\w+)", r"head.fc.\1"),
    )

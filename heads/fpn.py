"""Feature Pyramid Network (Lin et al. 2017), numerically equal to torchvision's."""

from __future__ import annotations

import copy
import re
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from backbones.layers import ConvNormAct, LayerFn

from ._levels import check_features, parse_levels

EXTRA_BLOCKS = (None, "maxpool", "p6p7")


class MaxPoolLevel(nn.Module):
    """One more level by subsampling the coarsest output by 2 (Mask R-CNN's P6 for the RPN).

    A 1x1 max-pool with stride 2, as torchvision's `LastLevelMaxPool`: it keeps every second
    pixel, giving ceil(H / 2) x ceil(W / 2).
    """

    num_levels = 1

    def forward(self, output: torch.Tensor, feature: torch.Tensor) -> list[torch.Tensor]:
        return [F.max_pool2d(output, kernel_size=1, stride=2)]  # (B, C, ceil(H/2), ceil(W/2))


class P6P7(nn.Module):
    """RetinaNet's two extra levels (Lin et al. 2017, "Focal Loss for Dense Object Detection").

    P6 = 3x3 stride-2 conv of the coarsest FPN output (`from_output`, as FCOS and torchvision's
    `retinanet_resnet50_fpn`) or of the coarsest backbone feature (the paper, torchvision's
    `retinanet_resnet50_fpn_v2`); P7 = 3x3 stride-2 conv of ReLU(P6).
    """

    num_levels = 2

    def __init__(self, in_channels: int, out_channels: int, from_output: bool = True) -> None:
        super().__init__()
        self.from_output = from_output
        self.p6 = nn.Conv2d(in_channels, out_channels, 3, stride=2, padding=1)
        self.p7 = nn.Conv2d(out_channels, out_channels, 3, stride=2, padding=1)

    def forward(self, output: torch.Tensor, feature: torch.Tensor) -> list[torch.Tensor]:
        p6 = self.p6(output if self.from_output else feature)  # (B, C, ceil(H/2), ceil(W/2))
        p7 = self.p7(F.relu(p6))  # (B, C, ceil(H/4), ceil(W/4))
        return [p6, p7]

    def extra_repr(self) -> str:
        return f"from_output={self.from_output}"


class FPN(nn.Module):
    """Feature Pyramid Network (Lin et al. 2017): 1x1 laterals, a top-down path, 3x3 outputs.

    Each input `C<k>` gives an output `P<k>` with `out_channels` channels; `forward` takes the
    backbone's dict and returns a dict ordered fine to coarse. The top-down path upsamples
    (nearest) to the exact size of the next lateral, so any input size works. Levels in the
    input that the FPN was not built for are ignored.

    Args:
        in_channels: level name -> channels, fine to coarse, consecutive strides; pass
            `backbone.channels`.
        out_channels: channels of every output level.
        extra_blocks: None; "maxpool" adds one level by subsampling the coarsest output (Mask
            R-CNN's P6, torchvision's `LastLevelMaxPool`); "p6p7" adds two levels by strided
            3x3 convs (RetinaNet, FCOS).
        p6p7_from: the input of "p6p7": "P" the coarsest FPN output (FCOS, torchvision's
            `retinanet_resnet50_fpn`) or "C" the coarsest backbone feature (the RetinaNet
            paper, `retinanet_resnet50_fpn_v2`).
        norm_layer: norm after every lateral and output conv (then the convs have no bias);
            None, as in the paper.
    """

    def __init__(
        self,
        in_channels: Mapping[str, int],
        out_channels: int = 256,
        extra_blocks: str | None = None,
        p6p7_from: str = "P",
        norm_layer: LayerFn | None = None,
    ) -> None:
        super().__init__()
        indices = parse_levels("FPN", in_channels, prefix="C")
        if not isinstance(out_channels, int) or out_channels < 1:
            raise ValueError(f"out_channels must be a positive int, got {out_channels!r}")
        if extra_blocks not in EXTRA_BLOCKS:
            raise ValueError(f"extra_blocks must be one of {EXTRA_BLOCKS}, got {extra_blocks!r}")
        if p6p7_from not in ("P", "C"):
            raise ValueError(
                f"p6p7_from must be 'P' (coarsest FPN output) or 'C' (coarsest backbone "
                f"feature), got {p6p7_from!r}"
            )
        self.in_channels = dict(in_channels)
        self.out_channels = out_channels
        self.lateral_convs = nn.ModuleDict()
        self.output_convs = nn.ModuleDict()
        for (name, channels), k in zip(self.in_channels.items(), indices, strict=True):
            self.lateral_convs[name] = ConvNormAct(
                channels, out_channels, 1, norm_layer=norm_layer, act_layer=None
            )
            self.output_convs[f"P{k}"] = ConvNormAct(
                out_channels, out_channels, 3, norm_layer=norm_layer, act_layer=None
            )
        self.extra: MaxPoolLevel | P6P7 | None = None
        if extra_blocks == "maxpool":
            self.extra = MaxPoolLevel()
        elif extra_blocks == "p6p7":
            coarsest = next(reversed(self.in_channels.values()))
            source = out_channels if p6p7_from == "P" else coarsest
            self.extra = P6P7(source, out_channels, from_output=p6p7_from == "P")
        num_extra = self.extra.num_levels if self.extra is not None else 0

        self.levels = tuple(self.output_convs)  # the outputs of input levels, P<k> for C<k>
        self.extra_levels = tuple(f"P{indices[-1] + i}" for i in range(1, num_extra + 1))
        self.channels = dict.fromkeys(self.levels + self.extra_levels, out_channels)
        self.strides = {name: 2 ** int(name[1:]) for name in self.channels}
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Kaiming-uniform with a=1 and zero bias: Detectron's "c2_xavier_fill", as torchvision.
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_uniform_(module.weight, a=1)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def forward(self, features: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        check_features("FPN", self.in_channels, features)
        names = list(self.in_channels)
        top = self.lateral_convs[names[-1]](features[names[-1]])  # (B, C, H_k, W_k), coarsest
        outputs = [self.output_convs[self.levels[-1]](top)]
        for name, level in zip(reversed(names[:-1]), reversed(self.levels[:-1]), strict=True):
            lateral = self.lateral_convs[name](features[name])  # (B, C, H, W)
            # to the lateral's exact size: 2x would be one pixel off for odd sizes
            top = lateral + F.interpolate(top, size=lateral.shape[-2:], mode="nearest")
            outputs.insert(0, self.output_convs[level](top))
        if self.extra is not None:
            outputs += self.extra(outputs[-1], features[names[-1]])
        return dict(zip(self.channels, outputs, strict=True))

    @classmethod
    def from_torchvision(cls, module: nn.Module, levels: Sequence[str] | None = None) -> FPN:
        """An `FPN` with the weights, norms and extra block of a torchvision `FeaturePyramidNetwork`.

        torchvision's FPN has no level names: `levels` names its inputs fine to coarse, by
        default the last ones up to C5 (4 inputs: C2..C5). Outputs are equal, in order.
        """
        from torchvision.ops import FeaturePyramidNetwork
        from torchvision.ops.feature_pyramid_network import LastLevelMaxPool, LastLevelP6P7

        if not isinstance(module, FeaturePyramidNetwork):
            raise TypeError(
                f"from_torchvision takes a torchvision.ops.FeaturePyramidNetwork, got "
                f"{type(module).__name__}"
            )
        laterals = [block[0] for block in module.inner_blocks]
        count = len(laterals)
        levels = [f"C{k}" for k in range(6 - count, 6)] if levels is None else list(levels)
        if len(levels) != count:
            raise ValueError(
                f"the torchvision FPN has {count} input levels; got {len(levels)} names {levels}"
            )
        extra, p6p7_from = module.extra_blocks, "P"
        if extra is None:
            extra_blocks = None
        elif isinstance(extra, LastLevelMaxPool):
            extra_blocks = "maxpool"
        elif isinstance(extra, LastLevelP6P7):
            extra_blocks, p6p7_from = "p6p7", "P" if extra.use_P5 else "C"
        else:
            raise TypeError(
                f"no equivalent for the extra block {type(extra).__name__}; FPN has "
                "LastLevelMaxPool ('maxpool') and LastLevelP6P7 ('p6p7')"
            )
        template = module.inner_blocks[0][1] if len(module.inner_blocks[0]) > 1 else None

        def same_norm(channels: int) -> nn.Module:
            return copy.deepcopy(template)  # all FPN norms have out_channels; weights load below

        fpn = cls(
            {name: conv.in_channels for name, conv in zip(levels, laterals, strict=True)},
            laterals[0].out_channels,
            extra_blocks=extra_blocks,
            p6p7_from=p6p7_from,
            norm_layer=same_norm if template is not None else None,
        )
        # inner_blocks.<i>.<0 conv | 1 norm>.* -> lateral_convs.<C>.<conv | norm>.*, etc.
        parts = {"0": "conv", "1": "norm"}
        targets = {"inner_blocks": list(fpn.lateral_convs), "layer_blocks": list(fpn.output_convs)}
        state_dict = {}
        for key, value in module.state_dict().items():
            match = re.fullmatch(r"(inner_blocks|layer_blocks)\.(\d+)\.([01])\.(.+)", key)
            if match:
                block, index, part, rest = match.groups()
                prefix = "lateral_convs" if block == "inner_blocks" else "output_convs"
                key = f"{prefix}.{targets[block][int(index)]}.{parts[part]}.{rest}"
            else:
                key = re.sub(r"^extra_blocks\.", "extra.", key)
            state_dict[key] = value
        fpn.load_state_dict(state_dict)  # strict: every key mapped, none left over
        reference = next(module.parameters())
        return fpn.to(device=reference.device, dtype=reference.dtype).train(module.training)

"""Building blocks shared by every family (and by the heads)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

LayerFn = Callable[..., nn.Module]

# In-place activations: the families' layers overwrite their input instead of allocating,
# one memory pass less (the input is never needed again: a norm or a sum produced it).
ReLU = partial(nn.ReLU, inplace=True)
ReLU6 = partial(nn.ReLU6, inplace=True)
Hardswish = partial(nn.Hardswish, inplace=True)
SiLU = partial(nn.SiLU, inplace=True)


def make_divisible(value: float, divisor: int = 8, min_value: int | None = None) -> int:
    """Round `value` to the nearest multiple of `divisor`, never going below 90% of it.

    The rule of the MobileNet/EfficientNet reference code, so channel counts match theirs.
    """
    min_value = divisor if min_value is None else min_value
    rounded = max(min_value, int(value + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * value:  # rounding down must not remove more than 10%
        rounded += divisor
    return rounded


def init_he_normal(model: nn.Module, mode: str = "fan_out") -> None:
    """He-normal convs (He et al. 2015) with zero biases, unit norms: torchvision's CNN init.

    `mode="fan_out"` is torchvision's ResNet, VGG, MobileNet and EfficientNet init; DenseNet's
    keeps PyTorch's default `"fan_in"`.
    """
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode=mode, nonlinearity="relu")
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.BatchNorm2d | nn.GroupNorm) and module.affine:
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)


class ConvNormAct(nn.Module):
    """Conv2d -> norm -> activation, with 'same' padding for odd kernels.

    Args:
        in_channels: input channels.
        out_channels: output channels.
        kernel_size: square kernel size.
        stride: convolution stride.
        padding: defaults to `(kernel_size - 1) // 2 * dilation`, which keeps ceil(H / stride).
        dilation: convolution dilation.
        groups: convolution groups (`groups=in_channels` for a depthwise conv).
        bias: defaults to `norm_layer is None` (a bias before a norm is redundant).
        norm_layer: called with `out_channels`; `None` for no norm.
        act_layer: called with no arguments; `None` for no activation.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        stride: int = 1,
        padding: int | None = None,
        dilation: int = 1,
        groups: int = 1,
        bias: bool | None = None,
        norm_layer: LayerFn | None = nn.BatchNorm2d,
        act_layer: LayerFn | None = nn.ReLU,
    ) -> None:
        super().__init__()
        padding = (kernel_size - 1) // 2 * dilation if padding is None else padding
        bias = norm_layer is None if bias is None else bias
        self.conv = nn.Conv2d(
            in_channels,
            out_channels,
            kernel_size,
            stride=stride,
            padding=padding,
            dilation=dilation,
            groups=groups,
            bias=bias,
        )
        self.norm = norm_layer(out_channels) if norm_layer is not None else nn.Identity()
        self.act = act_layer() if act_layer is not None else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.norm(self.conv(x)))


class SqueezeExcite(nn.Module):
    """Channel attention from globally pooled features (Hu et al. 2018, "Squeeze-and-Excitation")."""

    def __init__(
        self,
        in_channels: int,
        squeeze_channels: int,
        act_layer: LayerFn = nn.ReLU,
        gate_layer: LayerFn = nn.Sigmoid,
    ) -> None:
        super().__init__()
        self.fc1 = nn.Conv2d(in_channels, squeeze_channels, 1)
        self.act = act_layer()
        self.fc2 = nn.Conv2d(squeeze_channels, in_channels, 1)
        self.gate = gate_layer()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = x.mean((2, 3), keepdim=True)  # (B, C, 1, 1)
        scale = self.gate(self.fc2(self.act(self.fc1(scale))))
        return x * scale


class DropPath(nn.Module):
    """Drop the whole residual branch per sample (Huang et al. 2016, "Stochastic Depth").

    Survivors are scaled by 1 / (1 - p) in training so the expectation is unchanged;
    in eval mode this is the identity.
    """

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"DropPath probability must be in [0, 1), got {p}")
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)  # (B, 1, 1, 1)
        # scale the mask, not x: one pass over x, and the rounding of torchvision and timm
        return x * mask.div_(keep)

    def extra_repr(self) -> str:
        return f"p={self.p}"


def drop_path_rates(
    drop_path_rate: float, depths: Sequence[int], endpoint: bool = True
) -> list[list[float]]:
    """Per-block drop-path rates rising linearly from 0 to `drop_path_rate`, split by stage.

    The linear decay rule of Huang et al. 2016, as used by ConvNeXt and timm. With
    `endpoint=False` block i of n gets `drop_path_rate * i / n`, so the last block stays below
    the rate: the EfficientNet convention (torchvision's `stochastic_depth_prob`, timm).
    """
    if not 0.0 <= drop_path_rate < 1.0:
        raise ValueError(f"drop_path_rate must be in [0, 1), got {drop_path_rate}")
    total = sum(depths)
    steps = max(total - 1, 1) if endpoint else total
    # plain Python, not torch.linspace: models are also built on the meta device
    rates = [drop_path_rate * i / steps for i in range(total)]
    per_stage, start = [], 0
    for depth in depths:
        per_stage.append(rates[start : start + depth])
        start += depth
    return per_stage


class Dilation:
    """Turns the strides past `output_stride` into dilation while a family builds (DeepLab,
    Chen et al. 2017): the maps keep their size, and later convs see as far as before.

    Call it with the stride of each module in build order: it returns the stride to build that
    module with and the dilation before it; `dilation` is the one after it. Where a stride
    becomes dilation, torchvision's and timm's ResNets, timm's EfficientNets and ConvNeXt build
    that module with the dilation before it, torchvision's MobileNetV3 with the one after.
    """

    def __init__(self, output_stride: int = 32) -> None:
        self.output_stride = output_stride
        self.stride = 1  # the real stride of what is built so far
        self.dilation = 1

    def __call__(self, stride: int) -> tuple[int, int]:
        before = self.dilation
        if self.stride * stride > self.output_stride:
            self.dilation *= stride
            stride = 1
        self.stride *= stride
        return stride, before


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channel dimension of an NCHW tensor (as in ConvNeXt)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1)  # (B, H, W, C)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)  # (B, C, H, W)


class GroupNorm(nn.GroupNorm):
    """GroupNorm (Wu & He 2018) called with the channel count, like BatchNorm2d.

    The group count is the largest divisor of `num_channels` that is at most `max_groups`:
    32 groups (the paper's default) where 32 divides the channels, fewer where it does not
    (48 channels -> 24 groups), so any width works as `norm_layer=GroupNorm`.
    """

    def __init__(
        self, num_channels: int, max_groups: int = 32, eps: float = 1e-5, affine: bool = True
    ) -> None:
        if num_channels < 1 or max_groups < 1:
            raise ValueError(
                f"GroupNorm needs positive num_channels and max_groups, got {num_channels} "
                f"and {max_groups}"
            )
        groups = max(
            g for g in range(1, min(max_groups, num_channels) + 1) if num_channels % g == 0
        )
        super().__init__(groups, num_channels, eps=eps, affine=affine)


# BatchNorm as TensorFlow's reference MobileNetV3 / EfficientNet code sets it; torchvision keeps
# it for MobileNetV3 and EfficientNet-B5..B7 (eps changes eval outputs, momentum training).
BatchNorm2dTF = partial(nn.BatchNorm2d, eps=1e-3, momentum=0.01)


class InvertedResidual(nn.Module):
    """Expand 1x1 -> depthwise kxk -> squeeze-excite -> project 1x1 (+ identity if shapes allow).

    The block of MobileNetV2 (Sandler et al. 2018), MobileNetV3 (Howard et al. 2019) and
    EfficientNet's MBConv (Tan & Le 2019). Without expansion (`expanded_channels ==
    in_channels`) there is no expand conv: the depthwise-separable block.

    Args:
        in_channels: input channels.
        out_channels: output channels; the projection has no activation (a linear bottleneck).
        expanded_channels: channels of the depthwise conv.
        kernel_size: depthwise kernel size.
        stride: depthwise stride.
        dilation: depthwise dilation.
        act_layer: activation after the expand and depthwise convs.
        se_layer: called with `expanded_channels`; `None` for no squeeze-excite.
        norm_layer: called with a channel count.
        drop_path: stochastic-depth rate of the residual branch (used only with the identity).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        expanded_channels: int,
        kernel_size: int = 3,
        stride: int = 1,
        dilation: int = 1,
        act_layer: LayerFn = nn.ReLU,
        se_layer: LayerFn | None = None,
        norm_layer: LayerFn = nn.BatchNorm2d,
        drop_path: float = 0.0,
    ) -> None:
        super().__init__()
        self.has_shortcut = stride == 1 and in_channels == out_channels
        self.expand = (
            ConvNormAct(
                in_channels, expanded_channels, 1, norm_layer=norm_layer, act_layer=act_layer
            )
            if expanded_channels != in_channels
            else nn.Identity()
        )
        self.depthwise = ConvNormAct(
            expanded_channels,
            expanded_channels,
            kernel_size,
            stride,
            dilation=dilation,
            groups=expanded_channels,
            norm_layer=norm_layer,
            act_layer=act_layer,
        )
        self.se = se_layer(expanded_channels) if se_layer is not None else nn.Identity()
        self.project = ConvNormAct(
            expanded_channels, out_channels, 1, norm_layer=norm_layer, act_layer=None
        )
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.project(self.se(self.depthwise(self.expand(x))))
        if self.has_shortcut:
            out = self.drop_path(out)
            out += x  # in place: one memory pass less in these memory-bound nets
        return out

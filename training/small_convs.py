"""Faster CPU training of convolutions on tiny feature maps (the C5 stage of 64 px images).

oneDNN's weight-gradient kernels are slow when a convolution's output has only a few
positions. On this project's 2-core CPU (batch 32, one thread): resnet18's 512-channel 3x3
convolutions on 2x2 maps take 61 ms for the weight gradient against 19 ms for the same
numbers computed as im2col + one matrix multiply (those three convolutions took 37% of a
training step), and MobileNetV3's 960-channel depthwise 5x5 convolution on 2x2 maps takes
18.5 ms against 1.7 ms as a sum over the 25 kernel offsets. `use_tiny_map_weight_grads`
routes such convolutions through an autograd function that keeps PyTorch's forward and input
gradient and computes the weight gradient those ways. Parameters, state dict keys and
forward values are unchanged; gradients agree to float rounding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

MAX_POSITIONS = 4  # output positions (H_out * W_out) up to which the paths below are faster


def _gemm_weight_grad(
    x: torch.Tensor, grad: torch.Tensor, weight: torch.Tensor, stride, padding, dilation
) -> torch.Tensor:
    """Ungrouped convolution: grad_w = grad_out (Cout, B*L) @ im2col(x)^T (B*L, Cin*kh*kw)."""
    cols = F.unfold(x, weight.shape[-2:], dilation, padding, stride)  # (B, Cin*kh*kw, L)
    cols = cols.transpose(0, 1).reshape(cols.shape[1], -1)  # (Cin*kh*kw, B*L)
    grad_out = grad.flatten(2).transpose(0, 1).reshape(weight.shape[0], -1)  # (Cout, B*L)
    return (grad_out @ cols.t()).view_as(weight)


def _depthwise_weight_grad(
    x: torch.Tensor, grad: torch.Tensor, weight: torch.Tensor, stride, padding, dilation
) -> torch.Tensor:
    """Depthwise convolution: one product of shifted input and grad_out per kernel offset."""
    x = F.pad(x, (padding[1], padding[1], padding[0], padding[0]))  # (B, C, Hp, Wp)
    out_h, out_w = grad.shape[-2:]
    grad_weight = weight.new_empty(weight.shape[0], *weight.shape[-2:])  # (C, kh, kw)
    for i in range(weight.shape[-2]):
        for j in range(weight.shape[-1]):
            top, left = i * dilation[0], j * dilation[1]
            window = x[
                ...,
                top : top + stride[0] * (out_h - 1) + 1 : stride[0],
                left : left + stride[1] * (out_w - 1) + 1 : stride[1],
            ]  # (B, C, H_out, W_out): the inputs kernel tap (i, j) saw
            grad_weight[:, i, j] = (window * grad).sum((0, 2, 3))
    return grad_weight.view_as(weight)


class _TinyMapConv(torch.autograd.Function):
    """conv2d with one of the weight-gradient computations above (zero padding)."""

    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, dilation, groups):  # type: ignore[override]
        ctx.save_for_backward(x, weight)
        ctx.geometry = (stride, padding, dilation, groups)
        ctx.has_bias = bias is not None
        return F.conv2d(x, weight, bias, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        x, weight = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.geometry
        grad_input = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_input = torch.ops.aten.convolution_backward(
                grad, x, weight, None, stride, padding, dilation, False, [0, 0], groups,
                [True, False, False],
            )[0]  # fmt: skip
        if ctx.needs_input_grad[1]:
            weight_grad = _gemm_weight_grad if groups == 1 else _depthwise_weight_grad
            grad_weight = weight_grad(x, grad, weight, stride, padding, dilation)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = grad.sum((0, 2, 3))
        return grad_input, grad_weight, grad_bias, None, None, None, None


class TinyMapConv2d(nn.Conv2d):
    """An `nn.Conv2d` that takes the `_TinyMapConv` path on CPU when its output is tiny."""

    def _conv_forward(
        self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
    ) -> torch.Tensor:
        if (
            torch.is_grad_enabled()
            and weight.requires_grad
            and x.device.type == "cpu"
            and x.dim() == 4
            and _output_positions(x, self) <= MAX_POSITIONS
        ):
            return _TinyMapConv.apply(
                x, weight, bias, self.stride, self.padding, self.dilation, self.groups
            )
        return super()._conv_forward(x, weight, bias)


def _output_positions(x: torch.Tensor, conv: nn.Conv2d) -> int:
    positions = 1
    for size, k, s, p, d in zip(
        x.shape[-2:], conv.kernel_size, conv.stride, conv.padding, conv.dilation, strict=True
    ):
        positions *= (size + 2 * p - d * (k - 1) - 1) // s + 1
    return positions


def _benefits(conv: nn.Conv2d) -> bool:
    if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
        return False
    if conv.groups == 1:
        # oneDNN computes a 1x1 stride-1 convolution's weight gradient as one GEMM already
        return conv.kernel_size != (1, 1) or conv.stride != (1, 1)
    return conv.groups == conv.in_channels == conv.out_channels  # depthwise
    # (other groupings, e.g. ResNeXt's, keep oneDNN's kernels)


def use_tiny_map_weight_grads(model: nn.Module) -> int:
    """Let the ungrouped (but 1x1 stride-1) and depthwise zero-padded `nn.Conv2d`s of `model`
    compute their weight gradient the fast way when their output is tiny; returns how many
    can. The modules keep their parameters and state dict keys (only their class changes)."""
    count = 0
    for module in model.modules():
        if type(module) is nn.Conv2d and _benefits(module):
            module.__class__ = TinyMapConv2d
            count += 1
    return count

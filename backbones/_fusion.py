"""The convolution `Backbone.fuse()` installs on CPU: one oneDNN call for conv + activation.

After BatchNorm folding, a conv and the activation that follows it still make two passes over
the conv output, and ATen repacks the weight into oneDNN's blocked layout on every call (or,
at one thread and batch < 16, takes its slower non-oneDNN path for 1x1 convs). oneDNN's
pointwise-fused convolution (`torch.ops.mkldnn._convolution_pointwise`, the kernel behind
torch.compile's CPU conv fusions) applies the activation while the output is still in cache
and takes a weight packed once per input shape. It is used only where it is exact and available:

- CPU tensors, with autograd off (the op has no backward; a fused model is for inference),
  eager mode (under torch.compile / torch.export the module runs plain `conv2d` + activation,
  so exported graphs hold standard ops only and ONNX export works);
- a PyTorch built with oneDNN (`torch.backends.mkldnn.is_available()`); otherwise, and on
  CUDA, the same module runs `conv2d` + activation.

The packed weight is a cache, never state: it is rebuilt when the weight changes (in place,
e.g. `load_state_dict`, or replaced, e.g. `.to()`), dropped on copy and pickling, and the
parameters and state-dict keys stay those of `nn.Conv2d`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

# activation type -> (oneDNN post-op, its scalars), exact for these modules' default settings
ONEDNN_ACTIVATIONS: dict[type[nn.Module], tuple[str, list[float]]] = {
    nn.ReLU: ("relu", []),
    nn.ReLU6: ("hardtanh", [0.0, 6.0]),
    nn.SiLU: ("swish", []),
    nn.Hardswish: ("hardswish", []),
    nn.Hardsigmoid: ("hardsigmoid", []),
    nn.Sigmoid: ("sigmoid", []),
}


def onednn_usable() -> bool:
    """True where this PyTorch build has oneDNN (mkldnn) convolutions on CPU."""
    return torch.backends.mkldnn.is_available()


class FusedConv2d(nn.Conv2d):
    """A Conv2d and the activation after it, as one oneDNN call on CPU (see the module doc).

    Holds the original conv's weight and bias (same parameters, same state-dict keys); `act`
    is the activation module taken out of the model, or None for a conv alone.
    """

    def __init__(self, conv: nn.Conv2d, act: nn.Module | None) -> None:
        super().__init__(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,
            stride=conv.stride,
            padding=conv.padding,
            dilation=conv.dilation,
            groups=conv.groups,
            bias=conv.bias is not None,
            device="meta",  # replaced by the conv's own parameters below
        )
        self.weight = conv.weight
        self.bias = conv.bias
        self.act = act if act is not None else nn.Identity()
        self._post_op = ONEDNN_ACTIVATIONS[type(act)] if act is not None else ("none", [])
        self._packed: tuple[tuple[Any, ...], torch.Tensor] | None = None  # (weight key, packed)

    @staticmethod
    def supports(conv: nn.Module) -> bool:
        """Plain 2-D convs with numeric zero padding (oneDNN's op has no other modes)."""
        return (
            type(conv) is nn.Conv2d
            and conv.padding_mode == "zeros"
            and not isinstance(conv.padding, str)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (
            x.device.type != "cpu"
            or x.dtype != torch.float32
            or torch.compiler.is_compiling()
            or (torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad))
            or not onednn_usable()
        ):
            return self.act(super().forward(x))
        attr, scalars = self._post_op
        return torch.ops.mkldnn._convolution_pointwise(
            x,
            self._packed_weight(x.shape),
            self.bias,
            list(self.padding),
            list(self.stride),
            list(self.dilation),
            self.groups,
            attr,
            scalars,
            "",
        )

    def _packed_weight(self, input_shape: torch.Size) -> torch.Tensor:
        # oneDNN picks the weight layout for the input shape (packed without it, the layout
        # can be a slow one); another shape repacks, costing about what an unpacked call does
        weight = self.weight
        key = (weight.data_ptr(), weight._version, tuple(weight.shape), tuple(input_shape))
        if self._packed is None or self._packed[0] != key:
            packed = torch._C._nn.mkldnn_reorder_conv2d_weight(
                weight.detach().to_mkldnn(),
                list(self.padding),
                list(self.stride),
                list(self.dilation),
                self.groups,
                list(input_shape),
            )
            self._packed = (key, packed)
        return self._packed[1]

    def __getstate__(self) -> dict[str, Any]:
        # copy.deepcopy and pickle: the packed weight is an opaque oneDNN tensor and a cache
        state = super().__getstate__()
        return {**state, "_packed": None}

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, post_op={self._post_op[0]}"

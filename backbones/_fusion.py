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

Three more rewrites run inside the same module, all exact up to float rounding:

- Winograd (Lavin & Gray 2016) for 3x3 stride-1 convs with at least `WINOGRAD_MIN_CHANNELS`
  input and output channels, on inputs big enough (`WINOGRAD_MIN_WORK`): F(2x2, 3x3) does
  the multiplies of a 2x2 output block as 16 products instead of 36, F(4x4, 3x3) (from
  `WINOGRAD_F4_MIN_WORK`) a 4x4 block as 36 instead of 144. The transforms are memory
  passes, so it pays only where the channels make the products dominate.
- A residual sum after the conv (`layers.Residual`), with its activation, as oneDNN's binary
  post-op (`FusedResidual`): the conv output never makes a separate pass to meet the shortcut.
- An average pool after a 1x1 conv runs before it (`pool_commutes`): DenseNet's transitions
  then convolve a quarter of the positions.

The packed weight is a cache, never state: it is rebuilt when the weight changes (in place,
e.g. `load_state_dict`, or replaced, e.g. `.to()`), dropped on copy and pickling, and the
parameters and state-dict keys stay those of `nn.Conv2d`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .layers import memory_format_of

# activation type -> (oneDNN post-op, its scalars), exact for these modules' default settings
ONEDNN_ACTIVATIONS: dict[type[nn.Module], tuple[str, list[float]]] = {
    nn.ReLU: ("relu", []),
    nn.ReLU6: ("hardtanh", [0.0, 6.0]),
    nn.SiLU: ("swish", []),
    nn.Hardswish: ("hardswish", []),
    nn.Hardsigmoid: ("hardsigmoid", []),
    nn.Sigmoid: ("sigmoid", []),
}

# the same activations in place, for the output of the Winograd path
_IN_PLACE: dict[type[nn.Module], Callable[[torch.Tensor], torch.Tensor]] = {
    nn.Identity: lambda x: x,
    nn.ReLU: torch.relu_,
    nn.ReLU6: lambda x: F.hardtanh_(x, 0.0, 6.0),
    nn.SiLU: lambda x: F.silu(x, inplace=True),
    nn.Hardswish: lambda x: F.hardswish(x, inplace=True),
    nn.Hardsigmoid: lambda x: F.hardsigmoid(x, inplace=True),
    nn.Sigmoid: torch.sigmoid_,
}

# activations oneDNN's binary (residual sum) post-op can apply after the sum
RESIDUAL_ACTIVATIONS = (nn.Identity, nn.ReLU)

# Winograd pays where the matrix products outweigh the transforms' memory passes and the
# small ops it launches. Measured on 2 AVX2 cores against oneDNN's direct conv (batch x H x W x
# C_in x C_out = "work"): F(2x2, 3x3) 1.05-1.4x faster from 128 channels and 2^24 work (batch
# 8 of 128 channels at 14x14, batch 1 of 512 at 14x14), 0.7-1.0x below either (64 channels
# at 56x56; batch 1 at 7x7); F(4x4, 3x3) 1.4-2.9x from 2^26 work, slower than F(2x2) below.
WINOGRAD_MIN_CHANNELS = 128
WINOGRAD_MIN_WORK = 2**24
WINOGRAD_F4_MIN_WORK = 2**26
# transformed tiles per chunk of the batch: bounds the extra memory (~2-4x input and output)
WINOGRAD_CHUNK_BYTES = 64 * 2**20


@dataclass(frozen=True)
class Winograd:
    """F(m x m, 3x3) (Lavin & Gray 2016): an m x m output tile is A^T [(G g G^T) * (B^T d B)] A
    for the (m + 2) x (m + 2) input tile d around it."""

    output: int  # m
    bt: tuple[tuple[float, ...], ...]  # B^T, (m + 2) x (m + 2)
    g: tuple[tuple[float, ...], ...]  # G, (m + 2) x 3
    at: tuple[tuple[float, ...], ...]  # A^T, m x (m + 2)


# points 0, 1, -1 (and infinity): 16 products per 2x2 outputs instead of 36, ~1e-6 relative error
WINOGRAD_F2 = Winograd(
    output=2,
    bt=((1, 0, -1, 0), (0, 1, 1, 0), (0, -1, 1, 0), (0, 1, 0, -1)),
    g=((1, 0, 0), (0.5, 0.5, 0.5), (0.5, -0.5, 0.5), (0, 0, 1)),
    at=((1, 1, 1, 0), (0, 1, -1, -1)),
)
# points 0, 1, -1, 2, -2 (and infinity): 36 products per 4x4 outputs instead of 144, ~1e-5
WINOGRAD_F4 = Winograd(
    output=4,
    bt=(
        (4, 0, -5, 0, 1, 0),
        (0, -4, -4, 1, 1, 0),
        (0, 4, -4, -1, 1, 0),
        (0, -2, -1, 2, 1, 0),
        (0, 2, -1, -2, 1, 0),
        (0, 4, 0, -5, 0, 1),
    ),
    g=(
        (1 / 4, 0, 0),
        (-1 / 6, -1 / 6, -1 / 6),
        (-1 / 6, 1 / 6, -1 / 6),
        (1 / 24, 1 / 12, 1 / 6),
        (1 / 24, -1 / 12, 1 / 6),
        (0, 0, 1),
    ),
    at=((1, 1, 1, 1, 1, 0), (0, 1, -1, 2, -2, 0), (0, 1, 1, 4, 4, 0), (0, 1, -1, 8, -8, 1)),
)


def onednn_usable() -> bool:
    """True where this PyTorch build has oneDNN (mkldnn) convolutions on CPU."""
    return torch.backends.mkldnn.is_available()


def winograd_weight(weight: torch.Tensor, algorithm: Winograd = WINOGRAD_F2) -> torch.Tensor:
    """A (out, in, 3, 3) conv weight as `algorithm` needs it: G g G^T, ((m + 2)^2, in, out)."""
    g = torch.tensor(algorithm.g, dtype=torch.float64, device=weight.device)
    u = torch.einsum("ai,ocij,bj->abco", g, weight.detach().double(), g)  # (n, n, in, out)
    return u.reshape(len(g) ** 2, weight.shape[1], weight.shape[0]).to(weight.dtype).contiguous()


def winograd_conv3x3(
    x: torch.Tensor,
    u: torch.Tensor,
    bias: torch.Tensor | None,
    algorithm: Winograd = WINOGRAD_F2,
) -> torch.Tensor:
    """A 3x3, stride 1, padding 1 convolution of `x` by Winograd F(m x m, 3x3).

    `u` is `winograd_weight(weight, algorithm)`. The input and output transforms are weighted
    sums of strided slices, rows then columns, each a few ops over all tiles; the (m + 2)^2
    elementwise products over channels are one batched matrix product. The batch goes in
    chunks that keep the transformed tiles near `WINOGRAD_CHUNK_BYTES`. Returns
    (B, out, H, W) in channels_last.
    """
    batch, channels, height, width = x.shape
    out = x.new_empty(batch, height, width, u.shape[2])
    m = algorithm.output
    tiles = -(-height // m) * -(-width // m)
    per_image = u.shape[0] * tiles * max(channels, u.shape[2]) * x.element_size()
    chunk = max(1, WINOGRAD_CHUNK_BYTES // per_image)
    for start in range(0, batch, chunk):
        _winograd_tiles(x[start : start + chunk], u, bias, algorithm, out[start : start + chunk])
    return out.permute(0, 3, 1, 2)  # (B, out, H, W)


def _winograd_tiles(
    x: torch.Tensor,
    u: torch.Tensor,
    bias: torch.Tensor | None,
    algorithm: Winograd,
    out: torch.Tensor,
) -> None:
    # x (B, C, H, W) -> out (B, H, W, out)
    batch, channels, height, width = x.shape
    out_channels = u.shape[2]
    m, n = algorithm.output, algorithm.output + 2
    tiles_h, tiles_w = -(-height // m), -(-width // m)
    # 1 pixel of the conv's zero padding, and more at the bottom/right to fill the last tiles
    padded = x.new_empty(batch, m * tiles_h + 2, m * tiles_w + 2, channels)
    padded[:, 1 : height + 1, 1 : width + 1] = x.permute(0, 2, 3, 1)  # (B, H, W, C)
    for border in (
        padded[:, :1],
        padded[:, height + 1 :],
        padded[:, :, :1],
        padded[:, :, width + 1 :],
    ):
        border.zero_()
    # B^T d B, rows then columns: tile row (column) i is padded row (column) m * t + i
    d = [padded[:, i : i + m * tiles_h : m] for i in range(n)]  # (B, tiles_h, W', C) each
    rows = x.new_empty(n, batch, tiles_h, m * tiles_w + 2, channels)
    _combine(algorithm.bt, d, rows)
    del padded, d
    v = x.new_empty(n, n, batch, tiles_h, tiles_w, channels)
    columns = [rows[..., j : j + m * tiles_w : m, :] for j in range(n)]  # (n, B, th, tw, C)
    _combine(algorithm.bt, columns, v.transpose(0, 1))
    del rows, columns
    products = torch.bmm(v.view(n * n, -1, channels), u)  # (n * n, B * tiles, out)
    del v
    if bias is not None:
        products[n + 1] += bias  # A^T's column 1 is all ones: (1, 1) reaches every output
    products = products.view(n, n, batch, tiles_h, tiles_w, out_channels)
    # A^T products A: output row m * t + a, column m * t + b
    half = x.new_empty(m, n, batch, tiles_h, tiles_w, out_channels)  # (a, j, ...)
    _combine(algorithm.at, list(products), half)
    del products
    exact = height % m == 0 and width % m == 0
    full = out if exact else x.new_empty(batch, m * tiles_h, m * tiles_w, out_channels)
    grid = full.view(batch, tiles_h, m, tiles_w, m, out_channels)
    # grid[:, :, a, :, b] as (a, B, tiles_h, tiles_w, out), one b at a time
    outputs = [grid[:, :, :, :, b].permute(2, 0, 1, 3, 4) for b in range(m)]
    _combine(algorithm.at, [half[:, j] for j in range(n)], outputs)
    if not exact:
        out.copy_(full[:, :height, :width])  # the last tiles stick out of the map


def _combine(
    matrix: tuple[tuple[float, ...], ...],
    inputs: list[torch.Tensor],
    out: torch.Tensor | list[torch.Tensor],
) -> None:
    # out[r] = sum_i matrix[r][i] * inputs[i], one pass per term after the first two (every
    # row of these matrices has a coefficient 1 to start from)
    for r, row in enumerate(matrix):
        terms = [(c, inputs[i]) for i, c in enumerate(row) if c != 0]
        terms.sort(key=lambda term: term[0] != 1)
        (_, first), (c, second) = terms[0], terms[1]
        torch.add(first, second, alpha=c, out=out[r])
        for c, term in terms[2:]:
            out[r].add_(term, alpha=c)


class FusedConv2d(nn.Conv2d):
    """A Conv2d and the activation after it, as one oneDNN call on CPU (see the module doc).

    Holds the original conv's weight and bias (same parameters, same state-dict keys); `act`
    is the activation module taken out of the model, or None (or an Identity) for a conv
    alone. With `winograd`, a conv that qualifies (`winograd_applies`) runs
    `winograd_conv3x3` instead.
    """

    def __init__(self, conv: nn.Conv2d, act: nn.Module | None, *, winograd: bool = True) -> None:
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
        if type(act) is nn.Identity:
            act = None
        self.act = act if act is not None else nn.Identity()
        self._post_op = ONEDNN_ACTIVATIONS[type(act)] if act is not None else ("none", [])
        self.winograd = winograd and self.winograd_applies()
        # set by FusedResidual: forward passes its input through, the residual runs this conv
        self.deferred = False
        # an average pool that followed this 1x1 conv, run before it (`pool_commutes`)
        self.pool_first: nn.AvgPool2d | None = None
        # weight caches: "onednn", "F2", "F4" -> (weight key, transformed weight)
        self._packed: dict[str, tuple[tuple[Any, ...], torch.Tensor]] = {}

    @staticmethod
    def supports(conv: nn.Module) -> bool:
        """Plain 2-D convs with numeric zero padding (oneDNN's op has no other modes)."""
        return (
            type(conv) is nn.Conv2d
            and conv.padding_mode == "zeros"
            and not isinstance(conv.padding, str)
        )

    def winograd_applies(self) -> bool:
        """3x3, stride 1, padding 1, ungrouped, undilated, with enough channels to pay off."""
        return (
            self.kernel_size == (3, 3)
            and self.stride == (1, 1)
            and self.padding == (1, 1)
            and self.dilation == (1, 1)
            and self.groups == 1
            and min(self.in_channels, self.out_channels) >= WINOGRAD_MIN_CHANNELS
        )

    def pool_commutes(self, pool: nn.Module) -> bool:
        """Whether `pool(self(x)) == self(pool(x))`: a 1x1 conv without padding is a per-pixel
        linear map and an unpadded average pool a per-channel one, so they commute, and
        pooling first leaves the conv a fraction of the positions."""
        return (
            type(pool) is nn.AvgPool2d
            and pool.padding in (0, (0, 0))
            and pool.divisor_override is None
            and self.kernel_size == (1, 1)
            and self.stride == (1, 1)
            and self.padding == (0, 0)
            and not self.deferred
            and type(self.act) is nn.Identity
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.deferred else self.run(x)

    def run(self, x: torch.Tensor, shortcut: torch.Tensor | None = None) -> torch.Tensor:
        """act(conv(x) [+ shortcut])."""
        if self.pool_first is not None:
            x = self.pool_first(x)
        if (
            x.device.type != "cpu"
            or x.dtype != torch.float32
            or torch.compiler.is_compiling()
            or (torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad))
            or not onednn_usable()
        ):
            out = super().forward(x)
            return self.act(out if shortcut is None else out + shortcut)
        batch, _, height, width = x.shape
        work = batch * height * width * self.in_channels * self.out_channels
        if self.winograd and work >= WINOGRAD_MIN_WORK:
            algorithm = WINOGRAD_F4 if work >= WINOGRAD_F4_MIN_WORK else WINOGRAD_F2
            u = self._cached(x.shape, winograd=algorithm)
            out = winograd_conv3x3(x, u, self.bias, algorithm)
            if shortcut is not None:
                out += shortcut
            return _IN_PLACE[type(self.act)](out)
        attr, scalars = self._post_op
        geometry = (list(self.padding), list(self.stride), list(self.dilation), self.groups)
        weight = self._cached(x.shape, winograd=None)
        if shortcut is None:
            return torch.ops.mkldnn._convolution_pointwise(
                x, weight, self.bias, *geometry, attr, scalars, ""
            )
        # oneDNN's binary post-op reads the shortcut in the conv's output layout
        return torch.ops.mkldnn._convolution_pointwise.binary(
            x,
            shortcut.contiguous(memory_format=memory_format_of(x)),
            weight,
            self.bias,
            *geometry,
            "add",
            1.0,
            None if attr == "none" else attr,  # the binary op wants no unary post-op as None
            scalars,
            "",
        )

    def _cached(self, input_shape: torch.Size, winograd: Winograd | None) -> torch.Tensor:
        # oneDNN picks the weight layout for the input shape (packed without it, the layout
        # can be a slow one): one packing is kept, for the last shape, and another shape
        # repacks, costing about what an unpacked call does. A Winograd weight does not depend
        # on the input shape: one is kept per tile size.
        weight = self.weight
        slot = f"F{winograd.output}" if winograd is not None else "onednn"
        key = (weight.data_ptr(), weight._version, tuple(weight.shape))
        if winograd is None:
            key += (tuple(input_shape),)
        if slot not in self._packed or self._packed[slot][0] != key:
            if winograd is not None:
                packed = winograd_weight(weight, winograd)
            else:
                packed = torch._C._nn.mkldnn_reorder_conv2d_weight(
                    weight.detach().to_mkldnn(),
                    list(self.padding),
                    list(self.stride),
                    list(self.dilation),
                    self.groups,
                    list(input_shape),
                )
            self._packed[slot] = (key, packed)
        return self._packed[slot][1]

    def __getstate__(self) -> dict[str, Any]:
        # copy.deepcopy and pickle: the packed weight is an opaque oneDNN tensor and a cache
        state = super().__getstate__()
        return {**state, "_packed": {}}

    def extra_repr(self) -> str:
        post_op = f"add+{self._post_op[0]}" if self.deferred else self._post_op[0]
        post_op = post_op.removesuffix("+none")
        extra = ", winograd=True" if self.winograd else ""
        return f"{super().extra_repr()}, post_op={post_op}{extra}"


class FusedResidual(nn.Module):
    """A `layers.Residual` whose branch ends in `conv`: conv, sum and activation in one call.

    `conv` stays registered where it was (same state-dict keys) and, `deferred`, passes its
    input through the branch's remaining pass-through modules to here, where it runs.
    """

    def __init__(self, conv: FusedConv2d) -> None:
        super().__init__()
        conv.deferred = True
        self._conv = (conv,)  # a tuple: not a second registration of the conv

    def forward(self, x: torch.Tensor, shortcut: torch.Tensor) -> torch.Tensor:
        return self._conv[0].run(x, shortcut)


class ClampInput(nn.Module):
    """What a norm -> ReLU before a conv leaves behind once `fuse()` folds them into the conv:
    relu(a * x + b) = a * clamp(x, -b/a) + b per channel (clamped from below where a > 0, from
    above where a < 0), with a and b moved into the conv's weight and bias. One pass over the
    input instead of two."""

    def __init__(self, low: torch.Tensor, high: torch.Tensor) -> None:
        super().__init__()
        # derived from the folded norm, so not state: kept out of the state dict
        self.register_buffer("low", low.reshape(1, -1, 1, 1), persistent=False)
        self.register_buffer("high", high.reshape(1, -1, 1, 1), persistent=False)
        # all scales positive, as in most trained nets: a maximum is faster than a clamp
        self.lower_only = bool(torch.isinf(high).all() and (high > 0).all())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        low = self.low.to(x.dtype)  # under autocast x may be bf16: keep it so
        if self.lower_only:
            return torch.maximum(x, low)
        return torch.clamp(x, low, self.high.to(x.dtype))

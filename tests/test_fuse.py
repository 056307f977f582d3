"""Backbone.fuse(): BatchNorm folded into the preceding conv, conv + activation as one oneDNN
call on CPU, same outputs, eval only."""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from backbones import Backbone, create
from backbones import _fusion as fusion
from backbones._fusion import (
    ONEDNN_ACTIVATIONS,
    WINOGRAD_F2,
    WINOGRAD_F4,
    WINOGRAD_F4_MIN_WORK,
    WINOGRAD_MIN_WORK,
    ClampInput,
    FusedConv2d,
    FusedResidual,
    Winograd,
    onednn_usable,
    winograd_conv3x3,
    winograd_weight,
)
from backbones.densenet import DenseBlock, DenseLayer, DenseNet
from backbones.layers import ConvNormAct, Residual

from .conftest import max_rel_error, randomize_norms


def _all_levels(name: str) -> tuple[str, ...]:
    with torch.device("meta"):
        return tuple(f.name for f in create(name, out_features=("C5",)).feature_info)


def test_fused_outputs_match(name: str) -> None:
    torch.manual_seed(0)
    model = randomize_norms(create(name, out_features=_all_levels(name))).eval()
    x = torch.randn(2, 3, 48, 48)  # C5 is 2x2 (1x1 would hide a spatial mix-up)
    with torch.no_grad():
        expected = model(x)
        assert model.fuse() is model
        actual = model(x)
    for level, feature in expected.items():
        assert max_rel_error(actual[level], feature) <= 1e-4, level
    # Every norm that follows a conv is gone; DenseNet's norm-ReLU-conv norms became clamps
    # folded into the conv after them, and only the final norm (followed by a ReLU alone) stays.
    remaining = [n for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]
    if isinstance(model, DenseNet):
        assert remaining == [f"stages.{len(model.stages) - 1}.norm"]
        clamps = [n for n, m in model.named_modules() if isinstance(m, ClampInput)]
        layers = [n for n, m in model.named_modules() if isinstance(m, DenseLayer)]
        assert len(clamps) == len(layers) + len(model.stages) - 1  # + one per transition
        assert all(n.endswith((".norm1", "transition.norm")) for n in clamps)
    else:
        assert remaining == []
    conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d) and m.kernel_size != (1, 1))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)


def test_fuse_needs_eval_mode_and_forbids_training() -> None:
    model = create("resnet18", out_features=("C3",))
    with pytest.raises(RuntimeError, match=r"only valid for inference: call \.eval\(\) first"):
        model.fuse()
    model.eval().fuse()
    with pytest.raises(RuntimeError, match=r"was fuse\(\)d for inference.*cannot be trained"):
        model.train()


class _UsedTwice(nn.Module):
    """A conv whose output feeds its norm and, again, a sum: the norm cannot be folded."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.norm = nn.BatchNorm2d(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return self.norm(y) + y


class _Tiny(Backbone):
    """A backbone that is only `stem` (by default a conv-norm-act and `_UsedTwice`)."""

    def __init__(self, stem: nn.Module | None = None, in_chans: int = 3) -> None:
        super().__init__(out_features=("C1",), in_chans=in_chans)
        self.stem = stem or nn.Sequential(ConvNormAct(3, 8, 3, stride=2), _UsedTwice())
        self.add_level(8, stride=2)
        self.stages = nn.ModuleList()
        self.finalize()


def test_only_sole_consumers_are_folded() -> None:
    model = randomize_norms(_Tiny()).eval()
    x = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        expected = model(x)["C1"]
        model.fuse()
        actual = model(x)["C1"]
    assert isinstance(model.stem[0].norm, nn.Identity)
    assert isinstance(model.stem[1].norm, nn.BatchNorm2d)
    assert max_rel_error(actual, expected) <= 1e-5


class _TwoActivations(nn.Module):
    """One conv output read by two activation modules: neither is its sole consumer."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.relu = nn.ReLU()
        self.hardswish = nn.Hardswish()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return self.relu(y) + self.hardswish(y)


def test_an_output_read_by_two_consumers_is_not_fused() -> None:
    model = _Tiny(_TwoActivations(), in_chans=8).eval()
    x = torch.randn(1, 8, 6, 6)
    with torch.no_grad():
        expected = model.stem(x)
        model.fuse()
        actual = model.stem(x)
    assert isinstance(model.stem.relu, nn.ReLU) and isinstance(model.stem.hardswish, nn.Hardswish)
    assert max_rel_error(actual, expected) <= 1e-5


def _ops(run: Callable[[], object]) -> set[str]:
    """The ATen/oneDNN ops `run` calls: packets ("aten.add_") and overloads ("aten.add_.Tensor")."""

    class Ops(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.update((str(func.overloadpacket), str(func)))
            return func(*args, **(kwargs or {}))

    seen: set[str] = set()
    with Ops():
        run()
    return seen


@pytest.mark.skipif(not onednn_usable(), reason="this PyTorch has no oneDNN")
@pytest.mark.parametrize("act_type", list(ONEDNN_ACTIVATIONS), ids=lambda t: t.__name__)
def test_onednn_post_op_equals_eager_activation(act_type: type[nn.Module]) -> None:
    torch.manual_seed(0)
    conv, act = nn.Conv2d(8, 16, 3, stride=2, padding=1), act_type()
    fused = FusedConv2d(conv, act)
    x = torch.randn(2, 8, 15, 15).to(memory_format=torch.channels_last) * 4
    with torch.no_grad():
        assert "mkldnn._convolution_pointwise" in _ops(lambda: fused(x))
        assert max_rel_error(fused(x), act(conv(x))) <= 1e-5


@pytest.mark.skipif(not onednn_usable(), reason="this PyTorch has no oneDNN")
def test_fused_convs_stay_convs_and_repack_after_weight_changes() -> None:
    torch.manual_seed(0)
    model = create("resnet18", out_features=("C3",)).eval()
    keys = set(model.state_dict())
    model.fuse()
    block = model.stages[0][1]
    assert isinstance(model.stem.conv, FusedConv2d) and isinstance(model.stem.act, nn.Identity)
    assert block.conv1.conv.extra_repr().endswith("post_op=relu")
    assert isinstance(block.conv1.act, nn.Identity)
    # the second conv's output meets the shortcut, then the ReLU: both are its post-ops, and
    # the block's residual module runs it
    assert block.conv2.conv.extra_repr().endswith("post_op=add+relu")
    assert isinstance(block.residual, FusedResidual)
    assert set(model.state_dict()) <= keys | {k.replace("weight", "bias") for k in keys}
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        before = model(x)["C3"]
        model.stem.conv.weight.mul_(2)  # in place, as load_state_dict does: repacked
        assert "mkldnn._convolution_pointwise" in _ops(lambda: model(x))
        after, copied = model(x)["C3"], copy.deepcopy(model)(x)["C3"]
    assert not torch.allclose(after, before)
    torch.testing.assert_close(copied, after)
    # with autograd on, the plain conv2d + activation path: the same numbers
    plain = model(x.requires_grad_())["C3"]
    assert max_rel_error(plain.detach(), after) <= 1e-5
    assert "mkldnn._convolution_pointwise" not in _ops(lambda: model(x))


# ------------------------------------------------------------------------ Winograd F(2x2, 3x3)


# max relative error against a direct fp32 conv: F(4x4, 3x3)'s transforms have larger
# coefficients (up to 8 in A^T, 5 in B^T, 1/24 in G), hence ~10x F(2x2)'s rounding
TOLERANCE = {2: 1e-5, 4: 5e-5}


@pytest.mark.parametrize("algorithm", [WINOGRAD_F2, WINOGRAD_F4], ids=["F2x2", "F4x4"])
@pytest.mark.parametrize("size", [(1, 1), (2, 3), (7, 7), (6, 9), (8, 12), (14, 14)])
@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
def test_winograd_equals_conv2d(
    algorithm: Winograd, size: tuple[int, int], channels_last: bool, bias: bool
) -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(24, 40, 3, padding=1, bias=bias)
    x = torch.randn(2, 24, *size)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    with torch.no_grad():
        expected = conv(x)
        u = winograd_weight(conv.weight, algorithm)
        actual = winograd_conv3x3(x, u, conv.bias, algorithm)
    assert u.shape == ((algorithm.output + 2) ** 2, 24, 40)
    assert actual.shape == expected.shape
    assert actual.is_contiguous(memory_format=torch.channels_last)
    assert max_rel_error(actual, expected) <= TOLERANCE[algorithm.output]


def test_winograd_in_batch_chunks_equals_one_pass(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(16, 16, 3, padding=1)
    x, u, bias = torch.randn(5, 16, 7, 7), winograd_weight(conv.weight), conv.bias.detach()
    whole = winograd_conv3x3(x, u, bias)
    # 16 positions x 16 tiles x 16 channels x 4 bytes = 16 KiB per image: chunks of 2, 2, 1
    monkeypatch.setattr(fusion, "WINOGRAD_CHUNK_BYTES", 2 * 16 * 16 * 16 * 4)
    torch.testing.assert_close(winograd_conv3x3(x, u, bias), whole, rtol=0, atol=0)


@pytest.mark.skipif(not onednn_usable(), reason="this PyTorch has no oneDNN")
def test_winograd_runs_only_where_it_applies_and_pays() -> None:
    torch.manual_seed(0)
    wide = nn.Conv2d(128, 128, 3, padding=1)
    cases = {  # conv, input shape, tile size (0: oneDNN's direct conv)
        "wide, big input": (FusedConv2d(wide, nn.ReLU()), (8, 128, 28, 28), 4),
        "wide, medium input": (FusedConv2d(wide, nn.ReLU()), (8, 128, 14, 14), 2),
        "wide, small input": (FusedConv2d(wide, nn.ReLU()), (2, 128, 14, 14), 0),
        "disabled": (FusedConv2d(wide, nn.ReLU(), winograd=False), (8, 128, 28, 28), 0),
        "narrow": (FusedConv2d(nn.Conv2d(64, 128, 3, padding=1), None), (8, 64, 28, 28), 0),
        "strided": (FusedConv2d(nn.Conv2d(128, 128, 3, 2, 1), None), (8, 128, 28, 28), 0),
    }
    work = {shape: shape[0] * shape[2] * shape[3] * 128 * 128 for _, shape, _ in cases.values()}
    assert work[(8, 128, 28, 28)] >= WINOGRAD_F4_MIN_WORK > work[(8, 128, 14, 14)]
    assert work[(8, 128, 14, 14)] >= WINOGRAD_MIN_WORK > work[(2, 128, 14, 14)]
    for case, (conv, shape, tile) in cases.items():
        x = torch.randn(shape).to(memory_format=torch.channels_last)
        with torch.no_grad():
            ops = _ops(lambda conv=conv, x=x: conv(x))
            expected = conv.act(nn.functional.conv2d(x, conv.weight, conv.bias, conv.stride, 1))
            assert max_rel_error(conv(x), expected) <= TOLERANCE.get(tile, 1e-5), case
        assert ("aten.bmm" in ops) is bool(tile), case
        assert ("mkldnn._convolution_pointwise" in ops) is not bool(tile), case
        if tile:
            assert set(conv._packed) == {f"F{tile}"}, case  # the weight transformed for it
        assert ("winograd=True" in conv.extra_repr()) is (
            case != "disabled" and conv.winograd_applies()
        )


@pytest.mark.skipif(not onednn_usable(), reason="this PyTorch has no oneDNN")
@pytest.mark.parametrize("tile", [2, 4])
@pytest.mark.parametrize("name", ["vgg11_bn", "resnet18"])
def test_fused_network_with_winograd_everywhere_matches(
    name: str, tile: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    # at test sizes the work thresholds keep Winograd off; here every wide 3x3 conv takes it
    monkeypatch.setattr(fusion, "WINOGRAD_MIN_WORK", 0)
    monkeypatch.setattr(fusion, "WINOGRAD_F4_MIN_WORK", 0 if tile == 4 else 2**62)
    torch.manual_seed(0)
    model = randomize_norms(create(name, out_features=_all_levels(name))).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = model(x)
        model.fuse()
        ops = _ops(lambda: model(x))
        actual = model(x)
    assert "aten.bmm" in ops
    assert {key for m in model.modules() if isinstance(m, FusedConv2d) for key in m._packed} >= {
        f"F{tile}"
    }
    for level, feature in expected.items():
        assert max_rel_error(actual[level], feature) <= 1e-4, level


def test_fuse_without_winograd() -> None:
    model = create("vgg11_bn", out_features=("C5",)).eval()
    assert any(getattr(m, "winograd", False) for m in copy.deepcopy(model).fuse().modules())
    assert not any(getattr(m, "winograd", False) for m in model.fuse(winograd=False).modules())


# ----------------------------------------------------------------- residual sum as a post-op


@pytest.mark.skipif(not onednn_usable(), reason="this PyTorch has no oneDNN")
@pytest.mark.parametrize("name", ["resnet50", "mobilenet_v2"])
def test_residual_sum_runs_inside_the_conv(name: str) -> None:
    torch.manual_seed(0)
    model = randomize_norms(create(name, out_features=("C2",))).eval()
    block = next(m for m in model.modules() if hasattr(m, "residual") and _has_identity(m))
    x = torch.randn(2, _block_in_channels(block), 16, 16)
    with torch.no_grad():
        expected = block(x.clone())
        model.fuse()
        assert isinstance(block.residual, FusedResidual)
        for memory_format in (torch.channels_last, torch.contiguous_format):
            xf = x.to(memory_format=memory_format)
            ops = _ops(lambda xf=xf: block(xf))
            assert "mkldnn._convolution_pointwise.binary" in ops
            assert "aten.add_" not in ops and "aten.add" not in ops
            assert max_rel_error(block(xf), expected) <= 1e-5


def _has_identity(block: nn.Module) -> bool:
    return isinstance(getattr(block, "shortcut", None), nn.Identity) or getattr(
        block, "has_shortcut", False
    )


def _block_in_channels(block: nn.Module) -> int:
    return next(m for m in block.modules() if isinstance(m, nn.Conv2d)).in_channels


class _ResidualWith(nn.Module):
    """conv -> act, summed with the input by a Residual whose activation is `act_layer`."""

    def __init__(self, act_layer: type[nn.Module]) -> None:
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 1)
        self.residual = Residual(act_layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.residual(self.conv(x), x)


@pytest.mark.skipif(not onednn_usable(), reason="this PyTorch has no oneDNN")
def test_residual_with_an_activation_onednn_cannot_apply_is_left_alone() -> None:
    # oneDNN's binary post-op takes a ReLU (or nothing) after the sum; not a Hardswish
    stem = nn.Sequential(_ResidualWith(nn.ReLU), _ResidualWith(nn.Hardswish))
    model = _Tiny(stem, in_chans=8).eval()
    x = torch.randn(1, 8, 6, 6)
    with torch.no_grad():
        expected = model.stem(x)
        model.fuse()
        actual = model.stem(x)
    assert isinstance(model.stem[0].residual, FusedResidual)
    assert isinstance(model.stem[1].residual, Residual)
    assert max_rel_error(actual, expected) <= 1e-5


# -------------------------------------------- norm -> ReLU -> conv, and pool after a 1x1 conv


class _PreActivation(nn.Module):
    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        self.norm = nn.BatchNorm2d(conv.in_channels)
        self.act = nn.ReLU(inplace=True)
        self.conv = conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(self.act(self.norm(x)))


@pytest.mark.parametrize(
    "conv",
    [
        nn.Conv2d(8, 6, 1, bias=False),
        nn.Conv2d(8, 6, 3, stride=2, bias=True),
        nn.Conv2d(8, 6, 3, dilation=2, groups=2),
    ],
    ids=["1x1", "3x3_stride2_bias", "3x3_dilated_grouped"],
)
def test_norm_relu_before_an_unpadded_conv_folds_into_a_clamp(conv: nn.Conv2d) -> None:
    torch.manual_seed(0)
    model = _Tiny(_PreActivation(conv), in_chans=8).eval()
    norm = model.stem.norm
    with torch.no_grad():
        # scales of both signs and zero: clamped from below, from above, and a constant
        norm.weight.copy_(torch.tensor([1.5, -0.7, 0.0, 0.3, -2.0, 1.0, 0.0, 0.8]))
        norm.bias.uniform_(-1, 1)
        norm.running_mean.uniform_(-0.5, 0.5)
        norm.running_var.uniform_(0.5, 1.5)
    x = torch.randn(2, 8, 11, 11)
    with torch.no_grad():
        expected = model.stem(x)
        model.fuse()
        actual = model.stem(x)
    assert isinstance(model.stem.norm, ClampInput) and not model.stem.norm.lower_only
    assert isinstance(model.stem.act, nn.Identity)
    assert max_rel_error(actual, expected) <= 1e-5
    assert not any("low" in key or "high" in key for key in model.state_dict())


def test_norm_relu_before_a_padded_conv_stays() -> None:
    model = _Tiny(_PreActivation(nn.Conv2d(8, 8, 3, padding=1)), in_chans=8).eval()
    model.fuse()  # zero padding would see the shift that the clamp form moves into the bias
    assert isinstance(model.stem.norm, nn.BatchNorm2d)


@pytest.mark.parametrize("size", [45, 64])
def test_densenet_transitions_pool_before_their_conv(size: int) -> None:
    torch.manual_seed(0)
    model = randomize_norms(create("densenet121", out_features=("C2", "C3", "C4"))).eval()
    x = torch.randn(1, 3, size, size)  # 45: odd maps, ceil-mode pools with partial windows
    with torch.no_grad():
        expected = model(x)
        model.fuse()
        actual = model(x)
    transitions = [stage.transition for stage in model.stages[2:]]
    for transition in transitions:
        assert isinstance(transition.pool, nn.Identity)
        assert transition.conv.pool_first is not None
    for level, feature in expected.items():
        assert max_rel_error(actual[level], feature) <= 1e-5, level


@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
def test_dense_block_shared_buffer_equals_concatenation(channels_last: bool) -> None:
    torch.manual_seed(0)
    block = randomize_norms(DenseBlock(3, in_channels=16, growth_rate=8, bn_size=2)).eval()
    x = torch.randn(2, 16, 9, 9)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    concatenated = block(x).detach()  # autograd on: the list-and-cat path
    with torch.no_grad():
        shared = block(x)  # one preallocated buffer
    torch.testing.assert_close(shared, concatenated, rtol=0, atol=0)
    assert shared.is_contiguous(memory_format=torch.channels_last) is channels_last

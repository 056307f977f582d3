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
from backbones._fusion import ONEDNN_ACTIVATIONS, FusedConv2d, onednn_usable
from backbones.densenet import DenseNet
from backbones.layers import ConvNormAct

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
    # Every norm that follows a conv is gone; DenseNet keeps its norm-ReLU-conv norms (their
    # inputs are concatenations and pooled maps) and the final norm.
    remaining = [n for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]
    if isinstance(model, DenseNet):
        last = f"stages.{len(model.stages) - 1}.norm"
        assert remaining and all(
            n.endswith((".norm1", "transition.norm")) or n == last for n in remaining
        ), remaining
        assert not any(n.endswith(".norm2") for n in remaining)
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
    def __init__(self) -> None:
        super().__init__(out_features=("C1",))
        self.stem = nn.Sequential(ConvNormAct(3, 8, 3, stride=2), _UsedTwice())
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


def _ops(run: Callable[[], object]) -> set[str]:
    class Ops(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.add(str(func.overloadpacket))
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
    # the second conv's output meets the shortcut (in place) before the ReLU: no post-op
    assert block.conv2.conv.extra_repr().endswith("post_op=none")
    assert isinstance(block.act, nn.ReLU)
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

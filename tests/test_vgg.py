"""VGG: the norm after each conv, and pooling that keeps odd sizes."""

from __future__ import annotations

from functools import partial

import torch
from torch import nn

from backbones import create


def test_norm_layer_defaults_to_the_variant_and_can_be_replaced() -> None:
    with torch.device("meta"):
        plain, with_bn = create("vgg16"), create("vgg16_bn")
        plain_plus_bn = create("vgg16", norm_layer=nn.BatchNorm2d)
        group_norm = create("vgg16_bn", norm_layer=partial(nn.GroupNorm, 32))
    assert not any(isinstance(m, nn.BatchNorm2d) for m in plain.modules())
    assert plain_plus_bn.state_dict().keys() == with_bn.state_dict().keys()
    norms = [m for m in group_norm.modules() if isinstance(m, nn.GroupNorm | nn.BatchNorm2d)]
    assert len(norms) == 13 and all(isinstance(m, nn.GroupNorm) for m in norms)


def test_odd_sizes_keep_their_last_row_and_column() -> None:
    # 2x2 pools in ceil mode: 33 -> 17 -> 9 -> 5 -> 3 -> 2; the extra row holds the last one's max.
    torch.manual_seed(0)
    model = create("vgg11", out_features=("C1", "C5")).eval()
    x = torch.randn(1, 3, 33, 33)
    with torch.no_grad():
        features = model(x)
        stem_out = model.stem[:-1](x)  # the convs before the first pool, (1, 64, 33, 33)
    assert features["C1"].shape[-2:] == (17, 17) and features["C5"].shape[-2:] == (2, 2)
    torch.testing.assert_close(features["C1"][..., -1, -1], stem_out[..., -1, -1])

"""VGG: the norm after each conv, stages that open with the pool, pooling that keeps odd sizes."""

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
        stem_out = model.stem(x)  # conv1_1, stride 1: (1, 64, 33, 33)
        pool1 = model.stages[0].pool(stem_out)
    assert features["C1"].shape[-2:] == (17, 17) and features["C5"].shape[-2:] == (2, 2)
    assert pool1.shape[-2:] == (17, 17)
    torch.testing.assert_close(pool1[..., -1, -1], stem_out[..., -1, -1])


def test_stages_open_with_the_pool() -> None:
    # Stage k = pool k + the convs of block k+1 (C1..C4, the map before each pool); C5 = pool5.
    with torch.device("meta"):
        model = create("vgg16", out_features=("C1", "C2", "C3", "C4", "C5"))
    assert not any(isinstance(m, nn.MaxPool2d) for m in model.stem.modules())
    assert [type(stage[0]) for stage in model.stages] == [nn.MaxPool2d] * 5
    assert [len(stage) - 1 for stage in model.stages] == [2, 3, 3, 3, 0]  # convs after the pool
    assert [(f.name, f.channels, f.stride) for f in model.feature_info] == [
        ("C1", 128, 2),
        ("C2", 256, 4),
        ("C3", 512, 8),  # conv4_3: SSD's stride-8 feature
        ("C4", 512, 16),
        ("C5", 512, 32),
    ]

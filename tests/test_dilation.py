"""output_stride: dilated stages give torchvision's and timm's dilated networks exactly."""

from __future__ import annotations

import math

import pytest
import timm
import torch
import torchvision
from torch import nn

from backbones import Backbone, convert, create, get_entry, list_backbones
from backbones.weights import backbone_part
from heads import ClassificationHead, Classifier, Segmenter
from heads.detection import BackboneWithFPN, Detector

from .conftest import max_rel_error, randomize_weights

TOLERANCE = 1e-5
ODD = (129, 161)  # off the /32 grid in both directions: ceil and padding rules show
DILATED = ["resnet50", "mobilenet_v2", "mobilenet_v3_large", "efficientnet_b0", "convnext_tiny"]


def converted(name: str, reference: nn.Module, source: str, **kwargs: object) -> Backbone:
    """Our backbone with `reference`'s weights (random: `randomize_weights`), eval mode."""
    model = create(name, **kwargs)
    model.load_state_dict(backbone_part(convert(name, reference.state_dict(), source=source)))
    return model.eval()


def assert_same(got: torch.Tensor, expected: torch.Tensor) -> None:
    assert got.shape == expected.shape
    assert max_rel_error(got, expected) <= TOLERANCE
    # the two images give different maps, so the input shows in what is compared
    assert max_rel_error(expected[0], expected[1]) > 1e3 * TOLERANCE


@pytest.mark.parametrize(
    ("output_stride", "replace_stride_with_dilation"),
    [(8, [False, True, True]), (16, [False, False, True])],
)
def test_resnet50_is_torchvisions_dilated_resnet(
    output_stride: int, replace_stride_with_dilation: list[bool]
) -> None:
    torch.manual_seed(0)
    reference = torchvision.models.resnet50(
        replace_stride_with_dilation=replace_stride_with_dilation
    )
    reference = randomize_weights(reference).eval()
    ours = converted(
        "resnet50",
        reference,
        "torchvision",
        output_stride=output_stride,
        out_features=("C2", "C3", "C4", "C5"),
    )
    assert ours.strides == {"C2": 4, "C3": 8, "C4": min(16, output_stride), "C5": output_stride}
    x = torch.randn(2, 3, *ODD, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got = ours(x)
        r = reference
        expected = {"C2": r.layer1(r.maxpool(r.relu(r.bn1(r.conv1(x)))))}
        for level, layer in zip(("C3", "C4", "C5"), (r.layer2, r.layer3, r.layer4), strict=True):
            expected[level] = layer(next(reversed(expected.values())))
    for level, want in expected.items():
        assert_same(got[level], want)
    assert got["C5"].shape[-2:] == tuple(math.ceil(s / output_stride) for s in ODD)


@pytest.mark.parametrize("name", ["mobilenet_v3_large", "mobilenet_v3_small"])
def test_mobilenet_v3_is_torchvisions_dilated_mobilenet(name: str) -> None:
    """torchvision's `dilated=True` (DeepLabV3's and LR-ASPP's backbone) is output_stride 16."""
    torch.manual_seed(0)
    reference = randomize_weights(torchvision.models.get_model(name, dilated=True)).eval()
    ours = converted(name, reference, "torchvision", output_stride=16, out_features=("C5",))
    assert ours.strides == {"C5": 16}
    x = torch.randn(2, 3, *ODD, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert_same(ours(x)["C5"], reference.features(x))


@pytest.mark.parametrize("output_stride", [8, 16])
@pytest.mark.parametrize(
    ("name", "timm_name"),
    [
        ("resnet18", "resnet18"),  # torchvision has no dilated BasicBlock
        ("mobilenet_v2", "mobilenetv2_100"),
        ("efficientnet_b0", "efficientnet_b0"),
        ("convnext_tiny", "convnext_tiny"),
    ],
)
def test_families_torchvision_cannot_dilate_are_timms(
    name: str, timm_name: str, output_stride: int
) -> None:
    torch.manual_seed(0)
    reference = randomize_weights(timm.create_model(timm_name, output_stride=output_stride)).eval()
    ours = converted(name, reference, "timm", output_stride=output_stride, out_features=("C5",))
    # timm's ConvNeXt floors odd sizes in its patchify convs where ours pads: a /32 size
    size = (64, 96) if name.startswith("convnext") else (65, 97)
    x = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert_same(ours(x)["C5"], reference.forward_features(x))


@pytest.mark.parametrize(
    "name", [n for n in list_backbones() if not n.startswith(("vgg", "densenet"))]
)
def test_levels_keep_their_names_and_report_real_strides(name: str) -> None:
    with torch.device("meta"):
        models = {os: create(name, output_stride=os) for os in (8, 16)}
    for output_stride, model in models.items():
        assert [f.stride for f in model.feature_info] == [
            min(2 ** int(f.name[1:]), output_stride) for f in model.feature_info
        ]
        assert model.strides == {"C3": 8, "C4": min(16, output_stride), "C5": output_stride}
        assert model.feature_info.reduction() == list(model.strides.values())
    # the same levels and parameters at every output stride: any weights load as they are
    # (the parity tests above load undilated references into dilated models, strictly)
    eight, sixteen = models.values()
    assert [(f.name, f.channels) for f in eight.feature_info] == [
        (f.name, f.channels) for f in sixteen.feature_info
    ]
    assert {k: v.shape for k, v in eight.state_dict().items()} == {
        k: v.shape for k, v in sixteen.state_dict().items()
    }


@pytest.mark.parametrize("name", DILATED)
def test_dilated_shapes_on_an_odd_size(name: str) -> None:
    model = create(name, output_stride=8, out_features=("C2", "C3", "C4", "C5")).eval()
    with torch.no_grad():
        features = model(torch.randn(1, 3, *ODD))
    for level, feature in features.items():
        stride = model.strides[level]
        assert feature.shape[-2:] == tuple(math.ceil(s / stride) for s in ODD), level
        assert torch.isfinite(feature).all()


@pytest.mark.parametrize("name", ["vgg16", "densenet121"])
def test_families_without_dilation_refuse_it(name: str) -> None:
    family = get_entry(name).family.__name__
    with pytest.raises(
        TypeError,
        match=rf"^{name} got an unexpected keyword argument 'output_stride'\. 'output_stride' is "
        rf"an argument of ConvNeXt, EfficientNet, MobileNetV2, MobileNetV3, ResNet, not of "
        rf"{family}\. {family} takes: out_features, in_chans, frozen_stages, norm_eval, "
        r"norm_layer",
    ):
        create(name, output_stride=16)
    with torch.device("meta"):
        assert create(name, output_stride=32).strides["C5"] == 32  # asks for nothing: accepted
        # built directly, the family says the same in fewer words
        family = get_entry(name).family
        with pytest.raises(TypeError, match=rf"^{family.__name__} has no output_stride \(got 8\)"):
            get_entry(name).fn(output_stride=8)


@pytest.mark.parametrize("output_stride", [4, 64, 12])
def test_output_stride_is_8_16_or_32(output_stride: int) -> None:
    with (
        pytest.raises(
            ValueError, match=rf"output_stride must be 8, 16 or 32 .*got {output_stride}"
        ),
        torch.device("meta"),
    ):
        create("resnet18", output_stride=output_stride)


def test_fpn_heads_refuse_dilated_levels_and_classification_takes_them() -> None:
    with torch.device("meta"):
        dilated = create("resnet18", output_stride=16, out_features=("C3", "C4", "C5"))
    message = (
        r"builds an FPN, which needs each level at twice the stride of the one before; this "
        r"backbone is dilated: C3 \(stride 8\), C4 \(stride 16\), C5 \(stride 16\)\. Build it "
        r"with output_stride=32"
    )
    with pytest.raises(ValueError, match=rf"^Segmenter {message}"):
        Segmenter(dilated, num_classes=3)
    with pytest.raises(ValueError, match=rf"^BackboneWithFPN {message}"):
        BackboneWithFPN(dilated)
    with pytest.raises(ValueError, match=rf"^BackboneWithFPN {message}"):
        Detector(dilated, num_classes=3)
    # a classification head pools whatever it gets: multi-scale over the dilated levels
    dilated = create("resnet18", output_stride=16, out_features=("C3", "C4", "C5"))
    model = Classifier(dilated, ClassificationHead(dilated.channels, 4)).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 64, 64)).shape == (1, 4)

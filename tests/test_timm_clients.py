"""Code that builds its backbone by timm name takes ours with no glue (`import backbones.timm_models`).

segmentation_models_pytorch's `tu-` encoders and effdet's `backbone_name`, as they stand: no
shim, no registration of our own. Small decoders and inputs: the wiring is under test.
"""

from __future__ import annotations

import effdet
import pytest
import segmentation_models_pytorch as smp
import torch
import torch.nn.functional as F
from torch import nn

import backbones.timm_models  # noqa: F401  (registers zoo_<name> with timm)
from backbones import Backbone
from heads import FeatureList

# Small decoders: what is tested is how they are wired to our encoder, not their width.
SMP = {
    "Unet": {"decoder_channels": (32, 16, 16, 8, 8)},
    "FPN": {"decoder_pyramid_channels": 32, "decoder_segmentation_channels": 32},  # GroupNorm(32)
    "DeepLabV3Plus": {"encoder_output_stride": 16, "decoder_channels": 32},
}
# the encoder's maps, input first, as smp's decoders read them (ConvNeXt has no stride-2 level:
# smp puts an empty map there, as for its transformer-style timm encoders)
CHANNELS = {
    "resnet50": [3, 64, 256, 512, 1024, 2048],
    "efficientnet_b0": [3, 16, 24, 40, 112, 1280],
    "mobilenet_v3_large": [3, 16, 24, 40, 112, 960],
    "convnext_tiny": [3, 0, 96, 192, 384, 768],
}


def the_backbone(model: nn.Module) -> Backbone:
    """Ours, inside the client's model: exactly one."""
    (backbone,) = [m for m in model.modules() if isinstance(m, Backbone)]
    return backbone


def assert_backward_reaches_the_stem(backbone: Backbone) -> None:
    stem_conv = next(m for m in backbone.stem.modules() if isinstance(m, nn.Conv2d))
    assert stem_conv.weight.grad is not None and stem_conv.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("arch", list(SMP))
@pytest.mark.parametrize("encoder", list(CHANNELS))
def test_smp_takes_ours_by_timm_name(encoder: str, arch: str) -> None:
    torch.manual_seed(0)
    model = getattr(smp, arch)(
        encoder_name=f"tu-zoo_{encoder}", encoder_weights=None, classes=3, **SMP[arch]
    ).train()
    assert model.encoder.out_channels == CHANNELS[encoder]
    backbone = the_backbone(model)
    if arch == "DeepLabV3Plus":  # dilated, not strided, past stride 16
        assert backbone.strides["C5"] == 16 and backbone.output_stride == 16
    x = torch.randn(2, 3, 64, 64)
    logits = model(x)
    assert logits.shape == (2, 3, 64, 64)
    loss = F.cross_entropy(logits, torch.randint(0, 3, (2, 64, 64)))
    assert torch.isfinite(loss)
    loss.backward()
    assert_backward_reaches_the_stem(backbone)


@pytest.mark.parametrize(
    ("backbone_name", "backbone_args"),
    [
        ("zoo_efficientnet_b0", None),  # efficientdet_d0's own drop_path_rate=0.1
        ("zoo_mobilenet_v3_large", {"drop_path_rate": 0.2}),  # as effdet's larger configs
    ],
)
def test_effdet_takes_ours_by_timm_name(backbone_name: str, backbone_args: dict | None) -> None:
    torch.manual_seed(0)
    config = effdet.get_efficientdet_config("efficientdet_d0")
    config.update(backbone_name=backbone_name, num_classes=3, image_size=(128, 128))
    if backbone_args is not None:
        config.backbone_args = backbone_args
    bench = effdet.DetBenchTrain(effdet.EfficientDet(config, pretrained_backbone=False)).train()
    assert isinstance(bench.model.backbone, FeatureList)
    backbone = bench.model.backbone.backbone
    assert backbone.drop_path_rate == config.backbone_args["drop_path_rate"]
    assert bench.model.backbone.feature_info.reduction() == [8, 16, 32]  # BiFPN's P3..P5 inputs
    images = torch.randn(2, 3, 128, 128)
    boxes = torch.tensor([[10.0, 20.0, 60.0, 90.0], [30.0, 30.0, 100.0, 120.0]])  # y1 x1 y2 x2
    target = {"bbox": boxes.expand(2, 2, 4), "cls": torch.tensor([[1.0, 2.0], [2.0, 3.0]])}
    losses = bench(images, target)
    assert all(torch.isfinite(v) for v in losses.values()) and losses["box_loss"] > 0
    losses["loss"].backward()
    assert_backward_reaches_the_stem(backbone)

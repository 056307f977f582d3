"""torchvision's detectors on backbone + FPN: a training step and eval output, 3 and 5 levels;
torchvision's own constructors with their defaults on `BackboneWithFPN`."""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
from torchvision.models.detection import FCOS, FasterRCNN, MaskRCNN, RetinaNet, backbone_utils
from torchvision.models.detection import faster_rcnn as tv_faster_rcnn
from torchvision.models.detection import retinanet as tv_retinanet
from torchvision.ops.feature_pyramid_network import LastLevelP6P7

from backbones import create
from heads.detection import (
    BackboneWithFPN,
    anchor_generator,
    faster_rcnn,
    fcos,
    mask_rcnn,
    retinanet,
)

SIZE = 128
# min_size = max_size = the image size: the transform neither upscales to 800 nor pads past 128.
# A zero score threshold makes the untrained models return boxes, so the format is checked;
# fewer proposals and sampled RoIs than the defaults keep the R-CNN heads cheap on a CPU.
_RCNN = {
    "rpn_pre_nms_top_n_train": 200,
    "rpn_post_nms_top_n_train": 100,
    "rpn_pre_nms_top_n_test": 200,
    "rpn_post_nms_top_n_test": 100,
    "box_batch_size_per_image": 32,
    "box_score_thresh": 0.0,
}
OPTIONS = {
    fcos: {"score_thresh": 0.0, "detections_per_img": 10, "topk_candidates": 100},
    retinanet: {"score_thresh": 0.0, "detections_per_img": 10, "topk_candidates": 100},
    faster_rcnn: {**_RCNN, "box_detections_per_img": 10},
    mask_rcnn: {**_RCNN, "box_detections_per_img": 3},
}
LOSSES = {
    fcos: {"classification", "bbox_regression", "bbox_ctrness"},
    retinanet: {"classification", "bbox_regression"},
    faster_rcnn: {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"},
    mask_rcnn: {
        "loss_classifier",
        "loss_box_reg",
        "loss_objectness",
        "loss_rpn_box_reg",
        "loss_mask",
    },
}


@pytest.fixture(scope="module")
def batch() -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]:
    """Two 128x128 images with two and one boxes (and their box-shaped masks)."""
    generator = torch.Generator().manual_seed(0)
    images = [torch.rand(3, SIZE, SIZE, generator=generator) for _ in range(2)]
    boxes = [
        torch.tensor([[10.0, 20.0, 60.0, 90.0], [30.0, 5.0, 120.0, 100.0]]),
        torch.tensor([[40.0, 40.0, 100.0, 80.0]]),
    ]
    targets = []
    for image_boxes, labels in zip(boxes, [[1, 2], [2]], strict=True):
        masks = torch.zeros(len(image_boxes), SIZE, SIZE, dtype=torch.uint8)
        for mask, (x1, y1, x2, y2) in zip(masks, image_boxes.int().tolist(), strict=True):
            mask[y1:y2, x1:x2] = 1
        targets.append({"boxes": image_boxes, "labels": torch.tensor(labels), "masks": masks})
    return images, targets


def _build(builder, num_levels: int) -> torch.nn.Module:
    """resnet18 + a 64-channel FPN: C3..C5 alone, or the detector's usual five levels."""
    torch.manual_seed(0)
    if num_levels == 3:
        body = BackboneWithFPN(create("resnet18"), out_channels=64, extra_blocks=None)
    elif builder in (fcos, retinanet):  # P3..P7
        body = BackboneWithFPN(create("resnet18"), out_channels=64, extra_blocks="p6p7")
    else:  # P2..P6
        levels = ("C2", "C3", "C4", "C5")
        body = BackboneWithFPN(create("resnet18", out_features=levels), out_channels=64)
    return builder(body, num_classes=3, min_size=SIZE, max_size=SIZE, **OPTIONS[builder])


def _check_detections(detections: list[dict[str, torch.Tensor]], limit: int, masks: bool) -> None:
    assert isinstance(detections, list) and len(detections) == 2
    for found in detections:
        assert set(found) == (
            {"boxes", "scores", "labels", "masks"} if masks else {"boxes", "scores", "labels"}
        )
        n = found["boxes"].shape[0]
        assert 0 < n <= limit
        assert found["boxes"].shape == (n, 4) and found["boxes"].dtype == torch.float32
        assert found["scores"].shape == (n,) and torch.isfinite(found["scores"]).all()
        assert found["labels"].shape == (n,) and found["labels"].dtype == torch.int64
        assert ((found["labels"] >= 0) & (found["labels"] < 3)).all()
        boxes = found["boxes"]
        assert (boxes >= 0).all() and (boxes <= SIZE).all()
        assert (boxes[:, 2:] >= boxes[:, :2]).all()
        if masks:
            assert found["masks"].shape == (n, 1, SIZE, SIZE)


@pytest.mark.parametrize("num_levels", [3, 5])
@pytest.mark.parametrize("builder", [fcos, retinanet, faster_rcnn])
def test_train_step_and_eval(builder, num_levels: int, batch: tuple) -> None:
    model = _build(builder, num_levels)
    pyramid = model.backbone
    assert isinstance(pyramid, BackboneWithFPN) and len(pyramid.strides) == num_levels
    anchors = model.rpn.anchor_generator if builder is faster_rcnn else model.anchor_generator
    assert len(anchors.sizes) == num_levels  # one anchor set per level, whatever the depth
    if builder is faster_rcnn:
        # the FPN outputs of the backbone's levels, by torchvision's keys: not the extra ones
        names = [str(i) for i in range(len(pyramid.fpn.levels))]
        assert model.roi_heads.box_roi_pool.featmap_names == names

    images, targets = batch
    model.train()
    losses = model(images, targets)
    assert set(losses) == LOSSES[builder]
    assert all(torch.isfinite(loss) for loss in losses.values()), losses
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    sum(losses.values()).backward()
    stem = pyramid.body.get_submodule(pyramid.body.input_conv_name())
    assert stem.weight.grad is not None and torch.isfinite(stem.weight.grad).all()
    assert stem.weight.grad.abs().sum() > 0
    optimizer.step()

    model.eval()
    with torch.no_grad():
        detections = model(images)
    _check_detections(detections, limit=10, masks=False)


def test_mask_rcnn(batch: tuple) -> None:
    model = _build(mask_rcnn, num_levels=3)
    assert model.roi_heads.mask_roi_pool.featmap_names == ["0", "1", "2"]  # P3..P5
    # the mask branch is as wide as the 64-channel pyramid (torchvision's: 256 on any width)
    convs = [m for m in model.roi_heads.mask_head.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [(c.in_channels, c.out_channels) for c in convs] == [(64, 64)] * 4
    predictor = model.roi_heads.mask_predictor
    assert (predictor.conv5_mask.in_channels, predictor.mask_fcn_logits.out_channels) == (64, 3)
    images, targets = batch
    losses = model.train()(images, targets)
    assert set(losses) == LOSSES[mask_rcnn] and all(torch.isfinite(v) for v in losses.values())
    with torch.no_grad():
        detections = model.eval()(images)
    _check_detections(detections, limit=3, masks=True)


@pytest.mark.parametrize(
    ("builder", "levels"),
    [
        (fcos, ["P3", "P4", "P5", "P6", "P7"]),
        (retinanet, ["P3", "P4", "P5", "P6", "P7"]),
        (faster_rcnn, ["P3", "P4", "P5", "P6"]),
    ],
)
def test_builders_add_the_detectors_usual_fpn(builder, levels: list[str]) -> None:
    model = builder(create("resnet18"), num_classes=3)
    assert list(model.backbone.levels.values()) == levels and model.backbone.out_channels == 256
    anchors = model.rpn.anchor_generator if builder is faster_rcnn else model.anchor_generator
    assert len(anchors.sizes) == len(levels)
    if builder is faster_rcnn:  # RoIs from the backbone's levels, not the pooled P6
        assert model.roi_heads.box_roi_pool.featmap_names == ["0", "1", "2"]  # P3..P5


def test_backbone_with_fpn_is_what_torchvision_expects() -> None:
    body = create("resnet18")
    pyramid = BackboneWithFPN(body, out_channels=64, extra_blocks="p6p7")
    out = pyramid(torch.randn(1, 3, 97, 65))
    assert isinstance(out, OrderedDict) and pyramid.out_channels == 64
    assert list(out) == ["0", "1", "2", "p6", "p7"]  # torchvision's keys
    assert pyramid.levels == {"0": "P3", "1": "P4", "2": "P5", "p6": "P6", "p7": "P7"}
    assert pyramid.strides == {"0": 8, "1": 16, "2": 32, "p6": 64, "p7": 128}
    assert [tuple(t.shape) for t in out.values()] == [
        (1, 64, 13, 9),
        (1, 64, 7, 5),
        (1, 64, 4, 3),
        (1, 64, 2, 2),
        (1, 64, 1, 1),
    ]
    # The keys of torchvision's own FPN backbones, with either extra block.
    reference = backbone_utils.resnet_fpn_backbone(
        backbone_name="resnet18",
        weights=None,
        returned_layers=[2, 3, 4],
        extra_blocks=LastLevelP6P7(256, 256),  # its out_channels are 256
    )
    assert list(out) == list(reference(torch.randn(1, 3, 64, 64)))
    reference = backbone_utils.resnet_fpn_backbone(backbone_name="resnet18", weights=None)
    levels = ("C2", "C3", "C4", "C5")
    pyramid = BackboneWithFPN(create("resnet18", out_features=levels), out_channels=64)
    x = torch.randn(1, 3, 64, 64)
    assert list(pyramid(x)) == list(reference(x)) == ["0", "1", "2", "3", "pool"]


# torchvision's own constructors, default anchors and RoI poolers, on the pyramid depth their
# defaults are sized for: P3..P7 for the one-stage detectors, P2..P6 for the R-CNNs.
RAW = {
    FCOS: (fcos, "p6p7", ("C3", "C4", "C5")),
    RetinaNet: (retinanet, "p6p7", ("C3", "C4", "C5")),
    FasterRCNN: (faster_rcnn, "maxpool", ("C2", "C3", "C4", "C5")),
    MaskRCNN: (mask_rcnn, "maxpool", ("C2", "C3", "C4", "C5")),
}


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v3_small"])
@pytest.mark.parametrize("detector", list(RAW))
def test_torchvision_constructors_take_backbone_with_fpn(detector, name: str, batch) -> None:
    builder, extra_blocks, levels = RAW[detector]
    torch.manual_seed(0)
    body = BackboneWithFPN(create(name, out_features=levels), 64, extra_blocks=extra_blocks)
    # the options only shrink the work (image size, proposals, thresholds), see OPTIONS
    model = detector(body, num_classes=3, min_size=SIZE, max_size=SIZE, **OPTIONS[builder])
    if detector in (FasterRCNN, MaskRCNN):
        assert model.roi_heads.box_roi_pool.featmap_names == ["0", "1", "2", "3"]  # P2..P5

    images, targets = batch
    losses = model.train()(images, targets)
    assert set(losses) == LOSSES[builder]
    assert all(torch.isfinite(loss) for loss in losses.values()), losses
    sum(losses.values()).backward()
    stem = body.body.get_submodule(body.body.input_conv_name())
    assert stem.weight.grad is not None and stem.weight.grad.abs().sum() > 0
    with torch.no_grad():
        detections = model.eval()(images)
    _check_detections(detections, limit=10, masks=detector is MaskRCNN)


def test_anchor_sizes_reproduce_torchvision_defaults() -> None:
    # torchvision's five-level defaults (private helpers: the values are what matter)
    assert (
        anchor_generator([8, 16, 32, 64, 128], 4, 3).sizes
        == tv_retinanet._default_anchorgen().sizes
    )
    assert (
        anchor_generator([4, 8, 16, 32, 64], 8).sizes == tv_faster_rcnn._default_anchorgen().sizes
    )
    assert (
        anchor_generator([4, 8, 16, 32, 64], 8).aspect_ratios
        == tv_faster_rcnn._default_anchorgen().aspect_ratios
    )
    fcos_anchors = anchor_generator([8, 16, 32, 64, 128], 1, aspect_ratios=(1.0,))
    assert fcos_anchors.sizes == ((8,), (16,), (32,), (64,), (128,))  # FCOS's inline default
    assert fcos_anchors.num_anchors_per_location() == [1] * 5


@pytest.mark.parametrize(
    ("builder", "size", "expected"),
    [
        (fcos, 0.5, ((4,), (8,), (16,), (32,), (64,))),
        (retinanet, 1, ((8, 10, 12), (16, 20, 25), (32, 40, 50), (64, 80, 101), (128, 161, 203))),
        (faster_rcnn, 2, ((16,), (32,), (64,), (128,))),
        (mask_rcnn, 2, ((16,), (32,), (64,), (128,))),
    ],
)
def test_anchor_size_scales_the_anchors_with_the_stride(builder, size: float, expected) -> None:
    """Small objects (64 px images) take anchors smaller than COCO's: `anchor_size` strides."""
    torch.manual_seed(0)
    model = builder(create("resnet18", out_features=("C3", "C4", "C5")), 3, anchor_size=size)
    anchors = model.rpn.anchor_generator if hasattr(model, "rpn") else model.anchor_generator
    assert anchors.sizes == expected


def test_bad_input() -> None:
    with pytest.raises(
        TypeError, match=r"expected a backbones\.Backbone or a .*BackboneWithFPN, got Sequential"
    ):
        fcos(torch.nn.Sequential(), num_classes=3)
    with pytest.raises(ValueError, match=r"consecutive levels.*C3 \(stride 8\), C5 \(stride 32\)"):
        BackboneWithFPN(create("resnet18", out_features=("C3", "C5")))


def test_retinanet_group_norm_keeps_the_heads_signal() -> None:
    """torchvision's N(0, 0.01) head init all but erases a narrow pyramid's signal in four
    convs; GroupNorm after each (torchvision's retinanet_resnet50_fpn_v2) keeps it."""
    torch.manual_seed(0)
    body = BackboneWithFPN(create("resnet18"), out_channels=64, extra_blocks="p6p7")
    x = torch.randn(2, 64, 16, 16)
    spread = {}
    for group_norm in (False, True):
        model = retinanet(body, num_classes=3, anchor_size=1, group_norm=group_norm)
        tower = model.head.classification_head.conv
        norms = [m for m in tower.modules() if isinstance(m, torch.nn.GroupNorm)]
        assert len(norms) == (4 if group_norm else 0)
        assert all(n.num_groups == 32 for n in norms)
        with torch.no_grad():
            spread[group_norm] = float(tower(x).std() / x.std())
    assert spread[False] < 1e-2 < 0.1 < spread[True], spread

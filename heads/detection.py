"""Detection with torchvision's detectors on any backbone + FPN; the anchors, losses and NMS are theirs.

`BackboneWithFPN` is what torchvision's FasterRCNN / MaskRCNN / RetinaNet / FCOS take as a
backbone, keyed as torchvision's own, so their constructors work on it as they stand when
the pyramid has the five levels their default anchors are sized for. The builders size the
anchors from the pyramid's strides and name the RoI pooler's levels, so a pyramid of any
depth works: torchvision's default anchors fail on another depth at the first forward with
"Anchors should be Tuple[Tuple[int]]".
`Detector` is what training uses: one of those detectors, speaking the data's labels.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torchvision.models.detection import FCOS, FasterRCNN, MaskRCNN, RetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.retinanet import RetinaNetHead
from torchvision.ops import MultiScaleRoIAlign

from backbones import Backbone
from backbones.layers import GroupNorm, LayerFn

from ._levels import check_undilated
from .fpn import FPN

# torchvision's names for the extra levels of its FPN (`LastLevelMaxPool`, `LastLevelP6P7`)
EXTRA_KEYS = {None: (), "maxpool": ("pool",), "p6p7": ("p6", "p7")}


class BackboneWithFPN(nn.Module):
    """A backbone and an `FPN`, returning an `OrderedDict` of maps with one `out_channels`.

    The maps are keyed as by torchvision's own `BackboneWithFPN`: "0", "1", ... for the FPN
    outputs of the backbone's levels, fine to coarse, then "pool" ("maxpool") or "p6", "p7"
    ("p6p7"). torchvision's R-CNNs pool RoIs from the maps named "0".."3" by default, so
    `FasterRCNN(BackboneWithFPN(create("resnet50", out_features=("C2", "C3", "C4", "C5"))),
    num_classes)` is torchvision's `fasterrcnn_resnet50_fpn` layout. `levels` names each key's
    pyramid level (`{"0": "P2", ..., "pool": "P6"}`), `strides` gives its stride.

    Args:
        backbone: any registered backbone; its `out_features` are the FPN's inputs.
        out_channels: channels of every pyramid level.
        extra_blocks: None, "maxpool" (one more level, as torchvision's default for
            Faster/Mask R-CNN) or "p6p7" (two more, as RetinaNet and FCOS); see `FPN`.
        p6p7_from: "P" or "C", the input of "p6p7"; see `FPN`.
        norm_layer: the FPN's norm; None as in the paper.
    """

    def __init__(
        self,
        backbone: Backbone,
        out_channels: int = 256,
        extra_blocks: str | None = "maxpool",
        p6p7_from: str = "P",
        norm_layer: LayerFn | None = None,
    ) -> None:
        super().__init__()
        check_undilated("BackboneWithFPN", backbone.strides)
        self.body = backbone
        self.fpn = FPN(backbone.channels, out_channels, extra_blocks, p6p7_from, norm_layer)
        self.out_channels = out_channels
        keys = [str(i) for i in range(len(self.fpn.levels))] + list(EXTRA_KEYS[extra_blocks])
        self.levels = dict(zip(keys, self.fpn.channels, strict=True))  # key -> "P<k>"

    @property
    def strides(self) -> dict[str, int]:
        """Stride of each returned map, by its key, fine to coarse."""
        return {key: self.fpn.strides[level] for key, level in self.levels.items()}

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        pyramid = self.fpn(self.body(x))  # {"P<k>": (B, out_channels, H/2^k, W/2^k)}
        return OrderedDict((key, pyramid[level]) for key, level in self.levels.items())


def anchor_generator(
    strides: Iterable[int],
    size_per_stride: float,
    scales_per_octave: int = 1,
    aspect_ratios: Sequence[float] = (0.5, 1.0, 2.0),
) -> AnchorGenerator:
    """One set of anchors per level: sizes `size_per_stride * stride * 2**(i / scales_per_octave)`.

    With torchvision's pyramids this gives its defaults: FCOS 1 x stride (P3..P7: 8..128),
    RetinaNet 4 x stride at 3 scales (32, 40, 50 on P3), Faster R-CNN 8 x stride (P2..P6:
    32..512). Those are sized for COCO's objects in 800 px images: the builders take the
    multiple as `anchor_size`, e.g. 1 for RetinaNet on 10-50 px objects (8, 10, 12 on P3).
    """
    sizes = tuple(
        tuple(
            int(size_per_stride * s * 2 ** (i / scales_per_octave))
            for i in range(scales_per_octave)
        )
        for s in strides
    )
    return AnchorGenerator(sizes, (tuple(aspect_ratios),) * len(sizes))


def _with_fpn(backbone: Backbone | BackboneWithFPN, extra_blocks: str) -> BackboneWithFPN:
    if isinstance(backbone, BackboneWithFPN):
        return backbone
    if isinstance(backbone, Backbone):
        return BackboneWithFPN(backbone, extra_blocks=extra_blocks)
    raise TypeError(
        f"expected a backbones.Backbone or a heads.detection.BackboneWithFPN, got "
        f"{type(backbone).__name__}"
    )


def _roi_pooler(body: BackboneWithFPN, output_size: int) -> MultiScaleRoIAlign:
    # RoIs pool from the levels of the backbone's features, not the extra coarse ones, as
    # torchvision's R-CNNs (P2..P5 without "pool"), however many there are.
    names = [key for key, level in body.levels.items() if level in body.fpn.levels]
    return MultiScaleRoIAlign(names, output_size=output_size, sampling_ratio=2)


def fcos(
    backbone: Backbone | BackboneWithFPN, num_classes: int, anchor_size: float = 1, **kwargs
) -> FCOS:
    """torchvision's FCOS (Tian et al. 2019) with one anchor point per pixel sized by its stride.

    A plain backbone gets an FPN with P6/P7 (from the coarsest FPN output, as torchvision's
    `fcos_resnet50_fpn`); pass a `BackboneWithFPN` for another pyramid. `anchor_size` x the
    stride is each point's size, which sets its centre-sampling radius (`center_sampling_radius`
    sizes) and the objects its level regresses (4 to 8 sizes from the point to the furthest
    side; the finest level takes every smaller one). `kwargs` go to `FCOS` (`min_size`,
    `max_size`, `score_thresh`, ...; an `anchor_generator` replaces ours).
    """
    body = _with_fpn(backbone, "p6p7")
    kwargs.setdefault(
        "anchor_generator",
        anchor_generator(body.strides.values(), anchor_size, aspect_ratios=(1.0,)),
    )
    return FCOS(body, num_classes, **kwargs)


def retinanet(
    backbone: Backbone | BackboneWithFPN,
    num_classes: int,
    anchor_size: float = 4,
    group_norm: bool = False,
    **kwargs,
) -> RetinaNet:
    """torchvision's RetinaNet (Lin et al. 2017) with 9 anchors per pixel sized by the level's stride.

    A plain backbone gets an FPN with P6/P7 (from the coarsest FPN output, as torchvision's
    `retinanet_resnet50_fpn`); pass a `BackboneWithFPN` for another pyramid. The anchors are
    `anchor_size` x the stride at 3 scales per octave and 3 aspect ratios. `group_norm` puts
    GroupNorm(32) after each conv of the head's two towers, as torchvision's
    `retinanet_resnet50_fpn_v2` does: without a norm, their N(0, 0.01) init shrinks the signal
    about 7x per conv and ReLU on a 64-channel pyramid (3x on 256), and the classifier learns
    nothing.
    `kwargs` go to `RetinaNet` (an `anchor_generator` or `head` replaces ours).
    """
    body = _with_fpn(backbone, "p6p7")
    anchors = kwargs.setdefault(
        "anchor_generator", anchor_generator(body.strides.values(), anchor_size, 3)
    )
    if group_norm:
        kwargs.setdefault(
            "head",
            RetinaNetHead(
                body.out_channels,
                anchors.num_anchors_per_location()[0],
                num_classes,
                norm_layer=GroupNorm,  # 32 groups where 32 divides the width
            ),
        )
    return RetinaNet(body, num_classes, **kwargs)


def faster_rcnn(
    backbone: Backbone | BackboneWithFPN, num_classes: int, anchor_size: float = 8, **kwargs
) -> FasterRCNN:
    """torchvision's Faster R-CNN (Ren et al. 2015) with FPN: RPN anchors and RoI levels from the pyramid.

    A plain backbone gets an FPN with a max-pooled extra level (torchvision's default); pass
    a `BackboneWithFPN` for another pyramid. The RPN's anchors are `anchor_size` x the stride
    at 3 aspect ratios. `kwargs` go to `FasterRCNN` (an `rpn_anchor_generator` or
    `box_roi_pool` replaces ours).
    """
    body = _with_fpn(backbone, "maxpool")
    kwargs.setdefault("rpn_anchor_generator", anchor_generator(body.strides.values(), anchor_size))
    kwargs.setdefault("box_roi_pool", _roi_pooler(body, 7))
    return FasterRCNN(body, num_classes, **kwargs)


def mask_rcnn(
    backbone: Backbone | BackboneWithFPN, num_classes: int, anchor_size: float = 8, **kwargs
) -> MaskRCNN:
    """torchvision's Mask R-CNN (He et al. 2017): `faster_rcnn` plus a mask branch on the same levels.

    The mask branch is as wide as the pyramid: four 3x3 convs and the upsampling predictor,
    `out_channels` each (torchvision's are 256 wide whatever the pyramid: on a 64-channel one
    they would cost more than the backbone). `kwargs` go to `MaskRCNN` (a `mask_head` replaces
    ours, and the predictor then is torchvision's). `anchor_size`: as for `faster_rcnn`.
    """
    body = _with_fpn(backbone, "maxpool")
    kwargs.setdefault("rpn_anchor_generator", anchor_generator(body.strides.values(), anchor_size))
    kwargs.setdefault("box_roi_pool", _roi_pooler(body, 7))
    kwargs.setdefault("mask_roi_pool", _roi_pooler(body, 14))
    model = MaskRCNN(body, num_classes, **kwargs)
    if "mask_head" not in kwargs:
        # replaced after construction: torchvision takes a predictor only without num_classes,
        # and then wants the box predictor too (its 256-wide head is built and dropped, which
        # keeps the order of the random draws that initialise the model)
        width = body.out_channels
        model.roi_heads.mask_head = MaskRCNNHeads(width, (width,) * 4, dilation=1)
        model.roi_heads.mask_predictor = MaskRCNNPredictor(width, width, num_classes)
    return model


@dataclass(frozen=True)
class Architecture:
    """How `Detector` builds one of torchvision's detectors."""

    build: Callable[..., nn.Module]
    extra_blocks: str  # the pyramid's extra coarse levels, as in the paper
    reserved_classes: int = 0  # class ids the detector keeps for itself (the R-CNN background)


ARCHITECTURES = {
    "fcos": Architecture(fcos, extra_blocks="p6p7"),  # Tian et al. 2019: P3..P7
    "retinanet": Architecture(retinanet, extra_blocks="p6p7"),  # Lin et al. 2017: P3..P7
    # Ren et al. 2015 with FPN (Lin et al. 2017): P2..P6; label 0 is the background
    "faster_rcnn": Architecture(faster_rcnn, extra_blocks="maxpool", reserved_classes=1),
    # He et al. 2017: Faster R-CNN's pyramid and labels, plus a mask per detection
    "mask_rcnn": Architecture(mask_rcnn, extra_blocks="maxpool", reserved_classes=1),
}


class Detector(nn.Module):
    """A torchvision detector on backbone + FPN that speaks the data's labels, 0..num_classes-1.

    FCOS (Tian et al. 2019), RetinaNet (Lin et al. 2017), Faster R-CNN (Ren et al. 2015)
    with FPN (Lin et al. 2017) or Mask R-CNN (He et al. 2017), built by `fcos` / `retinanet` /
    `faster_rcnn` / `mask_rcnn`. The R-CNNs reserve label 0 for the background and FCOS /
    RetinaNet do not; the shift happens here, once, on the targets going in and the
    detections coming out. Like
    `Classifier` and `Segmenter` it takes normalised images: the detector's own transform only
    resizes and batches them (its mean and std are 0 and 1), so no image is normalised twice.
    In training mode `forward(images, targets)` returns torchvision's dict of losses; in eval
    mode `forward(images)` returns one dict of `boxes` (xyxy, input pixels), `scores` and
    `labels` per image (Mask R-CNN: and `masks`, (N, 1, H, W) probabilities; its targets carry
    uint8 (N, H, W) `masks`).

    Args:
        backbone: any registered backbone; its `out_features` are the FPN's inputs.
        num_classes: object classes, without a background class.
        architecture: "fcos", "retinanet", "faster_rcnn" or "mask_rcnn".
        fpn_channels: width of every pyramid level and of the detection head (256 in the
            papers).
        min_size: the shorter side each image is resized to (a sequence: one drawn per
            training batch), unless that takes the longer side past `max_size`.
        max_size: the longest the longer side may become.
        **options: other arguments of torchvision's constructor (`score_thresh`,
            `detections_per_img`, `box_batch_size_per_image`, ...).
    """

    def __init__(
        self,
        backbone: Backbone,
        num_classes: int,
        architecture: str = "fcos",
        fpn_channels: int = 256,
        min_size: int | Sequence[int] = 800,
        max_size: int = 1333,
        **options: Any,
    ) -> None:
        super().__init__()
        if architecture not in ARCHITECTURES:
            raise ValueError(
                f"unknown detector architecture {architecture!r}; choose from {list(ARCHITECTURES)}"
            )
        if num_classes < 1:
            raise ValueError(f"num_classes must be positive, got {num_classes}")
        arch = ARCHITECTURES[architecture]
        self.architecture = architecture
        self.num_classes = num_classes
        self.label_offset = arch.reserved_classes
        body = BackboneWithFPN(backbone, fpn_channels, extra_blocks=arch.extra_blocks)
        self.detector = arch.build(
            body,
            num_classes + arch.reserved_classes,
            min_size=tuple(min_size) if isinstance(min_size, Sequence) else min_size,
            max_size=max_size,
            image_mean=(0.0, 0.0, 0.0),
            image_std=(1.0, 1.0, 1.0),
            **options,
        )

    @property
    def backbone(self) -> Backbone:
        """Our backbone inside the detector (`detector.backbone.body`)."""
        return self.detector.backbone.body

    def compile(self, *args: Any, **kwargs: Any) -> None:
        """`torch.compile` the backbone and FPN in place, not the heads, anchors and NMS.

        Their shapes depend on how many boxes each image has, so they stay eager.
        """
        self.detector.backbone.compile(*args, **kwargs)

    def forward(
        self,
        images: list[torch.Tensor] | torch.Tensor,
        targets: list[dict[str, torch.Tensor]] | None = None,
    ) -> dict[str, torch.Tensor] | list[dict[str, torch.Tensor]]:
        # images: (3, H, W) each, sizes may differ; targets: {"boxes": (N, 4) xyxy, "labels": (N,)}
        if targets is not None and self.label_offset:
            targets = [{**t, "labels": t["labels"] + self.label_offset} for t in targets]
        output = self.detector(list(images), targets)
        if self.training:
            return output  # {loss name: scalar}
        if self.label_offset:
            output = [{**d, "labels": d["labels"] - self.label_offset} for d in output]
        return output

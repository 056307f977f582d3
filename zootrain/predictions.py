"""What a checkpoint predicts: a grid of fixed validation images, and the per-class scores.

`write_pictures` makes one pass over a split with the model as it is (after fit: the best
checkpoint's weights) on this process alone: it updates a per-class torchmetrics metric
(confusion matrix, per-class IoU or per-class AP) and draws the predictions for a fixed,
seeded set of images of the split, the same images in every run on the same data. Images are
shown de-normalised with the data module's `mean` / `std`, labelled with its `class_names`.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import lightning as L
import torch
from torchmetrics import Metric
from torchmetrics.classification import MulticlassConfusionMatrix, MulticlassJaccardIndex
from torchmetrics.detection import MeanAveragePrecision

from .module import bincount_on_cpu
from .plots import (
    class_colours,
    plot_class_bars,
    plot_confusion_matrix,
    pyplot,
    save_figure,
)
from .tasks import IGNORE_INDEX

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

log = logging.getLogger(__name__)

SAMPLES = {"classification": 16, "segmentation": 8, "detection": 8}
SAMPLE_SEED = 0  # one fixed set of images per dataset, whatever the run's seed
SCORE_THRESHOLD = 0.3  # detections drawn from this score on
MAX_BOXES = 10  # at most this many per image, the highest scores
PER_CLASS_FILE = {
    "classification": "confusion_matrix.png",
    "segmentation": "per_class_iou.png",
    "detection": "per_class_ap.png",
}


@dataclass
class Sample:
    """One image as the model saw it, its target and the model's output for it alone."""

    image: torch.Tensor  # (3, H, W), normalised
    target: Any  # class index, (H, W) mask or {"boxes", "labels"}
    output: Any  # (K,) logits, (K, H, W) logits or {"boxes", "labels", "scores"}


def eval_pictures_dir(ckpt_path: str | os.PathLike, split: str) -> Path:
    """Where eval.py puts a checkpoint's pictures: `<run dir>/eval/<checkpoint>-<split>/` for a
    checkpoint in `<run dir>/checkpoints/`, else `eval/<checkpoint>-<split>/` beside the file."""
    path = Path(ckpt_path)
    run = path.parent.parent if path.parent.name == "checkpoints" else path.parent
    return run / "eval" / f"{path.stem}-{split}"


def sample_indices(length: int, count: int, seed: int = SAMPLE_SEED) -> list[int]:
    """`count` distinct indices of a dataset of `length`, drawn from `seed`, in order."""
    generator = torch.Generator().manual_seed(seed)
    return sorted(torch.randperm(length, generator=generator)[:count].tolist())


def per_class_metric(task: str, num_classes: int) -> Metric:
    """The torchmetrics metric behind the task's per-class view; computed on this process only
    (other DDP ranks are not in this pass, so no sync)."""
    if task == "classification":
        return MulticlassConfusionMatrix(num_classes, sync_on_compute=False)
    if task == "segmentation":  # NaN: a class that is neither in the masks nor predicted
        return MulticlassJaccardIndex(
            num_classes,
            average=None,
            ignore_index=IGNORE_INDEX,
            zero_division=float("nan"),
            sync_on_compute=False,
        )
    return MeanAveragePrecision(
        box_format="xyxy",
        iou_type="bbox",
        backend="pycocotools",
        class_metrics=True,
        extended_summary=True,  # the precision array, for AP at IoU 0.5 per class
        sync_on_compute=False,
    )


def plot_per_class(
    task: str, values: Any, class_names: Sequence[str], title: str, split: str
) -> Figure:
    """The task's per-class view from the computed `per_class_metric` value."""
    if task == "classification":
        return plot_confusion_matrix(
            values.cpu(), class_names, title, f"confusion matrix, {split} split"
        )
    if task == "segmentation":
        iou = values.cpu().tolist()
        return plot_class_bars({"IoU": iou}, class_names, title, f"IoU per class, {split} split")
    # pycocotools per class: AP over IoU 0.50:0.95, and the precision array (T, R, K, A, M)
    # for AP at IoU 0.50: mean over recall thresholds, all areas, 100 detections
    ap = [-1.0] * len(class_names)
    ap50 = [-1.0] * len(class_names)
    classes = values["classes"].reshape(-1).tolist()
    per_class = values["map_per_class"].reshape(-1).tolist()
    precision = values["precision"][0, :, :, 0, -1]  # (R, K) at IoU 0.50
    for column, (label, score) in enumerate(zip(classes, per_class, strict=True)):
        if 0 <= label < len(class_names):
            ap[label] = score
            curve = precision[:, column]
            ap50[label] = float(curve[curve > -1].mean()) if (curve > -1).any() else -1.0
    return plot_class_bars(
        {"AP (IoU 0.50:0.95)": ap, "AP50": ap50},
        class_names,
        title,
        f"average precision per class, {split} split",
        missing="no boxes of this class",
    )


@torch.inference_mode()
def write_pictures(
    trainer: L.Trainer,
    module: L.LightningModule,
    datamodule: Any,
    directory: str | os.PathLike,
    title: str,
    split: str = "val",
) -> list[Path]:
    """predictions.png and the per-class view of `module` on `split`, written to `directory`;
    `title` names the run and the checkpoint (`zootrain.plots.run_title` and a line).

    Also logged as TensorBoard images where the trainer has a TensorBoard logger. Returns the
    paths written.
    """
    start = time.perf_counter()
    directory = Path(directory)
    task, num_classes = module.task.name, module.num_classes
    loader = getattr(datamodule, f"{split}_dataloader")()
    precision = trainer.precision_plugin
    was_training = module.training
    module.eval()
    metric = per_class_metric(task, num_classes).to(module.device)
    with precision.forward_context():
        for batch in loader:
            x, target = module.transfer_batch_to_device(batch, module.device, 0)
            output = module(precision.convert_input(x))
            with bincount_on_cpu(module.device):  # as validation counts: the same, faster
                metric.update(output, target)
        samples = _predict_samples(module, precision, loader.dataset, SAMPLES[task])
    module.train(was_training)

    names = list(datamodule.class_names)
    mean, std = getattr(datamodule, "mean", None), getattr(datamodule, "std", None)
    subtitle = f"{title} · {split} split"
    figures = {
        "predictions.png": plot_predictions(task, samples, names, mean, std, subtitle),
        PER_CLASS_FILE[task]: plot_per_class(task, metric.compute(), names, title, split),
    }
    tensorboard = [lg for lg in trainer.loggers if type(lg).__name__ == "TensorBoardLogger"]
    written = []
    for name, figure in figures.items():
        for logger in tensorboard:  # before saving: save_figure closes the figure
            logger.experiment.add_figure(
                f"{split}/{Path(name).stem}", figure, trainer.global_step, close=False
            )
        written.append(save_figure(figure, directory / name))
    log.info("pictures: %s (%.1f s)", ", ".join(p.name for p in written), _since(start))
    return written


def _since(start: float) -> float:
    return time.perf_counter() - start


def _predict_samples(
    module: L.LightningModule, precision: Any, dataset: Any, count: int
) -> list[Sample]:
    """The fixed samples of `dataset` and the model's outputs for them: one batch where the
    images share a size (detectors batch any sizes themselves), else one image at a time."""
    pairs = [dataset[index] for index in sample_indices(len(dataset), count)]
    images = [precision.convert_input(image.to(module.device)) for image, _ in pairs]
    if module.task.name == "detection":
        outputs = [  # labels stay integers; boxes and scores leave bf16 behind
            {k: v.cpu() if k == "labels" else v.float().cpu() for k, v in detections.items()}
            for detections in module(images)
        ]
    elif len({image.shape for image in images}) == 1:
        outputs = list(module(torch.stack(images)).float().cpu())
    else:
        outputs = [module(image[None])[0].float().cpu() for image in images]
    return [
        Sample(image=image, target=target, output=output)
        for (image, target), output in zip(pairs, outputs, strict=True)
    ]


def denormalise(
    image: torch.Tensor, mean: Sequence[float] | None, std: Sequence[float] | None
) -> Any:
    """(3, H, W) normalised image -> (H, W, 3) numpy array in [0, 1], the real colours."""
    image = image.float().cpu()
    if mean is not None and std is not None:
        image = image * torch.tensor(std).view(-1, 1, 1) + torch.tensor(mean).view(-1, 1, 1)
    return image.clamp(0, 1).permute(1, 2, 0).numpy()


def plot_predictions(
    task: str,
    samples: Sequence[Sample],
    class_names: Sequence[str],
    mean: Sequence[float] | None,
    std: Sequence[float] | None,
    title: str = "",
    score_threshold: float = SCORE_THRESHOLD,
) -> Figure:
    """A grid of the samples: per image its true and predicted class (classification), image,
    true and predicted mask (segmentation), or true and predicted boxes (detection)."""
    plt = pyplot()
    colours = class_colours(len(class_names))
    per_sample = {"classification": 1, "segmentation": 3, "detection": 2}[task]
    across = min({"classification": 4, "segmentation": 2, "detection": 3}[task], len(samples))
    rows = -(-len(samples) // across)
    panel = 2.3 if task == "classification" else 2.0
    figure = plt.figure(
        figsize=(panel * per_sample * across, panel * rows + 1.2), layout="constrained"
    )
    # One cell per sample; a sample's panels share a shaded cell, so pairs and triplets read
    # as one image each.
    cells = figure.subfigures(rows, across, squeeze=False, wspace=0.02, hspace=0.02).flat
    for index, cell in enumerate(cells):
        if index >= len(samples):
            break
        sample = samples[index]
        panels = cell.subplots(1, per_sample, squeeze=False)[0]
        for axis in panels:
            axis.set_axis_off()
        picture = denormalise(sample.image, mean, std)
        if task == "classification":
            _classification_panel(panels[0], picture, sample, class_names)
            continue
        cell.set_facecolor("0.93")
        if task == "segmentation":
            painted = [None, *colours[1:]] if has_background(class_names) else colours
            _segmentation_panels(panels, picture, sample, painted)
        else:
            _detection_panels(panels, picture, sample, class_names, colours, score_threshold)
    if task != "classification":
        _class_legend(figure, class_names, colours, task)
    figure.suptitle(title)
    return figure


def _classification_panel(
    axis: Axes, picture: Any, sample: Sample, class_names: Sequence[str]
) -> None:
    probabilities = sample.output.softmax(0)
    predicted = int(probabilities.argmax())
    true = int(sample.target)
    right = predicted == true
    axis.imshow(picture, interpolation="nearest")
    axis.set_title(
        f"true: {class_names[true]}\npred: {class_names[predicted]} {probabilities[predicted]:.0%}",
        color="darkgreen" if right else "firebrick",
        fontsize=10,
        fontweight="normal" if right else "bold",
    )


def has_background(class_names: Sequence[str]) -> bool:
    """Whether class 0 is the background, which masks leave unpainted."""
    return bool(class_names) and class_names[0].lower() == "background"


def _overlay(
    picture: Any, mask: torch.Tensor, colours: Sequence[tuple | None], alpha: float = 0.8
) -> Any:
    """The mask's classes painted (a None colour: not painted) over the image in dimmed grey,
    so that the colours read as the legend's and not mixed with the image's; ignored pixels
    black."""
    import numpy as np

    grey = picture @ np.array([0.299, 0.587, 0.114], dtype=picture.dtype)  # (H, W) luma
    painted = np.repeat((0.25 + 0.5 * grey)[..., None], 3, axis=2)
    mask = mask.cpu().numpy()
    for label, colour in enumerate(colours):
        if colour is None:
            continue
        where = mask == label
        painted[where] = (1 - alpha) * painted[where] + alpha * np.asarray(colour)
    painted[mask == IGNORE_INDEX] = 0.0
    return painted


def _segmentation_panels(
    panels: Sequence[Axes], picture: Any, sample: Sample, colours: Sequence[tuple | None]
) -> None:
    truth = torch.as_tensor(sample.target)
    predicted = sample.output.argmax(0)
    counted = truth != IGNORE_INDEX
    accuracy = (predicted[counted] == truth[counted]).float().mean() if counted.any() else 0.0
    for axis, shown, name in (
        (panels[0], picture, "image"),
        (panels[1], _overlay(picture, truth, colours), "ground truth"),
        (panels[2], _overlay(picture, predicted, colours), f"predicted, {accuracy:.0%} px right"),
    ):
        axis.imshow(shown, interpolation="nearest")
        axis.set_title(name, fontsize=9)


def _detection_panels(
    panels: Sequence[Axes],
    picture: Any,
    sample: Sample,
    class_names: Sequence[str],
    colours: Sequence[tuple],
    score_threshold: float,
) -> None:
    truth = sample.target
    scores = sample.output["scores"]
    above = (scores >= score_threshold).nonzero()[:, 0]
    shown = above[scores[above].argsort(descending=True)][:MAX_BOXES]
    predicted = {k: v[shown] for k, v in sample.output.items()}
    heading = f"predicted (score ≥ {score_threshold:g})"
    if len(above) > MAX_BOXES:
        heading = f"predicted: top {MAX_BOXES} of {len(above)} ≥ {score_threshold:g}"
    boxes_of = (
        (panels[0], truth["boxes"], truth["labels"], None, "ground truth"),
        (
            panels[1],
            predicted["boxes"],
            predicted["labels"],
            predicted["scores"],
            heading,
        ),
    )
    height, width = picture.shape[:2]
    # A label's height and a width it may take, in pixels of the image (a panel is ~2 inches
    # for any image size): labels closer than this are moved down a line, not drawn over.
    line, span = 0.09 * height, 0.45 * width
    for axis, boxes, labels, scores, name in boxes_of:
        axis.imshow(picture, interpolation="nearest")
        axis.set_title(name, fontsize=9)
        placed: list[tuple[float, float]] = []
        pairs = zip(torch.as_tensor(boxes).tolist(), labels.tolist(), strict=True)
        for i, (box, label) in enumerate(pairs):
            x0, y0, x1, y1 = box
            colour = colours[label % len(colours)]
            axis.add_patch(
                pyplot().Rectangle(
                    (x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False, edgecolor=colour,
                    linewidth=2,
                )
            )  # fmt: skip
            text = class_names[label] if label < len(class_names) else str(label)
            if scores is not None:
                text += f" {scores[i]:.2f}"
            x, y = min(max(x0, 0), width - 1), max(y0, 0)  # inside the box, at its top left
            align = "left"
            if x > width - span:  # a label from here would run off the image: end it at the
                x, align = min(max(x1, 0), width - 1), "right"  # box's right edge instead
            while any(abs(x - px) < span and abs(y - py) < line for px, py in placed):
                y += line
            placed.append((x, y))
            axis.text(
                x, y, text, fontsize=7, color="white", va="top", ha=align, clip_on=True,
                bbox={"facecolor": colour, "alpha": 0.8, "pad": 1, "linewidth": 0},
            )  # fmt: skip
        if scores is not None and not len(boxes):
            axis.text(
                0.5, 0.5, "no box", ha="center", va="center", transform=axis.transAxes,
                color="white", fontsize=9, bbox={"facecolor": "black", "alpha": 0.6},
            )  # fmt: skip


def _class_legend(
    figure: Figure, class_names: Sequence[str], colours: Sequence[tuple], task: str
) -> None:
    from matplotlib.patches import Patch

    handles = [
        Patch(facecolor=colour, label=name)
        for index, (name, colour) in enumerate(zip(class_names, colours, strict=True))
        if not (task == "segmentation" and index == 0 and has_background(class_names))
    ]
    figure.legend(
        handles=handles, loc="outside lower center", ncols=min(len(handles), 8), fontsize="small"
    )

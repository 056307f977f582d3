"""What a checkpoint predicts: a grid of fixed validation images, and the per-class scores.

`write_pictures` makes one pass over a split with the model as it is (after fit: the best
checkpoint's weights) on this process alone: it updates a per-class torchmetrics metric
(confusion matrix, per-class IoU or per-class AP) and draws the predictions for a fixed,
seeded set of images of the split, the same images in every run on the same data. Images are
shown as the data gives them (uint8, before the device normalises them), labelled with the data
module's `class_names`.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import lightning as L
import torch

from .module import bincount_on_cpu
from .plots import class_colours, pyplot, save_figure
from .tasks import Sample, Task

if TYPE_CHECKING:
    from matplotlib.figure import Figure

log = logging.getLogger(__name__)

SAMPLE_SEED = 0  # one fixed set of images per dataset, whatever the run's seed
PREDICTIONS_FILE = "predictions.png"


def sample_indices(length: int, count: int, seed: int = SAMPLE_SEED) -> list[int]:
    """`count` distinct indices of a dataset of `length`, drawn from `seed`, in order."""
    generator = torch.Generator().manual_seed(seed)
    return sorted(torch.randperm(length, generator=generator)[:count].tolist())


@torch.inference_mode()
def write_pictures(
    trainer: L.Trainer,
    module: L.LightningModule,
    datamodule: Any,
    directory: str | os.PathLike,
    title: str,
    split: str = "val",
) -> list[Path]:
    """predictions.png and the task's per-class view of `module` on `split`, written to
    `directory`; `title` names the run and the checkpoint (`zootrain.plots.run_title` and a
    line).

    Also logged as TensorBoard images where the trainer has a TensorBoard logger. Returns the
    paths written.
    """
    start = time.perf_counter()
    directory = Path(directory)
    task: Task = module.task
    loader = getattr(datamodule, f"{split}_dataloader")()
    precision = trainer.precision_plugin
    was_training = module.training
    module.eval()
    metric = task.per_class_metric(module.num_classes).to(module.device)
    with precision.forward_context():
        for batch in loader:
            batch = module.transfer_batch_to_device(batch, module.device, 0)
            x, target = module.on_after_batch_transfer(batch, 0)  # uint8 -> normalised
            output = module(precision.convert_input(x))
            with bincount_on_cpu(module.device):  # as validation counts: the same, faster
                metric.update(output, target)
        samples = _predict_samples(module, precision, loader.dataset, task.samples)
    module.train(was_training)

    names = list(datamodule.class_names)
    mean, std = getattr(datamodule, "mean", None), getattr(datamodule, "std", None)
    subtitle = f"{title} · {split} split"
    figures = {
        PREDICTIONS_FILE: plot_predictions(task, samples, names, mean, std, subtitle),
        task.per_class_file: task.plot_per_class(metric.compute(), names, title, split),
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
    """The fixed samples of `dataset` (images as it gives them) and the model's outputs for them."""
    pairs = [dataset[index] for index in sample_indices(len(dataset), count)]
    images = [
        precision.convert_input(module.normalize(image.to(module.device))) for image, _ in pairs
    ]
    outputs = module.task.predict(module, images)
    return [
        Sample(image=image, target=target, output=output)
        for (image, target), output in zip(pairs, outputs, strict=True)
    ]


def denormalise(
    image: torch.Tensor, mean: Sequence[float] | None, std: Sequence[float] | None
) -> Any:
    """(3, H, W) image as the data gives it (uint8) or as the model takes it (normalised with
    `mean` / `std`) -> (H, W, 3) numpy array in [0, 1], the real colours."""
    if image.dtype == torch.uint8:
        return (image.cpu().float() / 255).permute(1, 2, 0).numpy()
    image = image.float().cpu()
    if mean is not None and std is not None:
        image = image * torch.tensor(std).view(-1, 1, 1) + torch.tensor(mean).view(-1, 1, 1)
    return image.clamp(0, 1).permute(1, 2, 0).numpy()


def plot_predictions(
    task: Task,
    samples: Sequence[Sample],
    class_names: Sequence[str],
    mean: Sequence[float] | None,
    std: Sequence[float] | None,
    title: str = "",
) -> Figure:
    """A grid of the samples, each drawn by the task (`Task.draw`): its true and predicted
    class, image and masks, or boxes; a legend of the class colours where the task has one."""
    plt = pyplot()
    colours = class_colours(len(class_names))
    across = min(task.across, len(samples))
    rows = -(-len(samples) // across)
    inches = task.panel_inches
    figure = plt.figure(
        figsize=(inches * task.panels * across, inches * rows + 1.2), layout="constrained"
    )
    # One cell per sample; a sample's panels share a shaded cell, so pairs and triplets read
    # as one image each.
    cells = figure.subfigures(rows, across, squeeze=False, wspace=0.02, hspace=0.02).flat
    for cell, sample in zip(cells, samples, strict=False):
        panels = cell.subplots(1, task.panels, squeeze=False)[0]
        for axis in panels:
            axis.set_axis_off()
        if task.panels > 1:
            cell.set_facecolor("0.93")
        task.draw(panels, denormalise(sample.image, mean, std), sample, class_names, colours)
    listed = task.legend(class_names)
    if listed:
        from matplotlib.patches import Patch

        handles = [Patch(facecolor=colours[i], label=class_names[i]) for i in listed]
        figure.legend(
            handles=handles,
            loc="outside lower center",
            ncols=min(len(handles), 8),
            fontsize="small",
        )
    figure.suptitle(title)
    return figure

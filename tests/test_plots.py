"""zootrain/plots.py: the curves of short and long runs, the per-class views, how figures are saved."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from zootrain.plots import (
    best_epoch,
    plot_class_bars,
    plot_confusion_matrix,
    plot_curves,
    run_title,
    save_figure,
)

CONFIG = {
    "run_name": "resnet18-classification",
    "backbone": {"name": "resnet18"},
    "head": {"name": "classification"},
    "data": {
        "_target_": "zootrain.data.shapes.ShapesDataModule",
        "image_size": 64,
        "batch_size": 32,
    },
    "optim": {"_target_": "torch.optim.AdamW", "lr": 0.002},
    "trainer": {"max_epochs": 7},
}


def read_png(path: Path) -> tuple[Image.Image, np.ndarray]:
    image = Image.open(path)
    image.load()
    return image, np.asarray(image.convert("RGB"), dtype=np.float32)


def assert_drawn(path: Path, panels: int, size: tuple[int, int] | None = None) -> None:
    """A PNG with `panels` axes (its metadata), of `size`, that is not blank."""
    image, pixels = read_png(path)
    assert image.text["Panels"] == str(panels)
    if size is not None:
        assert image.size == size
    assert pixels.std() > 20  # not one flat colour
    packed = pixels.astype(np.int64) @ np.array([1 << 16, 1 << 8, 1])  # one int per colour
    assert len(np.unique(packed)) > 50


def history(epochs: int) -> tuple[dict, dict]:
    """A run that improves, with its best val/acc at epoch index epochs // 2 (a dip after)."""
    loss = [(e, 2.0 * 0.9**e) for e in range(epochs)]
    acc = [(e, 0.3 + 0.5 * e / epochs) for e in range(epochs)]
    peak = epochs // 2
    acc[peak] = (peak, 0.95)
    lr = {"lr": [(p / 2, 1e-3 * (1 - p / (2 * epochs))) for p in range(2 * epochs + 1)]}
    return {"train/loss": loss, "val/loss": loss, "val/acc": acc}, lr


def test_run_title_names_the_key_config() -> None:
    title = run_title(CONFIG)
    assert title.splitlines() == [
        "resnet18-classification",
        "resnet18 + classification · Shapes 64 px · AdamW lr 0.002 · batch 32 · 7 epochs",
    ]


def test_best_epoch_is_the_first_best_finite_value() -> None:
    series = [(0, 0.2), (1, float("nan")), (2, 0.7), (3, 0.7), (4, 0.5)]
    assert best_epoch(series, "max") == (2, 0.7)
    assert best_epoch(series, "min") == (0, 0.2)
    assert best_epoch([], "max") is None


@pytest.mark.parametrize("epochs", [1, 100])
def test_curves_read_for_one_and_for_a_hundred_epochs(epochs: int, tmp_path: Path) -> None:
    values, lr = history(epochs)
    figure = plot_curves(values, lr, run_title(CONFIG), monitor="val/acc", mode="max")
    loss_axis, metric_axis, lr_axis = figure.axes
    peak = epochs // 2
    assert (
        metric_axis.get_title()
        == f"validation: best val/acc 0.9500 at epoch {peak + 1} of {epochs}"
    )
    (star,) = [line for line in metric_axis.lines if line.get_label() == "best"]
    assert list(star.get_xdata()) == [peak + 1]  # epochs count from 1 in the picture
    for axis in figure.axes:
        ticks = [t for t in axis.get_xticks() if axis.get_xlim()[0] <= t <= axis.get_xlim()[1]]
        assert ticks and all(float(t).is_integer() for t in ticks), ticks  # no half epochs
        assert axis.get_xlim()[1] >= epochs
    bottom, top = metric_axis.get_ylim()
    assert top == 1.02 and -0.03 < bottom <= 0  # fractions on their whole scale
    losses = [line for line in loss_axis.lines if line.get_label().endswith("loss")]
    assert len(losses) == 2
    if epochs == 1:
        assert all(line.get_marker() == "o" for line in losses)  # one dot, visible
        assert loss_axis.get_ylim()[0] == 0
    else:
        assert loss_axis.get_yscale() == "log"  # 2.0 .. 2.0 * 0.9**99 spans decades
        assert all(line.get_marker() in ("None", None) for line in losses)
    assert lr_axis.lines[0].get_label() == "lr"
    save_figure(figure, tmp_path / "metrics.png")
    assert_drawn(tmp_path / "metrics.png", panels=3, size=(1600, 460))


def test_low_scores_get_the_height_of_the_panel() -> None:
    """A short detection run's mAP of 0.01-0.03 is not squashed against a 0-1 axis."""
    values = {"val/map": [(0, 0.01), (1, 0.03)], "val/map_50": [(0, 0.02), (1, 0.08)]}
    metric_axis = plot_curves(values, {}, monitor="val/map").axes[1]
    assert metric_axis.get_ylim()[1] == pytest.approx(1.2 * 0.08)


def test_curves_without_history_say_so() -> None:
    figure = plot_curves({}, {}, "empty")
    assert all(axis.texts[0].get_text() == "nothing recorded" for axis in figure.axes)


def test_confusion_matrix_counts_and_recall(tmp_path: Path) -> None:
    matrix = torch.tensor([[8, 2, 0], [1, 9, 0], [0, 0, 0]])
    figure = plot_confusion_matrix(matrix, ["circle", "square", "star"], "title")
    axis = figure.axes[0]
    assert [t.get_text() for t in axis.get_yticklabels()] == [
        "circle (80%)",
        "square (90%)",
        "star (0%)",
    ]
    assert sorted(t.get_text() for t in axis.texts) == ["1", "2", "8", "9"]  # zero cells blank
    assert axis.get_title() == "confusion matrix: 20 images, accuracy 85.0%"
    save_figure(figure, tmp_path / "confusion_matrix.png")
    assert_drawn(tmp_path / "confusion_matrix.png", panels=1)  # the colorbar is not a panel


def test_class_bars_mark_classes_missing_from_the_split(tmp_path: Path) -> None:
    names = ["background", "circle", "star"]
    figure = plot_class_bars({"IoU": [0.9, math.nan, 0.3]}, names, "title", "IoU per class")
    axis = figure.axes[0]
    assert [round(p.get_width(), 3) for p in axis.patches] == [0.9, 0.3]
    assert "not in the data" in [t.get_text() for t in axis.texts]
    assert axis.get_legend().get_texts()[0].get_text() == "mean IoU: 0.600"  # over known classes
    save_figure(figure, tmp_path / "per_class_iou.png")
    assert_drawn(tmp_path / "per_class_iou.png", panels=1)

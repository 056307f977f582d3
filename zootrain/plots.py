"""The pictures of a run: training curves, per-class views; and how every figure is saved.

Each `plot_*` function returns a matplotlib `Figure` (tests count its panels; TensorBoard takes
it as it is) and `save_figure` writes it as a PNG, atomically, with its title and panel count
in the PNG's text metadata. Epochs are counted from 1 in every picture: epoch 3 is the third
(Lightning's logs count from 0). matplotlib is imported on first use, not with the package.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from backbones.files import atomic_path

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

Series = Sequence[tuple[float, float]]  # (epoch or position, value)
MANY_EPOCHS = 25  # beyond this many epochs, curves are drawn without markers


def pyplot() -> Any:
    """matplotlib's pyplot on the Agg backend (no display needed, safe in worker threads)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def run_title(cfg: Mapping[str, Any]) -> str:
    """The run's name and the config a reader needs to tell runs apart, on two lines."""
    data = str(cfg["data"]["_target_"]).rsplit(".", 1)[-1].removesuffix("DataModule")
    size = cfg["data"].get("image_size")
    optim = str(cfg["optim"]["_target_"]).rsplit(".", 1)[-1]
    parts = [
        f"{cfg['backbone']['name']} + {cfg['head']['name']}",
        f"{data}" + (f" {size} px" if size else ""),
        f"{optim} lr {cfg['optim']['lr']:g}",
        f"batch {cfg['data']['batch_size']}",
    ]
    if cfg.get("trainer", {}).get("max_epochs"):
        parts.append(f"{cfg['trainer']['max_epochs']} epochs")
    return f"{cfg.get('run_name', '')}\n" + " · ".join(parts)


def best_epoch(series: Series, mode: str) -> tuple[int, float] | None:
    """(epoch, value) of the best finite value, the first one on ties (as ModelCheckpoint)."""
    best: tuple[int, float] | None = None
    for epoch, value in series:
        if not math.isfinite(value):
            continue
        if best is None or (value > best[1] if mode == "max" else value < best[1]):
            best = (int(epoch), value)
    return best


def save_figure(figure: Figure, path: str | os.PathLike, dpi: int = 100) -> Path:
    """Write `figure` as a PNG (temp file + rename) and close it; its title and panel count go
    into the PNG's text chunks ("Title", "Panels") for tools and tests."""
    path = Path(path)
    title = figure.get_suptitle() if hasattr(figure, "get_suptitle") else ""
    panels = sum(1 for axis in figure.axes if axis.get_label() != "<colorbar>")
    try:
        with atomic_path(path) as tmp:
            figure.savefig(
                tmp, dpi=dpi, format="png", metadata={"Title": title, "Panels": str(panels)}
            )
    finally:
        pyplot().close(figure)
    return path


# ---------------------------------------------------------------------------------- curves


def plot_curves(
    history: Mapping[str, Series],
    lr: Mapping[str, Series],
    title: str = "",
    monitor: str | None = None,
    mode: str = "max",
) -> Figure:
    """Loss, validation metrics and learning rate against the epoch, the best epoch marked.

    Args:
        history: per-epoch values by name (`train/loss`, `val/acc`, ...), epochs from 0.
        lr: learning rate by parameter group label, at positions in epochs (0 = start).
        title: the figure title (`run_title`).
        monitor: the metric checkpoints are chosen by; its best epoch is marked.
        mode: "max" or "min", how `monitor` improves.
    """
    from matplotlib.ticker import MaxNLocator

    plt = pyplot()
    losses = {k: v for k, v in history.items() if k.endswith("loss") and v}
    metrics = {k: v for k, v in history.items() if not k.endswith("loss") and v}
    epochs = max((int(e) + 1 for s in history.values() for e, _ in s), default=1)
    markers = epochs <= MANY_EPOCHS
    best = best_epoch(history.get(monitor, ()), mode) if monitor else None

    figure, (loss_axis, metric_axis, lr_axis) = plt.subplots(1, 3, figsize=(16, 4.6))
    # A fixed layout: drawn every epoch, and a third faster than the constrained one.
    figure.subplots_adjust(left=0.04, right=0.99, top=0.82, bottom=0.12, wspace=0.16)
    for key, points in sorted(losses.items()):
        _plot_epochs(loss_axis, points, key, markers)
    if _spans_decades([v for s in losses.values() for _, v in s]):
        loss_axis.set_yscale("log")  # long runs: the late epochs stay readable
    elif losses:
        top = max(v for s in losses.values() for _, v in s if math.isfinite(v))
        loss_axis.set_ylim(0, 1.08 * top)  # from 0, with room above the highest point
    loss_axis.set_title("loss")

    for key, points in sorted(metrics.items(), key=lambda item: item[0] != monitor):
        _plot_epochs(metric_axis, points, key, markers, bold=key == monitor)
    values = [v for s in metrics.values() for _, v in s if math.isfinite(v)]
    if values and min(values) >= 0.0 and max(values) <= 1.0:
        # Fractions from 0: the whole scale where a run gets far, else room to see low scores
        # (a short detection run's mAP of 0.03)
        top = 1.02 if max(values) > 0.5 else max(0.05, 1.2 * max(values))
        metric_axis.set_ylim(-0.02 * top, top)
    metric_title = "validation"
    if best is not None:
        epoch, value = best
        metric_title += f": best {monitor} {value:.4f} at epoch {epoch + 1} of {epochs}"
        metric_axis.plot(
            [epoch + 1], [value], marker="*", markersize=16, color="gold",
            markeredgecolor="black", linestyle="none", zorder=5, label="best",
        )  # fmt: skip
    metric_axis.set_title(metric_title)

    for label, points in sorted(lr.items()):
        positions, rates = zip(*sorted(points), strict=True)
        lr_axis.plot(positions, rates, label=label)
    lr_axis.set_title("learning rate")
    lr_axis.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    lr_axis.set_ylim(bottom=0)

    for axis in (loss_axis, metric_axis, lr_axis):
        axis.set_xlabel("epoch")
        axis.set_xlim(0, epochs + (0.5 if markers else 0))
        axis.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
        axis.grid(alpha=0.3)
        if best is not None:
            axis.axvline(best[0] + 1, color="gray", linestyle=":", linewidth=1)
        if axis.lines:
            axis.legend(fontsize="small", loc="best")
        else:
            axis.text(0.5, 0.5, "nothing recorded", ha="center", transform=axis.transAxes)
    figure.suptitle(title)
    return figure


def _plot_epochs(axis: Axes, points: Series, label: str, markers: bool, bold: bool = False) -> None:
    epochs, values = zip(*sorted(points), strict=True)
    axis.plot(
        [e + 1 for e in epochs],  # epoch k (from 0) ends at position k + 1
        values,
        marker="o" if markers else None,
        markersize=4,
        linewidth=2.2 if bold else 1.4,
        label=label,
    )


def _spans_decades(values: Sequence[float]) -> bool:
    positive = [v for v in values if v > 0 and math.isfinite(v)]
    return len(positive) > 2 and max(positive) / min(positive) > 30


# ------------------------------------------------------------------------------ per class


def class_colours(count: int) -> list[tuple[float, float, float]]:
    """One distinct colour per class: tab10 / tab20, then evenly spaced hues."""
    plt = pyplot()
    if count <= 10:
        palette = plt.get_cmap("tab10").colors
    elif count <= 20:
        palette = plt.get_cmap("tab20").colors
    else:
        hsv = plt.get_cmap("hsv")
        palette = [hsv(i / count)[:3] for i in range(count)]
    return [tuple(palette[i])[:3] for i in range(count)]  # type: ignore[misc]


def plot_confusion_matrix(
    matrix: Any, class_names: Sequence[str], title: str = "", caption: str = "confusion matrix"
) -> Figure:
    """Rows: true class (with its recall), columns: predicted; cells coloured by row share."""
    import numpy as np

    plt = pyplot()
    counts = np.asarray(matrix, dtype=np.int64)  # (K, K)
    totals = counts.sum(axis=1, keepdims=True)
    shares = np.divide(counts, totals, out=np.zeros(counts.shape), where=totals > 0)
    k = len(class_names)
    side = min(max(5.0, 0.55 * k + 2.5), 22.0)
    figure, axis = plt.subplots(figsize=(side + 1.2, side), layout="constrained")
    image = axis.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    figure.colorbar(image, ax=axis, shrink=0.8, label="share of the true class")
    recall = [f"{name} ({shares[i, i]:.0%})" for i, name in enumerate(class_names)]
    labelled = k <= 40  # beyond that, names would overlap
    axis.set_xticks(range(k), class_names if labelled else [], rotation=45, ha="right")
    axis.set_yticks(range(k), recall if labelled else [])
    if k <= 20:
        for i in range(k):
            for j in range(k):
                if counts[i, j]:
                    colour = "white" if shares[i, j] > 0.5 else "black"
                    axis.text(j, i, str(counts[i, j]), ha="center", va="center", color=colour)
    accuracy = np.trace(counts) / max(1, counts.sum())
    axis.set(xlabel="predicted class", ylabel="true class (recall)")
    axis.set_title(f"{caption}: {counts.sum()} images, accuracy {accuracy:.1%}")
    figure.suptitle(title)
    return figure


def plot_class_bars(
    values: Mapping[str, Sequence[float]],
    class_names: Sequence[str],
    title: str = "",
    subtitle: str = "",
    missing: str = "not in the data",
) -> Figure:
    """Horizontal bars per class, one bar per named series (e.g. IoU; AP and AP50); NaN or
    negative values are classes the split does not hold, labelled `missing`."""
    import numpy as np

    plt = pyplot()
    k, series = len(class_names), list(values.items())
    height = min(max(3.0, 0.32 * k * len(series) + 1.6), 30.0)
    figure, axis = plt.subplots(figsize=(9, height), layout="constrained")
    width = 0.8 / len(series)
    rows = np.arange(k)
    for index, (label, numbers) in enumerate(series):
        numbers = np.asarray(numbers, dtype=float)
        known = np.isfinite(numbers) & (numbers >= 0)
        offset = (index - (len(series) - 1) / 2) * width
        bars = axis.barh(rows[known] + offset, numbers[known], height=width, label=label)
        axis.bar_label(bars, fmt="%.2f", padding=2, fontsize="small")
        if index == 0:
            for row in rows[~known]:
                axis.text(0.01, row, missing, va="center", color="gray", fontsize="small")
            mean = numbers[known].mean() if known.any() else float("nan")
            axis.axvline(
                mean, color="black", linestyle="--", linewidth=1, label=f"mean {label}: {mean:.3f}"
            )
    axis.set_yticks(rows, class_names)
    axis.invert_yaxis()  # class 0 on top, as in the legend of the predictions
    axis.set_xlim(0, 1.08)
    axis.grid(axis="x", alpha=0.3)
    axis.legend(fontsize="small", loc="lower right")
    axis.set_title(subtitle)
    figure.suptitle(title)
    return figure

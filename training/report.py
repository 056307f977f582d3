"""What a run prints: one clear line for a user error, a table of final metrics at the end."""

from __future__ import annotations

import logging
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from hydra.errors import InstantiationException
from rich.console import Console
from rich.table import Table

from backbones import WeightsError

from .errors import UserError

# Printed as one line by `user_errors`: ours, a bad weights file, and a config target that
# failed to build (Hydra wraps whatever the constructor raised).
USER_ERRORS = (UserError, WeightsError, InstantiationException)


def quiet_lightning() -> None:
    """Drop Lightning's advertising tips and warnings that say nothing about this run."""
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(
        lambda record: not str(record.msg).startswith("💡")
    )
    for message in (
        r"Experiment logs directory .* exists and is not empty",  # Hydra's train.log is there
        r".*isinstance\(treespec, LeafSpec\)",  # Lightning vs torch 2.14 pytree deprecation
    ):
        warnings.filterwarnings("ignore", message=message)


@contextmanager
def user_errors() -> Iterator[None]:
    """Turn a config, data, checkpoint or weights mistake into one message and exit status 1."""
    try:
        yield
    except USER_ERRORS as error:
        Console(stderr=True, soft_wrap=True).print(f"[bold red]error:[/] {error}", highlight=False)
        sys.exit(1)


def print_summary(result: dict[str, Any]) -> None:
    table = Table(title="final metrics", title_justify="left")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in sorted(result["metrics"].items()):
        if key.startswith(("val/", "test/")) or key == "train/loss_epoch":
            table.add_row(key.removesuffix("_epoch"), f"{value:.4f}")
    console = Console(soft_wrap=True)
    console.print(table)
    if result.get("best_score") is not None:
        console.print(f"best {result['monitor']}: {result['best_score']:.4f}")
    label = "best checkpoint" if "fit_seconds" in result else "checkpoint"
    # fast_dev_run writes no checkpoint
    console.print(f"{label}: {result['best_model_path'] or 'none (no checkpoint was written)'}")
    if result.get("backbone_weights"):
        console.print(f"backbone weights: {result['backbone_weights']}")
    if result.get("pictures"):
        console.print(f"pictures: {', '.join(result['pictures'])}")
    if "fit_seconds" in result:
        console.print(
            f"fit: {result['fit_seconds']:.1f} s, "
            f"{result['train_images_per_second']:.0f} train img/s"
        )

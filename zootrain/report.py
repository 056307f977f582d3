"""What a run prints: one clear line for a user error, a table of final metrics at the end."""

from __future__ import annotations

import errno
import logging
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from hydra.errors import InstantiationException
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from .errors import UserError

if TYPE_CHECKING:
    from .result import RunResult

# A full disk or quota while a checkpoint or the config is written: the user frees space.
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


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
    """Turn a config, data, checkpoint or weights mistake into one message and exit status 1.

    The message also goes to the run's log file (`<run dir>/train.log`) when Hydra set one up.
    """
    try:
        yield
    except Exception as error:
        if not is_user_error(error):
            raise
        _fail(user_message(error))


def is_user_error(error: BaseException) -> bool:
    """Whether `error` is the user's to fix (printed as one line), not a bug (a traceback).

    Ours, a bad weights file, a config target that failed to build (Hydra wraps whatever the
    constructor raised), a full disk.
    """
    # Read from sys.modules, not imported: `train.py --help` and a config mistake found before
    # the models load never wait for torch (and without backbones there is no WeightsError).
    weights = sys.modules.get("backbones.weights")
    kinds = (UserError, InstantiationException, *([weights.WeightsError] if weights else []))
    return isinstance(error, kinds) or (isinstance(error, OSError) and error.errno in DISK_FULL)


def user_message(error: BaseException) -> str:
    """What the user needs of `error`: its own message, not the wrappers around it.

    Hydra wraps what a config target's constructor raised (the message then names the config
    key); a DataLoader worker re-raises its error with the worker's traceback in the message.
    """
    if isinstance(error, InstantiationException) and error.__cause__ is not None:
        cause = error.__cause__
        _, found, key = str(error).rpartition("\nfull_key: ")
        text = user_message(cause)
        if not is_user_error(cause):  # e.g. a TypeError for an unknown argument
            text = f"{type(cause).__name__}: {text}"
        return f"{key}: {text}" if found else text
    if isinstance(error, OSError) and error.errno in DISK_FULL:
        return (
            f"{error.strerror} while writing {error.filename or 'the run files'}: free space "
            "there or set paths.outputs to another disk (files are written whole or not at "
            "all: what was there before is intact)"
        )
    message = str(error)
    if message.startswith("Caught ") and "\nOriginal Traceback" in message:
        kind = type(error)
        marker = f"\n{kind.__module__}.{kind.__qualname__}: "
        if marker in message:
            return message.rpartition(marker)[2].strip()
    return message


def _fail(message: str) -> None:
    # escaped: a message's own brackets (`pip install 'backbone-zoo[mlflow]'`, `data.classes=[a,b]`)
    # are text, not Rich markup
    Console(stderr=True, soft_wrap=True).print(
        f"[bold red]error:[/] {escape(message)}", highlight=False
    )
    to_log_file(logging.ERROR, f"error: {message}")
    sys.exit(1)


def route_lightning_logs() -> None:
    """Send Lightning's log records where the app's go (Hydra: the console and train.log).

    Lightning gives its loggers console handlers of their own and, when imported before
    logging was set up, stops them propagating: their messages then never reach
    `<run dir>/train.log`. Without handlers on the root logger, this leaves them as they are.
    """
    import lightning  # noqa: F401  (its loggers are set up on import)

    if not logging.getLogger().handlers:
        return
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logger = logging.getLogger(name)
        for handler in list(logger.handlers):
            if type(handler) is logging.StreamHandler:  # the console ones; root prints those
                logger.removeHandler(handler)
        logger.propagate = True


def to_log_file(level: int, message: str) -> None:
    """Write `message` to the log files of the root logger only (what was printed already)."""
    root = logging.getLogger()
    record = root.makeRecord(__name__, level, __file__, 0, message, None, None)
    for handler in root.handlers:
        if isinstance(handler, logging.FileHandler) and record.levelno >= handler.level:
            handler.handle(record)


def print_summary(result: RunResult) -> None:
    """The final metrics as a table, then the checkpoint, exports and speed, on the console and
    into the run's log file."""
    table = Table(title="final metrics", title_justify="left")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in sorted(result.metrics.items()):
        if key.startswith(("val/", "test/")) or key == "train/loss_epoch":
            table.add_row(key.removesuffix("_epoch"), f"{value:.4f}")
    console = Console(soft_wrap=True, record=True)
    console.print(table)
    if result.best_score is not None:
        console.print(f"best {result.monitor}: {result.best_score:.4f}")
    label = "best checkpoint" if result.fitted else "checkpoint"
    # fast_dev_run writes no checkpoint
    console.print(f"{label}: {result.best_model_path or 'none (no checkpoint was written)'}")
    if result.backbone_weights:
        console.print(f"backbone weights: {result.backbone_weights}")
    if result.pictures:
        console.print(f"pictures: {', '.join(result.pictures)}")
    if result.fitted:
        console.print(
            f"fit: {result.fit_seconds:.1f} s, {result.train_images_per_second:.0f} train img/s"
        )
    if result.compile_warmup_seconds is not None:  # the first step traced and compiled
        console.print(f"compile warm-up: {result.compile_warmup_seconds:.1f} s")
    to_log_file(logging.INFO, console.export_text().rstrip())

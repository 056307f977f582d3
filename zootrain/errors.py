"""The errors of a run that the user can fix; each message says what to change.

They share the base `UserError`, which `zootrain.report.user_errors` turns into one line on
stderr and exit status 1 (no traceback). Each also keeps the builtin base it had before it
moved here (`ValueError`, `RuntimeError`), so `except ValueError` in user code still works.
"""

from __future__ import annotations


class UserError(Exception):
    """A mistake in the config, the data or a file, that the user fixes; not a bug."""


class ConfigError(UserError, ValueError):
    """The config asks for something that cannot run; the message says what to change."""


class DatasetError(UserError, ValueError):
    """A dataset root is missing, laid out wrongly or holds unreadable files; says what to do."""


class CheckpointError(UserError, ValueError):
    """A checkpoint path is missing or the file is not a readable checkpoint of this project."""


class DivergedError(UserError, RuntimeError):
    """Training diverged: its loss grew without bound, or a validation loss or metric is not
    finite; the message says what to change (a lower learning rate, clipping, a warm-up)."""


class NonFiniteLossError(DivergedError):
    """The training loss, or a weight after an optimiser step, became NaN or infinite; the
    message names the step (or the weights)."""


class RunStopped(UserError, RuntimeError):
    """The run was stopped (a signal, Ctrl-C) or ended without what it was asked for (a best
    checkpoint, its test, its export): not a success; the message says where to go on."""

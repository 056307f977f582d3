"""The errors of a run that the user can fix; each message says what to change."""

from __future__ import annotations


class ConfigError(ValueError):
    """The config asks for something that cannot run; the message says what to change."""


class DatasetError(ConfigError):
    """A dataset root is missing, laid out wrongly or holds unreadable files; says what to do."""


class CheckpointError(ValueError):
    """A checkpoint path is missing or the file is not a readable checkpoint of this project."""


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite; the message names the step."""

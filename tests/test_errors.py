"""zootrain/errors.py: every user error is one line and exit status 1; bugs keep their traceback."""

from __future__ import annotations

import pytest

from backbones import WeightsError
from zootrain import errors
from zootrain.errors import CheckpointError, ConfigError, DatasetError, UserError
from zootrain.report import user_errors

USER_ERRORS = sorted(
    (value for value in vars(errors).values() if isinstance(value, type)),
    key=lambda error: error.__name__,
)


@pytest.mark.parametrize("error", [*USER_ERRORS, WeightsError], ids=lambda error: error.__name__)
def test_a_user_error_is_one_line_and_exit_status_1(
    error: type[Exception], capsys: pytest.CaptureFixture
) -> None:
    with pytest.raises(SystemExit) as exited, user_errors():
        raise error("set data.root to the folder that holds it")
    assert exited.value.code == 1
    assert capsys.readouterr().err == "error: set data.root to the folder that holds it\n"


def test_a_bug_is_not_a_user_error() -> None:
    with pytest.raises(KeyError), user_errors():
        raise KeyError("state_dict")


def test_error_types() -> None:
    assert all(issubclass(error, UserError) for error in USER_ERRORS)
    # a dataset problem is not the model builder's config error; both stay ValueErrors
    assert not issubclass(DatasetError, ConfigError)
    assert all(issubclass(e, ValueError) for e in (ConfigError, DatasetError, CheckpointError))
    assert issubclass(errors.NonFiniteLossError, RuntimeError)

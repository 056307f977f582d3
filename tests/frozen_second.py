"""For the same-second test in tests/test_resume.py: a function that spawned processes import
(this module imports only the standard library and zootrain.runs, so a spawned process starts in
well under a second instead of importing torch and Lightning)."""

from __future__ import annotations

import time

from zootrain.runs import new_run_dir


def make_run_dir(outputs: str, name: str) -> str:
    """In a spawned process: a new run directory, in the same frozen second as the others."""
    time.strftime = lambda fmt: "2026-01-01_00-00-00"
    return str(new_run_dir(outputs, name))

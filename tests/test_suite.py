"""The suite's own machinery: what `make test` relies on to run in time."""

from __future__ import annotations

import pytest


@pytest.mark.xdist_group("suite_probe")
def test_xdist_groups_reach_the_workers(request: pytest.FixtureRequest) -> None:
    """Under `--dist loadgroup` (make test), a test marked `xdist_group` carries its group in its
    id, which is what sends a group's tests to one worker. Without it, every group is split over
    the workers and its module fixtures (the SLURM sweeps, the trained models) are built on each."""
    if not getattr(request.config.option, "loadgroup", False):
        pytest.skip("not in a pytest-xdist worker with --dist loadgroup")
    assert request.node.nodeid.endswith("@suite_probe"), (
        f"{request.node.nodeid}: pytest-xdist could not tag the test with its group; the pins "
        "of pytest and pytest-xdist in pyproject.toml say which versions work together"
    )

"""zootrain.cluster without a cluster: job states from squeue, signals kept from forked children."""

from __future__ import annotations

import logging
import multiprocessing
import signal
from pathlib import Path

import pytest

from zootrain.cluster import LEFT_QUEUE, QueueWatcher, ignore_in_forked_children


def fake_command(directory: Path, name: str, script: str) -> None:
    path = directory / name
    path.write_text(f"#!/bin/sh\n{script}\n")
    path.chmod(0o755)


def test_queue_watcher_says_once_that_sacct_fails_and_asks_squeue(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    fake_command(tmp_path, "sacct", 'echo "Slurm accounting storage is disabled" >&2; exit 1')
    # A pending array job, one of its tasks done, a plain job; job 7 was forgotten by slurmctld.
    squeue = "12_0|COMPLETED|localhost\\n12_1|PENDING|\\n13|RUNNING|localhost"
    fake_command(tmp_path, "squeue", f'printf "{squeue}\\n"')
    monkeypatch.setenv("PATH", str(tmp_path))
    watcher = QueueWatcher(delay_s=600)
    for job in ("12_0", "12_1", "13", "7"):
        watcher.register_job(job)
    with caplog.at_level(logging.INFO, logger="zootrain.cluster"):
        for _ in range(3):
            watcher.update()
    assert [r.getMessage() for r in caplog.records] == [
        "sacct: Slurm accounting storage is disabled; submitit's job states come from squeue"
    ]
    states = {job: watcher.get_state(job, mode="cache") for job in ("12_0", "12_1", "13", "7")}
    assert states == {"12_0": "COMPLETED", "12_1": "PENDING", "13": "RUNNING", "7": LEFT_QUEUE}
    assert [watcher.is_done(j, mode="cache") for j in states] == [True, False, False, True]


def test_queue_watcher_keeps_sacct_where_it_works(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_command(tmp_path, "sacct", 'printf "JobID|State|NodeList\\n5|RUNNING|node1\\n"')
    fake_command(tmp_path, "squeue", "exit 1")
    monkeypatch.setenv("PATH", str(tmp_path))
    watcher = QueueWatcher(delay_s=600)
    watcher.register_job("5")
    watcher.update()
    assert not watcher.use_squeue
    assert watcher.get_state("5", mode="cache") == "RUNNING"


def _report_handler(queue: multiprocessing.Queue) -> None:
    queue.put(signal.getsignal(signal.SIGUSR2) == signal.SIG_IGN)


def test_forked_children_ignore_the_signal() -> None:
    """What a DataLoader worker (a forked process) does with the requeue signal."""
    context = multiprocessing.get_context("fork")
    ignore_in_forked_children(signal.SIGUSR2)
    queue = context.Queue()
    child = context.Process(target=_report_handler, args=(queue,))
    child.start()
    child.join(timeout=60)
    assert queue.get(timeout=10) is True
    assert signal.getsignal(signal.SIGUSR2) != signal.SIG_IGN  # this process still handles it

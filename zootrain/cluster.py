"""SLURM: Lightning's requeue on the launcher's signal, that signal kept from DataLoader workers
and from a finished run's test and export, and submitit's job states from `squeue` on clusters
without an accounting database.

SLURM signals every process of a job step, DataLoader workers included: a worker forked from
the training process runs Lightning's requeue handler too (saving a checkpoint of its stale copy
of the model over the real one, requeueing the job again), and dies on the SIGTERM that ends
the job (see `train.py` for what the training process makes of that).

submitit polls `sacct` for the state of every job it submitted. Where SLURM keeps no accounting
database (common on small clusters), each poll fails: submitit prints "Bypassing sacct error ...
status may be inaccurate" (twice, through Hydra's logging too) and `sacct` prints "Slurm
accounting storage is disabled", dozens of lines per job, and a job that dies without writing
its result (killed, out of memory) is never seen to end: the sweep would wait forever.
"""

from __future__ import annotations

import getpass
import logging
import os
import signal
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from hydra.experimental.callback import Callback
from lightning.pytorch.plugins.environments import SLURMEnvironment
from omegaconf import DictConfig
from submitit.slurm.slurm import SlurmInfoWatcher, SlurmJob

log = logging.getLogger(__name__)

# A job that `squeue` no longer lists (slurmctld forgets a finished job after MinJobAge, 300 s by
# default) has ended; submitit reports one without a result as not done "(state: LEFT_QUEUE)".
LEFT_QUEUE = "LEFT_QUEUE"

_IGNORED_IN_CHILDREN: set[signal.Signals] = set()  # by processes forked from this one


def slurm_plugins(requeue_signal: str) -> list[SLURMEnvironment]:
    """Under SLURM, Lightning's environment that saves and requeues on `SIG<requeue_signal>`
    (the signal the submitit_slurm launcher asks SLURM to send); elsewhere none.

    Lightning would detect SLURM itself, but requeue on SIGUSR1 only. DataLoader workers
    started from now on ignore the signal (SLURM signals every process of the job step)."""
    if not SLURMEnvironment.detect():
        return []
    signum = signal.Signals[f"SIG{requeue_signal}"]  # checked by zootrain.checks
    ignore_in_forked_children(signum)
    return [SLURMEnvironment(auto_requeue=True, requeue_signal=signum)]


@contextmanager
def requeue_signal_ignored(requeue_signal: str) -> Iterator[None]:
    """Under SLURM, ignore the requeue signal (`SIG<requeue_signal>`, sent `signal_delay_s`
    before the time limit) in the block.

    After `fit` it would requeue a trained run, or kill it (the signal's default action) during
    its test and export; the time limit alone ends the job if they do not finish in time.
    """
    if not SLURMEnvironment.detect() or threading.current_thread() is not threading.main_thread():
        yield
        return
    # Lightning's test() then sees a handler in place and installs no requeue handler.
    signum = signal.Signals[f"SIG{requeue_signal}"]
    previous = signal.signal(signum, signal.SIG_IGN)
    try:
        yield
    finally:  # the next job of a sweep in this process must requeue on it again
        signal.signal(signum, previous)


def ignore_in_forked_children(signum: signal.Signals) -> None:
    """From now on, processes forked from this one (DataLoader workers) ignore `signum`."""
    if not _IGNORED_IN_CHILDREN:
        os.register_at_fork(after_in_child=_ignore_in_child)
    _IGNORED_IN_CHILDREN.add(signum)


def _ignore_in_child() -> None:
    if threading.current_thread() is threading.main_thread():  # signal.signal works there only
        for signum in _IGNORED_IN_CHILDREN:
            signal.signal(signum, signal.SIG_IGN)


class QueueWatcher(SlurmInfoWatcher):
    """submitit's job-state watcher, asking `squeue` where `sacct` has no accounting database.

    The first poll tries `sacct` once; if it fails, that is said in one line and
    `squeue --states=all` answers from then on (it lists a job from submission until slurmctld
    forgets it).
    """

    def __init__(self, delay_s: int = 60) -> None:
        super().__init__(delay_s)
        self.use_squeue: bool | None = None  # decided by the first poll

    def _make_command(self) -> list[str] | None:
        command = super()._make_command()  # sacct -o JobID,State,NodeList --parsable2 -j <id>...
        if command is None:
            return None
        if self.use_squeue is None:
            try:
                sacct = subprocess.run(command, capture_output=True, text=True, timeout=60)
                reason = (sacct.stderr.strip().splitlines() or [f"exit {sacct.returncode}"])[0]
                self.use_squeue = sacct.returncode != 0
            except subprocess.TimeoutExpired:
                reason, self.use_squeue = "no answer in 60 s", True
            if self.use_squeue:
                log.info("sacct: %s; submitit's job states come from squeue", reason)
        if not self.use_squeue:
            return command
        # All of this user's jobs: `squeue --jobs=<ids>` fails when it has forgotten every one.
        user = getpass.getuser()
        return [
            "squeue",
            "--noheader",
            "--array",
            "--states=all",
            f"--user={user}",
            "--format=%i|%T|%N",
        ]

    def read_info(self, string: bytes | str) -> dict[str, dict[str, str]]:
        if not self.use_squeue:
            return super().read_info(string)
        if not isinstance(string, str):
            string = string.decode()
        info = super().read_info(f"JobID|State|NodeList\n{string}")  # sacct's --parsable2 layout
        # submitit's bookkeeping (private): the jobs submitted here, and those known to be done
        for job_id in self._registered - self._finished - info.keys():
            info[job_id] = {"JobID": job_id, "State": LEFT_QUEUE, "NodeList": ""}
        return info


class SlurmJobStates(Callback):
    """A Hydra callback (configs/hydra/default.yaml) that gives submitit's SLURM jobs a
    `QueueWatcher` before a multirun submits any: all of them share one (a class attribute)."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        if not isinstance(SlurmJob.watcher, QueueWatcher):
            SlurmJob.watcher = QueueWatcher(delay_s=600)  # submitit's own polling delay

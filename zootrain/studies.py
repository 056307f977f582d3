"""Optuna studies that outlive their sweeper: kept in a database, continued by the same command.

hydra-optuna-sweeper runs a study for as long as its sweep process lives. `StudySweeper` (what
`hydra/sweeper=zootrain_optuna` runs, chosen by configs/hparams_search/optuna.yaml) is the
plugin's sweeper with four additions, each where the plugin leaves room for it (its `setup`,
its per-batch `_configure_trials`, its launcher) rather than in a copy of its loop:

- The study lives in `hydra.sweeper.storage` (any SQLAlchemy URL; SQLite in the sweep
  directory by default), opened with `load_if_exists`, so the same command continues it and
  two sweeps may share it.
- `n_trials` counts the whole study: trials whose job returned (completed or failed) count, so
  a continued study runs what is left.
- A killed sweeper's trials stay "running" in the database. Optuna's heartbeat finds them:
  while a trial's job runs, its sweeper records a heartbeat every `heartbeat_interval` seconds;
  a trial with none for twice that is failed, by whichever sweeper of the study looks next.
- Job number = trial number: the jobs of a continued (or shared) study get directories of their
  own in the one sweep directory, and a job directory names its trial.

The plugin's sweeper is a private class (`_impl.OptunaSweeperImpl`) behind its public one; the
versions are pinned in pyproject.toml (1.4's sweeper has the same hooks) and tests/test_studies.py
runs a study that is killed and continued.
"""

from __future__ import annotations

import logging
import threading
import warnings
from collections.abc import Sequence
from typing import Any

import optuna
from hydra.core.utils import JobReturn
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from hydra_plugins.hydra_optuna_sweeper._impl import OptunaSweeperImpl
from omegaconf import DictConfig
from optuna.storages import RDBStorage, fail_stale_trials
from optuna.trial import FrozenTrial, Trial, TrialState

from .errors import ConfigError
from .runs import sqlite_store

log = logging.getLogger(__name__)

# The trial's user attribute naming its job's directory, set when the job returns: a trial
# that has it ran to its end (completed or failed) and counts toward n_trials.
JOB_DIR = "job_dir"
NOTHING_LEFT = (
    " (raise hydra.sweeper.n_trials, or start another study: hydra.sweeper.study_name=<name>)"
)


class StudySweeper(OptunaSweeperImpl):
    """hydra-optuna-sweeper's sweeper, with its study in a database it continues (see above)."""

    def __init__(self, *args: Any, heartbeat_interval: int = 60, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if heartbeat_interval < 1:
            raise ConfigError(
                f"hydra.sweeper.heartbeat_interval={heartbeat_interval} cannot work: it is the "
                "seconds between a running trial's heartbeats, an integer >= 1"
            )
        self.heartbeat_interval = heartbeat_interval
        self.url: str | None = None if self.storage is None else str(self.storage)
        self.heartbeat: Heartbeat | None = None
        self.batch: list[Trial] = []  # the trials of the batch being launched

    def setup(
        self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig
    ) -> None:
        super().setup(hydra_context=hydra_context, task_function=task_function, config=config)
        if self.url is None:  # storage: null, a study in memory: the plugin's own sweep
            return
        storage = open_storage(self.url, self.heartbeat_interval)
        # What the plugin's sweep loads its study from (and logs: an object, not the URL with
        # its password).
        self.storage = storage
        study = optuna.create_study(
            study_name=self.study_name,
            storage=storage,
            directions=self._get_directions(),
            load_if_exists=True,
        )
        fail_stale(study)  # the trials a killed sweeper left running
        done = sum(counts(trial) for trial in study.get_trials(deepcopy=False))
        wanted, self.n_trials = self.n_trials, max(self.n_trials - done, 0)
        hint = "" if self.n_trials else NOTHING_LEFT
        where = shown(self.url)
        log.info(f"study {study.study_name!r} in {where}: {done} of n_trials={wanted} trials "
                 f"have run, {self.n_trials} to go{hint}")  # fmt: skip
        self.heartbeat = Heartbeat(storage, study, self.heartbeat_interval)
        self.launcher = TrialLauncher(self.launcher, self)

    def _configure_trials(self, trials: list[Trial], *args: Any, **kwargs: Any) -> Any:
        # Called once a batch, just before the launcher: the batch's trials, for their numbers.
        self.batch = list(trials)
        return super()._configure_trials(trials, *args, **kwargs)

    def sweep(self, arguments: list[str]) -> None:
        if self.heartbeat is None:
            return super().sweep(arguments)
        with self.heartbeat:
            return super().sweep(arguments)


def counts(trial: FrozenTrial) -> bool:
    """Whether `trial` counts toward n_trials: it has a result, or its job failed by itself (a
    trial failed because its sweeper was killed does not: it never ran to its end)."""
    if trial.state in (TrialState.COMPLETE, TrialState.PRUNED):
        return True
    return trial.state == TrialState.FAIL and JOB_DIR in trial.user_attrs


def fail_stale(study: optuna.Study) -> None:
    """Optuna's `fail_stale_trials`, without its warning that heartbeats are experimental."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        fail_stale_trials(study)


def shown(url: str) -> str:
    """The storage URL without its password (for logs)."""
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # not a URL SQLAlchemy reads: RDBStorage says so next
        return url


def open_storage(url: str, heartbeat_interval: int) -> RDBStorage:
    """Optuna's database storage at `url`, with heartbeats; SQLite's directory is created."""
    url = sqlite_store(url)
    try:
        with warnings.catch_warnings():  # "heartbeat_interval is experimental" (optuna 2.10)
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return RDBStorage(url, heartbeat_interval=heartbeat_interval)
    except ImportError as error:  # SQLAlchemy's driver for the database is not installed
        raise ConfigError(
            f"hydra.sweeper.storage={shown(url)}: {error}; install the database's driver for "
            "SQLAlchemy (PostgreSQL: pip install psycopg2-binary)"
        ) from None
    except Exception as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise ConfigError(
            f"hydra.sweeper.storage={shown(url)} cannot be opened ({type(error).__name__}: "
            f"{first}); pass a database URL SQLAlchemy reads, e.g. sqlite:///<path>/optuna.db "
            "or postgresql://<user>@<host>/<database>"
        ) from None


class Heartbeat:
    """While a sweep runs: heartbeats of the trials whose jobs run, and stale trials failed."""

    def __init__(self, storage: RDBStorage, study: optuna.Study, interval: int) -> None:
        self.storage, self.study, self.interval = storage, study, interval
        self.trials: set[int] = set()  # trial ids
        self.lock = threading.Lock()
        self.stopped = threading.Event()
        self.thread: threading.Thread | None = None

    def __enter__(self) -> Heartbeat:
        self.stopped.clear()
        self.thread = threading.Thread(target=self._run, name="optuna-heartbeat", daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopped.set()
        if self.thread is not None:
            self.thread.join()

    def add(self, numbers: Sequence[int]) -> list[int]:
        """Beat for the trials `numbers` of the study until `remove`d; returns their ids."""
        study_id = self.storage.get_study_id_from_name(self.study.study_name)
        ids = [self.storage.get_trial_id_from_study_id_trial_number(study_id, n) for n in numbers]
        with self.lock:
            self.trials.update(ids)
        for trial_id in ids:  # at once: a trial with no heartbeat is never found stale
            self.storage.record_heartbeat(trial_id)
        return ids

    def remove(self, trial_ids: Sequence[int]) -> None:
        with self.lock:
            self.trials.difference_update(trial_ids)

    def _run(self) -> None:
        while not self.stopped.wait(self.interval):
            with self.lock:
                running = sorted(self.trials)
            try:
                for trial_id in running:
                    self.storage.record_heartbeat(trial_id)
                fail_stale(self.study)  # another sweeper's, killed
            except Exception as error:  # a database hiccup: the next beat tries again
                log.warning("optuna heartbeat failed: %s: %s", type(error).__name__, error)


class TrialLauncher(Launcher):
    """The sweep's launcher, numbering each job by its trial and recording the trial's job."""

    def __init__(self, launcher: Launcher, sweeper: StudySweeper) -> None:
        self.launcher, self.sweeper = launcher, sweeper

    def setup(self, **kwargs: Any) -> None:
        self.launcher.setup(**kwargs)

    def launch(
        self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int
    ) -> Sequence[JobReturn]:
        trials = self.sweeper.batch
        assert len(trials) == len(job_overrides), "a batch launched without its trials"
        heartbeat = self.sweeper.heartbeat
        assert heartbeat is not None
        ids = heartbeat.add([trial.number for trial in trials])
        returns: list[JobReturn] = []
        try:
            # Trial numbers are consecutive unless another sweeper of the study asked for
            # trials meanwhile: then the batch is launched in runs of consecutive numbers.
            start = 0
            for end in range(1, len(trials) + 1):
                if end == len(trials) or trials[end].number != trials[end - 1].number + 1:
                    returns += self.launcher.launch(
                        job_overrides[start:end], initial_job_idx=trials[start].number
                    )
                    start = end
            for trial, done in zip(trials, returns, strict=True):
                job_dir = done.hydra_cfg.hydra.runtime.output_dir if done.hydra_cfg else ""
                trial.set_user_attr(JOB_DIR, str(job_dir))
        finally:
            heartbeat.remove(ids)
        return returns

"""zootrain/studies.py: an Optuna study kept in a database outlives its sweeper and goes on."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest

from zootrain.errors import ConfigError
from zootrain.studies import JOB_DIR, counts, open_storage

from .test_scale import TINY
from .test_training import ROOT

STUDY = "mobilenet_v3_small-classification"  # the study name: run_name
TRIALS = [
    "hparams_search=optuna",
    "hydra.sweeper.n_trials=4",
    "hydra.sweeper.heartbeat_interval=1",  # a killed sweeper's trial is stale after 2 s
    "backbone=mobilenetv3_small",  # a 6 MB checkpoint (resnet18's: 45 MB), written twice a trial
    "data.num_train=16",
    "data.num_val=16",
    "data.batch_size=16",
]


def sweep_command(tmp_path: Path) -> list[str]:
    """The same `train.py -m hparams_search=optuna` command, run twice: the default storage."""
    return [
        sys.executable,
        str(ROOT / "train.py"),
        "-m",
        *TINY,
        *TRIALS,
        f"paths.multirun={tmp_path}/multirun",
        f"paths.outputs={tmp_path}/outputs",
    ]


def trials(storage: str) -> list[optuna.trial.FrozenTrial]:
    """The study's trials, read back with Optuna's own API."""
    return optuna.load_study(study_name=STUDY, storage=storage).get_trials()


@pytest.mark.slow
def test_a_killed_study_goes_on_where_it_stopped(tmp_path: Path) -> None:
    """4 trials; the sweeper is SIGKILLed while trial 2 runs (0 and 1 done); the same command
    again: trials 0 and 1 are kept unchanged, trial 2 is failed, 2 more run (4 have run)."""
    sweep = tmp_path / "multirun" / STUDY
    storage = f"sqlite:///{sweep}/optuna.db"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}  # the log, if killed
    log = tmp_path / "first.log"
    with log.open("w") as output:
        first = subprocess.Popen(
            sweep_command(tmp_path), cwd=tmp_path, env=env, stdout=output, stderr=output
        )
        # Trial 2's job has started once Hydra wrote its overrides (the summary reads them).
        third_job = sweep / f"2-{STUDY}" / ".hydra" / "overrides.yaml"
        deadline = time.monotonic() + 900  # as test_scale's sweeps: a shared, busy machine
        while not third_job.is_file() and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        first.send_signal(signal.SIGKILL)
        first.wait()
    assert third_job.is_file(), log.read_text()[-3000:]
    before = trials(storage)
    assert [t.state.name for t in before] == ["COMPLETE", "COMPLETE", "RUNNING"]

    again = subprocess.run(
        sweep_command(tmp_path), cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900
    )
    assert again.returncode == 0, again.stderr[-3000:]
    assert "2 of n_trials=4 trials have run, 2 to go" in again.stdout + again.stderr
    after = trials(storage)
    assert [t.state.name for t in after] == ["COMPLETE", "COMPLETE", "FAIL", "COMPLETE", "COMPLETE"]
    for old, new in zip(before[:2], after[:2], strict=True):
        assert (new.params, new.value, new.datetime_complete) == (
            old.params,
            old.value,
            old.datetime_complete,
        )
    assert sum(counts(t) for t in after) == 4  # the interrupted trial does not count
    assert JOB_DIR not in after[2].user_attrs  # its job never returned
    jobs = [Path(t.user_attrs[JOB_DIR]).name for t in after if counts(t)]
    assert jobs == [f"{n}-{STUDY}" for n in (0, 1, 3, 4)]  # job number = trial number

    with (sweep / "summary.csv").open() as f:
        rows = {int(row["job"]): row for row in csv.DictReader(f)}
    assert sorted(rows) == [0, 1, 2, 3, 4]
    assert sorted(n for n, row in rows.items() if row["status"] == "ok") == [0, 1, 3, 4]
    assert "killed" in rows[2]["error"]
    for t in after:
        if t.value is not None:  # the summary's score is the one the study was told
            assert float(rows[t.number]["best_score"]) == pytest.approx(t.value)


def test_trials_count_when_their_job_returned() -> None:
    study = optuna.create_study()
    done, failed, interrupted, running = (study.ask() for _ in range(4))
    done.set_user_attr(JOB_DIR, "0-x")
    failed.set_user_attr(JOB_DIR, "1-x")
    study.tell(done, 0.5)
    study.tell(failed, state=optuna.trial.TrialState.FAIL)
    study.tell(interrupted, state=optuna.trial.TrialState.FAIL)  # failed as stale: no job dir
    assert [counts(t) for t in study.get_trials()] == [True, True, False, False]
    assert running.number == 3


def test_storage_errors_say_what_to_pass(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"storage=nonsense cannot be opened .*sqlite:///"):
        open_storage("nonsense", 60)
    with pytest.raises(ConfigError, match=r"storage=postgresql://u:\*\*\*@db/x: .*psycopg2"):
        open_storage("postgresql://u:secret@db/x", 60)  # the password is not shown
    url = f"sqlite:///{tmp_path}/new/dir/optuna.db"  # the directory is created
    optuna.create_study(storage=open_storage(url, 60), study_name="s")
    assert (tmp_path / "new" / "dir" / "optuna.db").is_file()

"""Scale-out on CPU: DDP over gloo, multiruns (basic, submitit_local, Optuna), SLURM and requeue.

The multirun tests run `python train.py -m ...` as users do (DDP relaunches the script), on
tiny data and one epoch; the SLURM tests render what would be submitted, with no cluster.
"""

from __future__ import annotations

import csv
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import DictConfig, open_dict
from PIL import Image

from zootrain.build import build_trainer
from zootrain.checkpoints import load_checkpoint
from zootrain.checks import check_config
from zootrain.cli import train_command
from zootrain.cluster import slurm_plugins
from zootrain.errors import ConfigError
from zootrain.launch import job_command
from zootrain.run import train
from zootrain.tasks import Classification

from .test_training import CONFIGS, ROOT, config

TINY = [
    "data.image_size=32",
    "data.num_train=64",
    "data.num_val=32",
    "data.num_test=32",
    "data.batch_size=32",
    "trainer.max_epochs=1",
    "trainer.num_sanity_val_steps=0",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
    "callbacks=none",
    "test_after_fit=false",
    "pictures=false",  # tests/test_predictions.py checks them
    "export_backbone=false",
]


def multirun(tmp_path: Path, *overrides: str) -> subprocess.CompletedProcess:
    """`python train.py -m <overrides>` with every output under `tmp_path`."""
    command = [sys.executable, str(ROOT / "train.py"), "-m", *TINY, *overrides]
    command += [f"paths.outputs={tmp_path}/outputs", f"hydra.sweep.dir={tmp_path}/sweep"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}  # submitit's job processes import zootrain/
    return subprocess.run(
        command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900
    )


def jobs(tmp_path: Path) -> list[Path]:
    return sorted(p for p in (tmp_path / "sweep").iterdir() if p.is_dir() and p.name[0].isdigit())


def logged_keys(run: Path) -> list[str]:
    with (run / "metrics.csv").open() as f:
        return sorted(next(csv.reader(f)))


def assert_written_once(run: Path) -> None:
    """The run's own files exist, once, complete (no temp files of an interrupted write)."""
    for name in ("config.yaml", "metrics.csv", "metrics.png", "checkpoints/last.ckpt"):
        assert (run / name).is_file(), name
    assert not list(run.rglob("*.tmp")), "temporary files left behind"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["best.ckpt", "last.ckpt"]


@pytest.fixture(scope="module")
def basic_sweep(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[Path, subprocess.CompletedProcess]:
    """Two jobs with the basic launcher; the first fails (a negative lr is refused)."""
    tmp_path = tmp_path_factory.mktemp("basic")
    return tmp_path, multirun(tmp_path, "optim.lr=-1,1e-3")


@pytest.mark.slow
def test_failing_job_does_not_stop_the_sweep(
    basic_sweep: tuple[Path, subprocess.CompletedProcess],
) -> None:
    tmp_path, done = basic_sweep
    assert done.returncode == 1, done.stderr  # the sweep reports the failure at its end
    failed, passed = jobs(tmp_path)
    log = (failed / "train.log").read_text()
    assert "[ERROR] - error: optim.lr=-1 cannot work" in log and "Traceback" not in log, log
    assert not (failed / "checkpoints" / "last.ckpt").exists()
    assert_written_once(passed)
    assert "optim.lr=-1" not in (passed / "train.log").read_text()


@pytest.mark.slow
def test_a_sweep_with_a_failed_job_is_summarised(
    basic_sweep: tuple[Path, subprocess.CompletedProcess],
) -> None:
    """Hydra skips on_multirun_end when a job fails; the summary is still written, both rows."""
    tmp_path, done = basic_sweep
    sweep = tmp_path / "sweep"
    with (sweep / "summary.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [(r["job"], r["status"], r["overrides"]) for r in rows] == [
        ("1", "ok", "optim.lr=0.001"),  # as Hydra writes the swept value
        ("0", "failed", "optim.lr=-1"),
    ]
    passed = jobs(tmp_path)[1]
    assert rows[0]["best_checkpoint"] == str(passed / "checkpoints" / "best.ckpt")
    assert (rows[0]["best_epoch"], rows[0]["monitor"]) == ("1", "val/acc")
    with (passed / "metrics.csv").open() as f:
        logged = [float(row["val/acc"]) for row in csv.DictReader(f) if row["val/acc"]]
    assert float(rows[0]["best_score"]) == pytest.approx(max(logged))
    lr_error = "optim.lr=-1 cannot work: it is the learning rate, a number >= 0"
    assert rows[1]["error"] == f"ConfigError: {lr_error}"
    assert (sweep / "summary.md").is_file() and (sweep / "summary.png").is_file()
    assert "summary.md" in done.stdout and lr_error in done.stdout


@pytest.mark.slow
def test_ddp_in_a_multirun(
    basic_sweep: tuple[Path, subprocess.CompletedProcess], tmp_path: Path
) -> None:
    """3 jobs x 2 gloo processes: each job's rank 1 runs that job, not the sweep again; the
    failing middle job does not end the sweep (Lightning's rank watcher would SIGKILL it)."""
    done = multirun(tmp_path, "trainer=ddp_cpu", "optim.lr=1e-3,-1,2e-3")
    assert done.returncode == 1, done.stderr[-3000:]  # not -9: the sweep ran to its end
    assert "EADDRINUSE" not in done.stderr
    ddp_jobs = jobs(tmp_path)
    assert [p.name for p in ddp_jobs] == [f"{i}-resnet18-classification" for i in range(3)]
    failed = ddp_jobs.pop(1)
    assert "error: optim.lr=-1 cannot work" in (failed / "train.log").read_text()
    assert not (failed / "checkpoints" / "last.ckpt").exists()
    single = jobs(basic_sweep[0])[1]
    for run in ddp_jobs:
        assert_written_once(run)
        assert (run / "train_ddp_process_1.log").is_file()  # rank 1 ran in this job's directory
        assert logged_keys(run) == logged_keys(single)  # same metrics as one process
        config = load_checkpoint(run / "checkpoints" / "last.ckpt")["hyper_parameters"]["config"]
        assert config["trainer"]["devices"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sweep"]  # no stray run directories


@pytest.mark.slow
def test_optuna_trials_on_submitit_local(tmp_path: Path) -> None:
    """Two Optuna trials, run in parallel as two submitit_local jobs; best value = a job's score."""
    done = multirun(
        tmp_path,
        "hparams_search=optuna",
        "hydra.sweeper.n_trials=2",
        "hydra.sweeper.n_jobs=2",
        "hydra/launcher=submitit_local",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    trials = jobs(tmp_path)
    assert len(trials) == 2
    scores = []
    for run in trials:
        assert_written_once(run)
        overrides = (run / ".hydra" / "overrides.yaml").read_text()
        for key in ("optim.lr", "optim.weight_decay", "backbone.drop_path_rate"):
            assert f"- {key}=" in overrides, overrides  # resnet18 has stochastic depth
        with (run / "metrics.csv").open() as f:
            scores += [float(row["val/acc"]) for row in csv.DictReader(f) if row["val/acc"]]
    optimization = (tmp_path / "sweep" / "optimization_results.yaml").read_text()
    assert "name: optuna" in optimization
    best = float(re.search(r"best_value: ([\d.]+)", optimization).group(1))
    assert best == pytest.approx(max(scores))
    with (tmp_path / "sweep" / "summary.csv").open() as f:  # the jobs ran in other processes
        summarised = [float(row["best_score"]) for row in csv.DictReader(f)]
    assert summarised == sorted(summarised, reverse=True) and summarised[0] == pytest.approx(best)
    assert Image.open(tmp_path / "sweep" / "summary.png").text["Panels"] == "3"  # + history


def hydra_config(*overrides: str) -> DictConfig:
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return compose("train", overrides=list(overrides), return_hydra_config=True)


def test_optuna_search_space_follows_the_backbone() -> None:
    import optuna

    from zootrain.launch import drop_path_search_space

    for backbone, expected in (("resnet18", True), ("mobilenetv3", True), ("vgg", False)):
        cfg = hydra_config("hparams_search=optuna", f"backbone={backbone}")
        assert cfg.hydra.sweeper.direction == "maximize"
        assert cfg.hydra.sweeper.storage == f"sqlite:///multirun/{cfg.run_name}/optuna.db"
        trial = optuna.create_study().ask()
        drop_path_search_space(cfg, trial)
        assert ("backbone.drop_path_rate" in trial.params) == expected, backbone


def test_slurm_launcher_renders_the_sbatch_script(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The submitit_slurm config through the launcher's own code, up to the `sbatch` call."""
    from submitit.slurm.slurm import SlurmExecutor

    cfg = hydra_config(
        "hydra/launcher=submitit_slurm",
        "hydra.launcher.partition=gpu",
        "trainer=ddp",
        "trainer.devices=4",
        "trainer.num_nodes=2",
        f"hydra.sweep.dir={tmp_path}",
        "hydra.job.name=train",
    )
    scripts: list[str] = []

    class Submitted(Exception):
        pass

    def sbatch(self: SlurmExecutor, command: str) -> None:
        scripts.append(self._make_submission_file_text(command, "uid"))
        raise Submitted

    monkeypatch.setattr(SlurmExecutor, "_submit_command", sbatch)
    monkeypatch.setattr(SlurmExecutor, "affinity", classmethod(lambda cls: 2))  # "srun" found
    launcher = instantiate(cfg.hydra.launcher)
    launcher.setup(hydra_context=None, task_function=train_command, config=cfg)
    with pytest.raises(Submitted):
        launcher.launch([["backbone=resnet50"], ["backbone=convnext_tiny"]], initial_job_idx=0)
    (script,) = scripts
    flags = dict(re.findall(r"^#SBATCH --([\w-]+)=?(.*)$", script, flags=re.MULTILINE))
    assert flags["partition"] == "gpu"
    assert flags["nodes"] == "2"
    assert flags["ntasks-per-node"] == "4"  # one task per GPU: SLURM starts the ranks
    assert flags["gpus-per-node"] == "4"
    assert flags["signal"] == "USR1@300"  # Lightning's requeue signal, 5 minutes ahead
    assert flags["array"] == "0-1%2"
    assert flags["time"] == "1440"
    assert flags["job-name"] == "train"
    assert "srun" in script and "submitit.core._submit" in script


def test_ddp_children_run_this_job() -> None:
    """What Lightning relaunches for rank 1: this job's overrides, no sweep options."""
    hydra = hydra_config().hydra
    with open_dict(hydra):
        hydra.overrides.task = ["trainer=ddp_cpu", "seed=2", "optim.lr=0.001"]
        hydra.overrides.hydra = ["hydra.mode=MULTIRUN", "hydra/launcher=submitit_local"]
        hydra.overrides.hydra += ["hydra.sweep.dir=/x", "hydra.job_logging.root.level=DEBUG"]
    argv = ["train.py", "-m", "-cn", "train", "trainer=ddp_cpu", "seed=1,2", "optim.lr=0.001"]
    assert job_command(argv, hydra) == [
        "train.py",
        "-cn",
        "train",
        "trainer=ddp_cpu",
        "seed=2",
        "optim.lr=0.001",
        "hydra.job_logging.root.level=DEBUG",
    ]


SLURM_ENV = {
    "SLURM_NTASKS": "1",
    "SLURM_JOB_NAME": "train",
    "SLURM_JOB_ID": "4242",
    "SLURM_PROCID": "0",
    "SLURM_LOCALID": "0",
    "SLURM_NODEID": "0",
}


class Preempted(Exception):
    """Stands for SLURM ending the job after the requeue signal."""


class SignalThenKill(L.Callback):
    """SLURM's warning before the time limit after the first step; the job ends after the next."""

    def on_train_batch_end(self, trainer: L.Trainer, *args: object) -> None:
        if trainer.global_step == 1:
            os.kill(os.getpid(), signal.SIGUSR1)
        elif trainer.global_step == 2:
            raise Preempted


def tiny_config(tmp_path: Path, *overrides: str) -> DictConfig:
    return config(tmp_path, *TINY, "data.batch_size=16", *overrides)


def as_slurm_job(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Run train() as in a SLURM job."""
    for key, value in SLURM_ENV.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("PATH", str(tmp_path))  # no scontrol here: a requeue call just fails


def test_requeued_slurm_job_resumes_from_the_signal_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    as_slurm_job(monkeypatch, tmp_path)
    with pytest.raises(Preempted):
        train(tiny_config(tmp_path), [SignalThenKill()])
    run = tmp_path / "outputs" / "resnet18-classification" / "run"
    assert load_checkpoint(run / "hpc_ckpt_1.ckpt")["global_step"] == 1  # saved on the signal
    assert not (run / "checkpoints" / "last.ckpt").exists()  # the epoch never ended

    # The requeued job: the same Hydra job in the same run directory, SLURM_RESTART_COUNT set.
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    train(tiny_config(tmp_path))
    last = load_checkpoint(run / "checkpoints" / "last.ckpt")
    assert (last["epoch"], last["global_step"]) == (0, 4)  # went on from step 1, not from 0


class SignalWhileTesting(L.Callback):
    """SLURM's requeue signal (its time limit is near) while the trained run is tested."""

    def on_test_start(self, trainer: L.Trainer, *args: object) -> None:
        os.kill(os.getpid(), signal.SIGUSR1)


def test_requeue_signal_after_fit_is_ignored(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A trained run is neither requeued nor killed by the signal: its test and export finish."""
    as_slurm_job(monkeypatch, tmp_path)
    handler = signal.getsignal(signal.SIGUSR1)
    result = train(tiny_config(tmp_path, "test_after_fit=true"), [SignalWhileTesting()])
    assert "test/acc" in result.metrics
    assert not list(Path(result.output_dir).glob("hpc_ckpt_*"))  # Lightning saved nothing
    assert signal.getsignal(signal.SIGUSR1) is handler  # the next job in this process requeues


def test_slurm_environment_uses_the_configured_signal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert slurm_plugins("USR1") == []  # not a SLURM job
    for key, value in SLURM_ENV.items():
        monkeypatch.setenv(key, value)
    (slurm,) = slurm_plugins(tiny_config(tmp_path, "requeue_signal=USR2").requeue_signal)
    assert slurm.auto_requeue and slurm.requeue_signal == signal.SIGUSR2
    trainer = build_trainer(tiny_config(tmp_path), tmp_path, Classification())
    assert trainer._accelerator_connector.cluster_environment.requeue_signal == signal.SIGUSR1
    with pytest.raises(ConfigError, match="requeue_signal=TERM2 is not a signal name"):
        check_config(tiny_config(tmp_path, "requeue_signal=TERM2"))

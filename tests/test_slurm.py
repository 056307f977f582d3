"""Sweeps, DDP and requeue against a running SLURM (`scripts/slurm-local.sh up` starts one).

Marked `slurm` and skipped, with the reason, where no SLURM controller answers. Each test checks
one `python train.py -m hydra/launcher=submitit_slurm ...` as a user runs it, on tiny data. The
four sweeps start together (one xdist worker, one module fixture) and their jobs share the CPUs
(`--oversubscribe`): they mostly wait on SLURM (scheduling, a requeue, a time limit). Where a
signal must land mid-epoch, `tests/pause.py` holds the job's first run at a known step (asleep,
no CPU) until SLURM ends it.
"""

from __future__ import annotations

import csv
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from zootrain.checkpoints import load_checkpoint

from .test_training import ROOT


def _no_cluster() -> str | None:
    """Why SLURM jobs cannot run here, or None when they can."""
    if shutil.which("sbatch") is None or shutil.which("sinfo") is None:
        return "no SLURM here (sbatch not found); scripts/slurm-local.sh up installs and starts one"
    try:
        sinfo = subprocess.run(
            ["sinfo", "--noheader", "--responding", "--format=%T"],
            capture_output=True,
            text=True,
            timeout=30,
        )
    except subprocess.TimeoutExpired:
        return "the SLURM controller does not answer (sinfo timed out)"
    if sinfo.returncode != 0:
        first = (sinfo.stderr.strip().splitlines() or ["no output"])[0]
        return (
            f"the SLURM controller does not answer ({first}); scripts/slurm-local.sh up starts one"
        )
    if not re.search(r"^(idle|mixed|allocated|completing)", sinfo.stdout, flags=re.MULTILINE):
        return f"no SLURM node can run jobs (sinfo: {sinfo.stdout.split() or 'no nodes'})"
    return None


NO_CLUSTER = _no_cluster()
pytestmark = [
    pytest.mark.slurm,
    pytest.mark.slow,
    pytest.mark.xdist_group("slurm"),  # with --dist loadgroup: one worker starts the sweeps once
    pytest.mark.skipif(NO_CLUSTER is not None, reason=NO_CLUSTER or ""),
]

SLURM = [
    "hydra/launcher=submitit_slurm",
    "hydra.launcher.gpus_per_node=null",  # a CPU-only cluster
    "hydra.launcher.cpus_per_task=1",
    "hydra.launcher.mem_gb=2",
    "hydra.launcher.timeout_min=10",
    "+hydra.launcher.additional_parameters.oversubscribe=true",  # ignored where not allowed
]
TINY = [
    "trainer=cpu",
    "data.image_size=32",
    "data.num_train=64",
    "data.num_val=32",
    "data.num_test=32",
    "data.batch_size=16",
    "data.num_workers=0",
    "trainer.max_epochs=1",
    "trainer.num_sanity_val_steps=0",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
    "callbacks=none",
]
RUN = "resnet18-classification"


class Sweep:
    """`python train.py -m hydra/launcher=submitit_slurm <overrides>` in the background."""

    def __init__(self, tmp_path: Path, *overrides: str) -> None:
        self.tmp, self.dir = tmp_path, tmp_path / "sweep"
        command = [sys.executable, str(ROOT / "train.py"), "-m", *SLURM, *TINY, *overrides]
        command += [f"paths.outputs={tmp_path}/outputs", f"hydra.sweep.dir={self.dir}"]
        # SLURM passes this environment to the jobs: they import the project, one thread each.
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
        with (tmp_path / "stdout").open("w") as out, (tmp_path / "stderr").open("w") as err:
            self.process = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=out, stderr=err)
        self.start, self.seconds = time.monotonic(), float("nan")
        threading.Thread(target=self._time, daemon=True).start()

    def _time(self) -> None:
        self.process.wait()
        self.seconds = time.monotonic() - self.start

    def job_ids(self) -> list[str]:
        """The SLURM ids of the jobs submitted so far (`<id>` or `<array id>_<index>`)."""
        folder = self.dir / ".submitit"
        pickles = folder.glob("*/*_submitted.pkl")  # an array's own folder holds only its script
        return sorted(p.parent.name for p in pickles if re.fullmatch(r"\d+(_\d+)?", p.parent.name))

    def wait_for(self, condition: Callable[[], bool], what: str, timeout: float = 600) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if self.process.poll() is not None:
                stderr = (self.tmp / "stderr").read_text()
                pytest.fail(f"the sweep ended before {what}:\n{stderr[-3000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"no {what} after {timeout:.0f} s")
            time.sleep(0.5)

    def finish(self, name: str, timeout: float = 600) -> subprocess.CompletedProcess:
        """Wait for the sweep to end; its exit status and output."""
        self.process.wait(timeout=timeout)
        time.sleep(0.1)  # the timing thread
        print(f"{name}: {self.seconds:.0f} s")
        stdout, stderr = ((self.tmp / n).read_text() for n in ("stdout", "stderr"))
        return subprocess.CompletedProcess(
            self.process.args, self.process.returncode, stdout, stderr
        )

    def job_log(self, suffix: str = "out", task: int = 0) -> str:
        """A job's stdout or stderr (all its runs: submitit appends), of the only job."""
        (job,) = self.job_ids()
        return (self.dir / ".submitit" / job / f"{job}_{task}_log.{suffix}").read_text()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        for job in self.job_ids():
            subprocess.run(["scancel", job], capture_output=True)


def pause(tmp_path: Path, epoch: int, batch: int) -> list[str]:
    """Overrides that hold the job's first run after `batch` of `epoch` (see tests/pause.py)."""
    return [
        "+callbacks.pause._target_=tests.pause.PauseUntilEnded",
        f"+callbacks.pause.epoch={epoch}",
        f"+callbacks.pause.batch={batch}",
        f"+callbacks.pause.marker={tmp_path}/paused",
    ]


SWEEPS: dict[str, Callable[[Path], list[str]]] = {
    # 2 array jobs; job 1 fails at start-up on a checkpoint that does not exist
    "failing": lambda tmp: [f"ckpt_path=null,{tmp}/missing.ckpt"],
    "ddp": lambda tmp: ["trainer=ddp_cpu", "test_after_fit=false"],
    "requeue": lambda tmp: [
        "data.num_train=128",  # 8 steps an epoch
        "data.num_workers=1",  # SLURM signals the DataLoader worker too
        "trainer.max_epochs=2",
        "trainer.log_every_n_steps=2",
        *pause(tmp, epoch=1, batch=3),  # until the test sends the signal
    ],
    "time_limit": lambda tmp: [
        "hydra.launcher.timeout_min=2",
        "hydra.launcher.signal_delay_s=60",
        "trainer.max_epochs=2",
        "test_after_fit=false",
        "export_backbone=false",
        *pause(tmp, epoch=0, batch=1),  # until SLURM's own signal
    ],
}


@pytest.fixture(scope="module")
def sweeps(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Sweep]]:
    """The module's sweeps, started at once; whatever a failing test leaves running is stopped."""
    started = {}
    for name, overrides in SWEEPS.items():
        tmp = tmp_path_factory.mktemp(name)
        started[name] = Sweep(tmp, *overrides(tmp))
    yield started
    for run in started.values():
        run.stop()


def rows(run: Path) -> list[dict[str, str]]:
    with (run / "metrics.csv").open(newline="") as f:
        return list(csv.DictReader(f))


def assert_quiet_without_accounting(done: subprocess.CompletedProcess) -> None:
    """At most one line about `sacct` where the cluster keeps no accounting database."""
    output = done.stdout + done.stderr
    assert output.count("sacct") <= 1, output
    assert "Bypassing" not in output and "accounting storage is disabled\n" not in output


def test_sweep_reports_the_failing_and_the_finished_job(sweeps: dict[str, Sweep]) -> None:
    """Two array jobs: job 1 fails on a bad override (one line), job 0 trains and exports."""
    run = sweeps["failing"]
    missing = run.tmp / "missing.ckpt"
    done = run.finish("2-job sweep")
    assert done.returncode == 1, done.stderr[-3000:]  # the sweep reports the failure at its end
    error = f"checkpoint '{missing}' does not exist"
    assert f"CheckpointError: {error}" in done.stderr.strip().splitlines()[-1]
    assert_quiet_without_accounting(done)
    finished, failed = sorted(p for p in run.dir.iterdir() if p.name[0].isdigit())
    assert (finished.name, failed.name) == (f"0-{RUN}", f"1-{RUN}")
    log = (failed / "train.log").read_text()
    assert f"error: {error}" in log and "Traceback" not in log, log
    # result.json: the job's row of the sweep summary (zootrain.sweep)
    assert sorted(p.name for p in failed.iterdir()) == [
        ".hydra",
        ".lock",  # the run directory's lock (zootrain.runs), held by the job while it ran
        "result.json",
        "train.log",
    ]
    for name in ("config.yaml", "metrics.csv", "metrics.png", "checkpoints/best.ckpt"):
        assert (finished / name).is_file(), name
    job = sorted(run.job_ids())[0]
    stdout = (run.dir / ".submitit" / job / f"{job}_0_log.out").read_text()
    best = re.search(r"best val/acc: ([\d.]+)", stdout)
    assert best, stdout
    test = [r for r in rows(finished) if r.get("test/acc")]
    assert len(test) == 1  # tested once, after the fit
    assert f"backbone weights: {finished}/checkpoints/backbone.safetensors" in stdout


def test_ddp_ranks_are_slurm_tasks(sweeps: dict[str, Sweep]) -> None:
    """trainer=ddp_cpu: SLURM starts 2 tasks, Lightning reads the ranks; one run's files."""
    run = sweeps["ddp"]
    done = run.finish("DDP, 2 SLURM tasks")
    assert done.returncode == 0, done.stderr[-3000:]
    assert_quiet_without_accounting(done)
    for rank in (0, 1):  # Lightning's records go where the app's go (stdout under Hydra)
        log = run.job_log("out", task=rank) + run.job_log("err", task=rank)
        assert f"GLOBAL_RANK: {rank}, MEMBER: {rank + 1}/2" in log, log
    stdout = run.job_log("out", task=0) + run.job_log("out", task=1)
    assert stdout.count("final metrics") == 1 and stdout.count("backbone weights:") == 1
    (job,) = (p for p in run.dir.iterdir() if p.name[0].isdigit())
    assert sorted(p.name for p in (job / "checkpoints").iterdir()) == [
        "backbone.safetensors",
        "best.ckpt",
        "last.ckpt",
    ]
    assert not list(job.glob("train_ddp_process_*.log"))  # no rank was started by Lightning
    config = load_checkpoint(job / "checkpoints" / "last.ckpt")["hyper_parameters"]["config"]
    assert config["trainer"]["devices"] == 2
    assert [r["epoch"] for r in rows(job) if r.get("val/acc")] == ["0"]  # rank 0 logs, once


def read(path: Path) -> dict:
    """A checkpoint of a run with the test's pause callback (which train.py's resume allows)."""
    return load_checkpoint(path, also_allowed={"tests.pause.PauseUntilEnded"})


def best_score(checkpoint: dict) -> float:
    """The best val/acc that the checkpoint's ModelCheckpoint has seen."""
    (state,) = (
        v for k, v in checkpoint["callbacks"].items() if "ModelCheckpoint" in k and "val/acc" in k
    )
    return float(state["best_model_score"])


def test_requeue_signal_mid_epoch_resumes_the_run_with_its_history(
    sweeps: dict[str, Sweep],
) -> None:
    """`scancel --signal=USR1` in epoch 1: Lightning saves hpc_ckpt_1.ckpt and requeues; the job
    goes on from it in the same run directory, with every epoch in metrics.csv once."""
    run = sweeps["requeue"]
    marker = run.tmp / "paused"
    run.wait_for(marker.is_file, "pause in epoch 1")
    job = run.dir / f"0-{RUN}"
    before = rows(job)
    assert [r["epoch"] for r in before if r.get("val/acc")] == ["0"]
    last_step = read(job / "checkpoints" / "last.ckpt")["global_step"]
    (job_id,) = run.job_ids()
    subprocess.run(["scancel", "--signal=USR1", job_id], check=True)
    done = run.finish("USR1 requeue")
    assert done.returncode == 0, done.stderr[-3000:]
    assert_quiet_without_accounting(done)

    # The requeue checkpoint is the newest state (4 steps past last.ckpt), and the run resumed
    # from it, in its own directory.
    hpc = read(job / "hpc_ckpt_1.ckpt")
    assert (last_step, hpc["global_step"], int(marker.read_text())) == (8, 12, 12)
    logs = run.job_log("out") + run.job_log("err")  # Lightning's records go to stdout (Hydra)
    assert logs.count("Handling auto-requeue signal") == 1
    assert f"Restoring states from the checkpoint path at {job}/hpc_ckpt_1.ckpt" in logs
    assert not (run.tmp / "outputs").exists()
    assert sorted(p.name for p in run.dir.iterdir() if p.name[0].isdigit()) == [f"0-{RUN}"]

    # The whole history: the rows before the requeue, then the rest; every epoch once.
    after = rows(job)
    assert [{k: r[k] for k in before[0]} for r in after[: len(before)]] == before
    assert [r["epoch"] for r in after if r.get("val/acc")] == ["0", "1"]
    last = read(job / "checkpoints" / "last.ckpt")
    assert (last["epoch"], last["global_step"]) == (1, 16)
    plotted = last["callbacks"]["MetricsPlot"]["history"]["val/acc"]
    assert [epoch for epoch, _ in plotted] == [0, 1]
    assert (job / "metrics.png").is_file()

    # Best-checkpoint tracking kept: the best score of both epochs, before and after.
    scores = [float(r["val/acc"]) for r in after if r.get("val/acc")]
    assert best_score(last) == pytest.approx(max(scores))
    # One final test and export.
    assert len([r for r in after if r.get("test/acc")]) == 1
    stdout = run.job_log("out")
    assert stdout.count("final metrics") == 1 and stdout.count("backbone weights:") == 1
    assert (job / "checkpoints" / "backbone.safetensors").is_file()


def test_time_limit_requeues_by_itself(sweeps: dict[str, Sweep]) -> None:
    """A 2-minute job whose first run never ends by itself: SLURM sends the requeue signal
    60 s before the limit, Lightning requeues, and the second run finishes the training."""
    run = sweeps["time_limit"]
    done = run.finish("time-limit requeue")
    assert done.returncode == 0, done.stderr[-3000:]
    job = run.dir / f"0-{RUN}"
    assert read(job / "hpc_ckpt_1.ckpt")["global_step"] == 2
    logs = run.job_log("out") + run.job_log("err")  # Lightning's records go to stdout (Hydra)
    assert "TIME LIMIT" not in logs  # requeued before the limit, not killed at it
    assert logs.count("Handling auto-requeue signal") == 1
    assert f"Restoring states from the checkpoint path at {job}/hpc_ckpt_1.ckpt" in logs
    last = read(job / "checkpoints" / "last.ckpt")
    assert (last["epoch"], last["global_step"]) == (1, 8)
    assert [r["epoch"] for r in rows(job) if r.get("val/acc")] == ["0", "1"]

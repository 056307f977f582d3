"""Runs that cannot collide or lie: one live process per run directory, the run's record kept,
stops that exit non-zero, divergence caught, every config value checked before a file is
written."""

from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch
from omegaconf import DictConfig

from zootrain.checkpoints import load_checkpoint
from zootrain.checks import check_config
from zootrain.errors import CheckpointError, ConfigError, DivergedError
from zootrain.evaluate import evaluate
from zootrain.result import RunResult
from zootrain.run import train
from zootrain.runs import lock_run_dir, release_run_dir, run_subdir

from .test_cli import run
from .test_resume import StopAfter
from .test_training import ROOT, TINY, config

SMALL = [*TINY, "data.num_train=64", "data.batch_size=16"]  # 4 steps an epoch


def command(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return run(str(ROOT / "train.py"), *args, cwd=cwd)


# ---------------------------------------------------------------------- one process per run


def test_a_live_run_directory_is_refused_to_a_second_process_until_its_holder_dies(
    tmp_path: Path,
) -> None:
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from zootrain.runs import lock_run_dir; "
            "lock_run_dir(sys.argv[1]); print('held', flush=True); time.sleep(300)",
            str(tmp_path),
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(ConfigError, match=rf"in use by process {holder.pid} on .*-c"):
            lock_run_dir(tmp_path)
    finally:
        holder.kill()  # as a lost node or `kill -9`: no clean-up runs
        holder.wait()
    lock_run_dir(tmp_path)  # the OS lock died with its process: no stale marker blocks
    release_run_dir(tmp_path)


def test_train_py_writes_nothing_into_a_run_directory_in_use(tmp_path: Path) -> None:
    """The same hydra.run.dir, a second resume, a resume of a live run: refused before Hydra
    writes its record or log there."""
    run_dir = tmp_path / "run"
    lock_run_dir(run_dir)  # this test process is the live run
    try:
        done = command(*TINY, f"hydra.run.dir={run_dir}")
    finally:
        release_run_dir(run_dir)
    assert done.returncode == 1
    assert done.stderr.startswith(f"error: the run directory {run_dir} is in use by process ")
    assert len(done.stderr.splitlines()) == 1 and "Traceback" not in done.stderr
    assert sorted(p.name for p in run_dir.iterdir()) == [".lock"]


def test_a_resume_writes_its_record_beside_the_runs_first(tmp_path: Path) -> None:
    record = tmp_path / ".hydra"
    assert run_subdir(str(tmp_path), "train") == ".hydra"  # a run's first start
    record.mkdir()
    (record / "config.yaml").write_text("first: start\n")
    assert run_subdir(str(tmp_path), "train") == ".hydra/resume-1"
    assert run_subdir(str(tmp_path), "train") == ".hydra/resume-2"  # reserved: never shared
    assert run_subdir(str(tmp_path), "eval") == ".hydra/eval-1"


def test_a_resume_and_a_directory_that_is_not_a_run_leave_the_first_record_alone(
    tmp_path: Path,
) -> None:
    run_dir = tmp_path / "outputs" / "resnet18-classification" / "first"
    (run_dir / ".hydra").mkdir(parents=True)
    (run_dir / "config.yaml").write_text("run_name: resnet18-classification\n")
    (run_dir / ".hydra" / "config.yaml").write_text("first: start\n")
    done = command(*TINY, f"paths.outputs={tmp_path / 'outputs'}", f"ckpt_path={run_dir}")
    assert done.returncode == 1 and "holds no checkpoints/last.ckpt" in done.stderr
    assert (run_dir / ".hydra" / "config.yaml").read_text() == "first: start\n"
    assert (run_dir / ".hydra" / "resume-1" / "overrides.yaml").is_file()

    mine = tmp_path / "my-folder"
    mine.mkdir()
    done = command(*TINY, f"paths.outputs={tmp_path / 'outputs'}", f"ckpt_path={mine}")
    assert done.returncode == 1
    assert f"ckpt_path={mine} is a directory but not a run of train.py" in done.stderr
    assert list(mine.iterdir()) == []  # no .hydra/, no train.log in the user's folder


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("run_name=../../escaped", "run_name='../../escaped' cannot work: it names one folder"),
        ("paths.outputs={file}/outputs", "cannot create a run directory under {file}/outputs"),
    ],
)
def test_a_run_directory_that_cannot_be_made_is_one_line(
    override: str, message: str, tmp_path: Path
) -> None:
    file = tmp_path / "a-file"
    file.write_text("")
    done = command(*TINY, f"paths.outputs={tmp_path / 'out'}", override.format(file=file))
    assert done.returncode == 1
    assert done.stderr.startswith(f"error: {message.format(file=file)}"), done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]  # nothing made, anywhere


# ---------------------------------------------------------------------- stops are failures


class Interrupt(L.Callback):
    """Ctrl-C at the third optimiser step (epoch 0 has 4), or SIGTERM as the test starts."""

    def __init__(self, when: str) -> None:
        self.when = when

    def on_train_batch_end(self, trainer: L.Trainer, *args: object) -> None:
        if self.when == "fit" and trainer.global_step == 6:
            raise KeyboardInterrupt

    def on_test_start(self, trainer: L.Trainer, *args: object) -> None:
        if self.when == "test":
            os.kill(os.getpid(), signal.SIGTERM)  # Lightning's handler stops the test loop


@pytest.mark.parametrize(
    ("when", "message"),
    [
        ("fit", r"stopped by SIGINT \(Ctrl-C\) at step 6 \(epoch 1\); the last checkpoint is "),
        ("test", r"stopped by SIGTERM after its fit, before its test, export and pictures"),
    ],
)
def test_a_stopped_run_exits_non_zero_saying_where_to_go_on(
    when: str, message: str, tmp_path: Path
) -> None:
    cfg = config(tmp_path, *SMALL, "trainer.max_epochs=2", "test_after_fit=true")
    with pytest.raises(SystemExit, match=message) as stopped:
        train(cfg, [Interrupt(when)])
    assert stopped.value.code not in (0, None)
    assert str(stopped.value.code).startswith("error: ")


def test_a_run_that_saved_no_best_checkpoint_is_not_a_success(tmp_path: Path) -> None:
    cfg = config(tmp_path, *SMALL, "trainer.max_epochs=1", "+trainer.limit_val_batches=0")
    with pytest.raises(Exception, match="ended without a best checkpoint: val/acc was never"):
        train(cfg)


# ---------------------------------------------------------------------- divergence


def test_a_diverging_training_loss_stops_the_run(tmp_path: Path) -> None:
    cfg = config(tmp_path, *SMALL, "optim.lr=1e3", "scheduler=none", "trainer.max_epochs=3")
    with pytest.raises(DivergedError, match=r"the training loss diverged: .* at step \d+, more"):
        train(cfg)


class NanValidation(L.Callback):
    """The second epoch's validation accuracy is NaN (as a diverged model's would be)."""

    def on_validation_epoch_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if trainer.current_epoch == 1 and not trainer.sanity_checking:
            nan = torch.tensor(float("nan"))
            module.val_metrics["val/acc"].compute = lambda: nan  # what Lightning logs


def test_a_non_finite_validation_stops_the_run_and_keeps_no_checkpoint_of_it(
    tmp_path: Path,
) -> None:
    cfg = config(tmp_path, *SMALL, "trainer.max_epochs=3")
    with pytest.raises(DivergedError, match=r"at epoch 1 the validation gave val/acc nan"):
        train(cfg, [NanValidation()])
    checkpoints = Path(cfg.paths.output_dir) / "checkpoints"
    assert load_checkpoint(checkpoints / "last.ckpt")["epoch"] == 0  # epoch 1 was never saved
    assert load_checkpoint(checkpoints / "best.ckpt")["epoch"] == 0


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[DictConfig, RunResult]:
    """A cosine run of 2 epochs stopped after the first, as a preemption would."""
    tmp_path = tmp_path_factory.mktemp("trained")
    cfg = config(tmp_path, *SMALL, "trainer.max_epochs=2")
    return cfg, train(cfg, [StopAfter(1)])


def test_eval_refuses_non_finite_weights(trained: tuple, tmp_path: Path) -> None:
    _, result = trained
    checkpoint = torch.load(result.best_model_path, weights_only=True)
    checkpoint["state_dict"]["model.backbone.stem.conv.weight"][0, 0, 0, 0] = float("nan")
    torch.save(checkpoint, tmp_path / "nan.ckpt")
    cfg = config(tmp_path, f"ckpt_path={tmp_path / 'nan.ckpt'}", "pictures=false", name="eval")
    with pytest.raises(CheckpointError, match="its weights are not finite"):
        evaluate(cfg)


def test_eval_of_a_state_dict_of_another_head_is_one_line(trained: tuple, tmp_path: Path) -> None:
    _, result = trained
    checkpoint = torch.load(result.best_model_path, weights_only=True)
    checkpoint["state_dict"] = {
        k.replace("model.head.", "model.decoder."): v for k, v in checkpoint["state_dict"].items()
    }
    torch.save(checkpoint, tmp_path / "other.ckpt")
    cfg = config(tmp_path, f"ckpt_path={tmp_path / 'other.ckpt'}", "pictures=false", name="eval")
    with pytest.raises(CheckpointError, match=r"which its weights do not fit \(\d+ missing"):
        evaluate(cfg)


def test_eval_to_an_unwritable_output_dir_fails_before_scoring(
    trained: tuple, tmp_path: Path
) -> None:
    _, result = trained
    (tmp_path / "a-file").write_text("")
    cfg = config(
        tmp_path,
        f"ckpt_path={result.best_model_path}",
        f"output_dir={tmp_path / 'a-file' / 'pictures'}",
        name="eval",
    )
    started = time.perf_counter()
    with pytest.raises(ConfigError, match=r"output_dir=.*a-file/pictures cannot be written"):
        evaluate(cfg)
    assert time.perf_counter() - started < 5  # refused before the model was even built


# ---------------------------------------------------------------------- resume fixes the data


def test_a_resume_with_other_steps_per_epoch_is_refused_under_a_schedule(
    trained: tuple[DictConfig, RunResult], tmp_path: Path
) -> None:
    _, result = trained
    doubled = config(tmp_path, *SMALL, "trainer.max_epochs=2", "data.num_train=128")
    doubled.ckpt_path = result.output_dir
    with pytest.raises(ConfigError, match=r"takes 16 optimiser steps in all, the checkpoint's.* 8"):
        train(doubled)


# ---------------------------------------------------------------------- every value checked


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("trainer.max_epochs=abc", "trainer.max_epochs=abc cannot work: it is the number of"),
        ("trainer.accumulate_grad_batches=0", "trainer.accumulate_grad_batches=0 cannot work"),
        ("+trainer.overfit_batches=1", "trainer.overfit_batches=1 cannot work: .*debug=overfit"),
        ("data.batch_size=inf", "data.batch_size=inf cannot work: .* an integer >= 1"),
        ("+x=${oc.env:ZOO_UNSET_VARIABLE}", "x: .*ZOO_UNSET_VARIABLE' not found"),
        ("trainer.gradient_clip_val=-1", "gradient_clip_val=-1 cannot work: .* > 0 or null"),
        ("scheduler.warmup_epochs=-1", "scheduler.warmup_epochs=-1 cannot work"),
        ("callbacks.checkpoint.save_top_k=0", "save_top_k=0 cannot work: .* >= 1 or -1"),
        ("optim.lr=nan", "optim.lr=nan cannot work: it is the learning rate"),
        ("compile=yes", "compile=yes cannot work: .* true or false"),
        ("run_name=a/b", "run_name='a/b' cannot work"),
        (
            "backbone.pretrained=/runs/x/checkpoints/best.ckpt",
            "is a training checkpoint .* /runs/x/checkpoints/backbone.safetensors",
        ),
    ],
)
def test_every_value_is_checked_in_one_line(override: str, message: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=message):
        check_config(config(tmp_path, override))


def test_a_number_from_the_environment_is_typed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ZOO_BATCH", "16")
    cfg = config(tmp_path, "data.batch_size=${oc.env:ZOO_BATCH}")
    check_config(cfg)
    assert cfg.data.batch_size == 16


def test_a_pickled_file_is_refused_saying_pickled_code_never_runs(tmp_path: Path) -> None:
    path = tmp_path / "model.ckpt"
    path.write_bytes(pickle.dumps({"state_dict": {}}))
    with pytest.raises(CheckpointError, match="pickled code is never executed"):
        load_checkpoint(path)

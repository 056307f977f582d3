"""Resume continues the same run: its directory, its best checkpoint, nothing else's."""

from __future__ import annotations

import datetime
import multiprocessing
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf

from zootrain.checkpoints import load_checkpoint
from zootrain.data.imagefolder import ImageFolderDataModule
from zootrain.data.sampling import EpochSampler, EpochSeeded
from zootrain.data.shapes import ShapesDataset
from zootrain.errors import CheckpointError, ConfigError
from zootrain.run import train
from zootrain.runs import check_unchanged, resolve_resume

from .data.test_imagefolder import make_imagefolder
from .frozen_second import make_run_dir
from .test_training import CONFIGS, LEARNABLE, ROOT, TINY, config

RUN = "resnet18-classification"


class FallingScore(L.Callback):
    """val/acc is 1 - 0.1 * epoch: epoch 0 is the best of any run, whatever the model learns."""

    def on_validation_epoch_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            score = torch.tensor(1.0 - 0.1 * trainer.current_epoch)
            module.val_metrics["val/acc"].compute = lambda: score  # what Lightning logs


# For the tests whose scores come from FallingScore: nothing to learn, 4 steps an epoch.
FOUR_STEPS = ("data.num_train=64",)


def run(tmp_path: Path, *overrides: str, name: str = "t0") -> DictConfig:
    return config(tmp_path, *TINY, *LEARNABLE, "test_after_fit=true", *overrides, run=name)


def test_resume_continues_the_run_in_its_directory_with_its_best(tmp_path: Path) -> None:
    first = run(tmp_path, "trainer.max_epochs=1", *FOUR_STEPS)
    started = train(first, extra_callbacks=[FallingScore()])
    run_dir = Path(started.output_dir)
    assert started.best_score == pytest.approx(1.0)

    resumed = run(tmp_path, "trainer.max_epochs=3", "ckpt_path=last", *FOUR_STEPS, name="t1")
    result = train(resumed, extra_callbacks=[FallingScore()])
    assert Path(result.output_dir) == run_dir  # the same run, not a new directory
    assert not (tmp_path / "outputs" / RUN / "t1").exists()
    # The best of the whole run (epoch 0's 1.0), not of the resumed epochs (0.9).
    assert result.best_score == pytest.approx(1.0)
    assert result.best_epoch == 1
    assert [epoch for epoch, _ in result.monitor_history] == [0, 1, 2]
    assert Path(result.best_model_path) == run_dir / "checkpoints" / "best.ckpt"
    best = load_checkpoint(result.best_model_path)
    assert best["epoch"] == 0
    last = load_checkpoint(run_dir / "checkpoints" / "last.ckpt")
    assert (last["epoch"], last["global_step"]) == (2, 3 * 4)
    # Tested and exported: the best checkpoint, in the run's own directory.
    assert Path(result.backbone_weights) == run_dir / "checkpoints" / "backbone.safetensors"
    from safetensors.torch import load_file

    exported = load_file(result.backbone_weights)
    for key, value in exported.items():
        assert torch.equal(value, best["state_dict"][f"model.backbone.{key}"]), key
    assert "test/acc" in result.metrics
    # config.yaml and the checkpoints record what ran: the resumed run's 3 epochs
    assert OmegaConf.load(run_dir / "config.yaml").trainer.max_epochs == 3
    assert last["hyper_parameters"]["config"]["trainer"]["max_epochs"] == 3
    # ckpt_path=<run dir> names the same run
    named = run(tmp_path, "trainer.max_epochs=4", f"ckpt_path={run_dir}", *FOUR_STEPS, name="t2")
    assert resolve_resume(named).run_dir == run_dir


def test_last_never_skips_to_an_older_run(tmp_path: Path) -> None:
    """The newest run has no checkpoint yet: `last` says so instead of resuming an older one."""
    train(run(tmp_path, "trainer.max_epochs=1"))
    newer = tmp_path / "outputs" / RUN / "t1"
    newer.mkdir()
    (newer / "config.yaml").write_text("seed: 42\n")  # started, stopped before epoch 0 ended
    os.utime(newer / "config.yaml", (2e9, 2e9))
    cfg = run(tmp_path, "trainer.max_epochs=2", "ckpt_path=last", name="t2")
    with pytest.raises(CheckpointError, match=rf"newest run of '{RUN}', .*t1, has no checkpoint"):
        train(cfg)
    empty = run(tmp_path / "elsewhere", "ckpt_path=last")
    with pytest.raises(CheckpointError, match=rf"there is no run of '{RUN}' to resume"):
        train(empty)


def test_a_finished_run_is_not_resumed(tmp_path: Path) -> None:
    """No 0-step fit that rewrites the exports with exit 0: a clear error, files untouched."""
    done = train(run(tmp_path, "trainer.max_epochs=1", "test_after_fit=false"))
    run_dir = Path(done.output_dir)
    exported = Path(done.backbone_weights)
    before = exported.stat().st_mtime_ns
    for ckpt_path in ("last", str(run_dir), str(run_dir / "checkpoints" / "last.ckpt")):
        cfg = run(tmp_path, "trainer.max_epochs=1", f"ckpt_path={ckpt_path}", name="t1")
        with pytest.raises(CheckpointError, match=r"is finished \(1 of trainer.max_epochs=1 "):
            train(cfg)
    assert exported.stat().st_mtime_ns == before
    # What the checkpoint fixes may not change on resume (Lightning would restore it silently).
    changed = run(tmp_path, "trainer.max_epochs=2", "optim.lr=1e-4", "ckpt_path=last", name="t2")
    with pytest.raises(ConfigError, match=r"^optim\.lr=0\.0001 differs from 0\.001, what the run"):
        train(changed)
    assert exported.stat().st_mtime_ns == before


def test_what_cannot_change_on_resume() -> None:
    stored = {
        "optim": {"_target_": "torch.optim.AdamW", "lr": 0.002},
        "scheduler": {"name": "cosine", "warmup_epochs": 1},
        "backbone_lr_mult": 1.0,
        "trainer": {"max_epochs": 4, "accelerator": "cpu"},
        "data": {"num_workers": 0},
    }
    fine = {**stored, "trainer": {"max_epochs": 4, "accelerator": "gpu"}, "data": {}}
    check_unchanged(stored, fine, Path("last.ckpt"))
    for key, value, message in [
        (
            "optim",
            {"_target_": "torch.optim.SGD", "lr": 0.002},
            r"optim\._target_=torch\.optim\.SGD",
        ),
        (
            "scheduler",
            {"name": "none"},
            r"scheduler\.name=none differs from cosine, .*\(and 1 more",
        ),
        ("backbone_lr_mult", 0.1, r"backbone_lr_mult=0\.1 differs from 1\.0"),
        ("trainer", {"max_epochs": 8}, r"trainer\.max_epochs=8 differs from 4"),
    ]:
        with pytest.raises(ConfigError, match=message):
            check_unchanged(stored, {**stored, key: value}, Path("last.ckpt"))
    # Without a schedule the loop reads max_epochs afresh: a longer run is allowed.
    flat = {**stored, "scheduler": {"name": "none"}}
    check_unchanged(flat, {**flat, "trainer": {"max_epochs": 8}}, Path("last.ckpt"))


def fake_run(run_dir: Path, mtime: float, checkpoint: bool = True) -> Path:
    """A run directory started at `mtime`, with a last.ckpt or none."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text("seed: 0\n")
    os.utime(run_dir / "config.yaml", (mtime, mtime))
    last = run_dir / "checkpoints" / "last.ckpt"
    if checkpoint:
        last.parent.mkdir(exist_ok=True)
        torch.save({"state_dict": {}, "hyper_parameters": {"config": {"seed": 0}}}, last)
    return run_dir.resolve()


def test_ckpt_path_names_run_directories(tmp_path: Path) -> None:
    """`last`: this run directory's own checkpoint, else the newest run, multirun jobs too;
    `<run dir>` and `<run dir>/.../x.ckpt`: that run; a loose file: a new run."""
    cfg = run(tmp_path, "ckpt_path=last", name="here")
    here = Path(cfg.paths.output_dir)
    single = fake_run(tmp_path / "outputs" / RUN / "t0", 100)
    job = fake_run(tmp_path / "multirun" / "t1" / f"3-{RUN}", 200)
    fake_run(tmp_path / "multirun" / "t1" / f"3-other-{RUN}", 400)  # another run_name
    assert resolve_resume(cfg) == (job, job / "checkpoints" / "last.ckpt")
    os.utime(single / "config.yaml", (300, 300))  # resumed since: now the newest
    assert resolve_resume(cfg).run_dir == single
    own = fake_run(here, 0)  # the oldest, but this run's own
    assert resolve_resume(cfg) == (here, here / "checkpoints" / "last.ckpt")
    hpc = job / "hpc_ckpt_2.ckpt"
    torch.save({}, hpc)
    os.utime(hpc, (2e9, 2e9))  # newer than the job's last.ckpt
    named = {str(job): hpc, str(job / "checkpoints" / "last.ckpt"): job / "checkpoints/last.ckpt"}
    for ckpt_path, expected in named.items():
        assert resolve_resume(run(tmp_path, f"ckpt_path={ckpt_path}")) == (job, Path(expected))
    loose = tmp_path / "loose.ckpt"
    torch.save({}, loose)
    other = run(tmp_path, f"ckpt_path={loose}", name="new")
    assert resolve_resume(other).run_dir == Path(other.paths.output_dir)
    with pytest.raises(CheckpointError, match=r"is a directory but not a run of train\.py"):
        resolve_resume(run(tmp_path, f"ckpt_path={tmp_path}"))
    (tmp_path / "config.yaml").write_text("")  # a run that stopped before its first epoch
    with pytest.raises(CheckpointError, match=r"holds no checkpoints/last\.ckpt"):
        resolve_resume(run(tmp_path, f"ckpt_path={tmp_path}"))
    assert resolve_resume(run(tmp_path)) == (Path(run(tmp_path).paths.output_dir), None)
    assert own.is_dir()


def test_runs_started_in_the_same_second_get_their_own_directories(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Hydra's run directory (`hydra.run.dir`), composed twice in one frozen second, and four
    processes creating one together: every run its own directory."""
    monkeypatch.setattr(time, "strftime", lambda fmt: "2026-01-01_00-00-00")
    monkeypatch.setattr(datetime, "datetime", FrozenNow)  # what Hydra's ${now:} reads
    dirs = []
    for _ in range(2):
        with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
            cfg = compose(
                "train", overrides=[f"paths.outputs={tmp_path}"], return_hydra_config=True
            )
        dirs.append(cfg.hydra.run.dir)
        assert cfg.hydra.run.dir == dirs[-1]  # resolved once: every read names the same one
    assert dirs[0] != dirs[1], dirs
    with multiprocessing.get_context("spawn").Pool(4) as pool:
        made = pool.starmap(make_run_dir, [(str(tmp_path / "procs"), RUN)] * 4)
    assert sorted(Path(d).name for d in made) == [
        "2026-01-01_00-00-00",
        *(f"2026-01-01_00-00-00_{n}" for n in (1, 2, 3)),
    ]


class FrozenNow(datetime.datetime):
    @classmethod
    def now(cls, tz: Any = None) -> FrozenNow:
        return cls(2026, 1, 1)


def test_sigterm_exits_non_zero_naming_the_last_checkpoint(tmp_path: Path) -> None:
    """A preemption's SIGTERM mid-fit: exit status 1 and where to go on from, not status 0."""
    run_dir = tmp_path / "run"
    overrides = [o for o in TINY if not o.startswith(("data.num_train", "data.batch_size"))]
    command = [
        sys.executable,
        "train.py",
        *overrides,
        "data.num_train=256",
        "data.batch_size=4",  # 64 steps an epoch: the signal arrives mid-epoch
        "trainer.max_epochs=50",
        f"hydra.run.dir={run_dir}",
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with subprocess.Popen(
        command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    ) as process:
        last = run_dir / "checkpoints" / "last.ckpt"
        deadline = time.monotonic() + 600
        while not last.is_file() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        if not last.is_file():
            process.kill()
        assert last.is_file(), f"no epoch ended: {process.communicate()[1][-2000:]}"
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=300)
    assert process.returncode == 1, stderr[-2000:]
    assert "Traceback" not in stderr
    assert "the run was stopped by SIGTERM at step" in stderr
    assert f"the last checkpoint is {last}; resume with" in stderr


def test_save_top_k_keeps_k_checkpoints_named_by_epoch_and_metric(tmp_path: Path) -> None:
    """k = 2 of 3 epochs (val/acc 1.0, 0.9, 0.8): the two best by name, best.ckpt the best."""
    cfg = run(tmp_path, "trainer.max_epochs=3", "callbacks.checkpoint.save_top_k=2", *FOUR_STEPS)
    result = train(cfg, extra_callbacks=[FallingScore()])
    checkpoints = Path(result.output_dir) / "checkpoints"
    assert sorted(p.name for p in checkpoints.glob("*.ckpt")) == [
        "best.ckpt",
        "epoch=0-val_acc=1.0000.ckpt",
        "epoch=1-val_acc=0.9000.ckpt",
        "last.ckpt",
    ]
    assert Path(result.best_model_path) == checkpoints / "best.ckpt"
    assert load_checkpoint(checkpoints / "best.ckpt")["epoch"] == 0
    assert load_checkpoint(checkpoints / "epoch=1-val_acc=0.9000.ckpt")["epoch"] == 1


class StopAfter(L.Callback):
    """Stop the fit after `epochs` epochs as a preemption would, leaving max_epochs (and so the
    cosine schedule) as it was."""

    def __init__(self, epochs: int) -> None:
        self.epochs = epochs

    def on_train_epoch_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if trainer.current_epoch + 1 == self.epochs:
            trainer.should_stop = True


@pytest.mark.slow
@pytest.mark.parametrize("workers", [0, 2])
def test_a_resumed_run_ends_where_the_uninterrupted_run_ends(tmp_path: Path, workers: int) -> None:
    """Stopped after epoch 2 of 4 and resumed: the same weights, optimiser and schedule as 4
    epochs in one go. Augmented data, a reshuffle every epoch, dropout and a cosine schedule:
    a resume that replayed epoch 0's order, flips or dropout masks would end elsewhere."""
    overrides = [
        *TINY,
        "data.num_train=32",
        "data.num_val=16",
        "data.batch_size=16",  # 2 steps an epoch
        "data.augment=true",
        f"data.num_workers={workers}",
        "scheduler=cosine",
        "head.model.dropout=0.5",
        "trainer.max_epochs=4",
        "trainer.deterministic=true",
    ]
    whole = train(config(tmp_path, *overrides, run="whole"))
    stopped = train(config(tmp_path, *overrides, run="cut"), [StopAfter(2)])
    run_dir = Path(stopped.output_dir)
    assert load_checkpoint(run_dir / "checkpoints" / "last.ckpt")["epoch"] == 1
    resumed = train(config(tmp_path, *overrides, f"ckpt_path={run_dir}", run="r"))
    assert Path(resumed.output_dir) == run_dir
    expected = load_checkpoint(Path(whole.output_dir) / "checkpoints" / "last.ckpt")
    got = load_checkpoint(run_dir / "checkpoints" / "last.ckpt")
    assert (got["epoch"], got["global_step"]) == (expected["epoch"], expected["global_step"])
    assert expected["global_step"] == 4 * 2
    torch.testing.assert_close(got["state_dict"], expected["state_dict"])
    optimiser, reference = got["optimizer_states"][0], expected["optimizer_states"][0]
    assert set(reference["state"][0]) >= {"exp_avg", "exp_avg_sq", "step"}
    torch.testing.assert_close(optimiser["state"], reference["state"])
    assert optimiser["param_groups"] == reference["param_groups"]
    schedule, reference_schedule = got["lr_schedulers"][0], expected["lr_schedulers"][0]
    assert schedule["last_epoch"] == reference_schedule["last_epoch"] == 4 * 2
    assert schedule["_last_lr"] == pytest.approx(reference_schedule["_last_lr"])


@pytest.mark.filterwarnings("ignore:This DataLoader will create 2 worker processes")
@pytest.mark.parametrize("workers", [0, 2])
def test_a_resumed_epoch_of_files_reads_what_the_whole_run_read(
    tmp_path: Path, workers: int
) -> None:
    """Real files: a fresh data module (a resumed run) reading epoch 2 gets the order, crops and
    flips the uninterrupted run got after epochs 0 and 1, with a damaged file's place taken by
    the same next file (skip_bad_files), in the main process or in workers."""
    root = make_imagefolder(tmp_path / "data")
    cut = root / "train" / "cat" / "0.jpg"
    cut.write_bytes(cut.read_bytes()[:-50])

    def read(epochs: list[int]) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
        datamodule = ImageFolderDataModule(
            "classification", root, image_size=16, batch_size=3, num_workers=workers,
            skip_bad_files=True,
        )  # fmt: skip
        datamodule.sample_seed = 42
        loader = datamodule.train_dataloader()
        read = []
        for epoch in epochs:
            loader.sampler.set_epoch(epoch)  # what Lightning calls before each epoch
            read.append(list(loader))
        return read

    whole, resumed = read([0, 1, 2]), read([2])
    assert [len(batches) for batches in whole] == [2, 2, 2]  # 6 files, one of them damaged
    for (images, labels), (again, again_labels) in zip(whole[2], resumed[0], strict=True):
        assert torch.equal(images, again) and torch.equal(labels, again_labels)
    assert not all(torch.equal(a[0], b[0]) for a, b in zip(whole[1], whole[2], strict=True))


def test_the_training_order_and_augmentations_follow_seed_and_epoch() -> None:
    """Keys and samples are functions of (seed, epoch, index): not of the generators' state,
    not of an earlier epoch having been read; the caller's generators are left as they were."""
    dataset = ShapesDataset("train", 12, image_size=16, augment=True)
    sampler = EpochSampler(dataset, seed=7)
    sampler.set_epoch(3)
    keys = list(sampler)
    assert sorted(index for _, index in keys) == list(range(12))
    assert {epoch for epoch, _ in keys} == {3}
    fresh = EpochSampler(dataset, seed=7)
    assert [index for _, index in fresh] != [index for _, index in keys]  # epoch 0's order
    fresh.set_epoch(3)
    assert list(fresh) == keys
    fresh.set_epoch(4)
    assert [index for _, index in fresh] != [index for _, index in keys]
    halves = [list(EpochSampler(dataset, 7, num_replicas=2, rank=r)) for r in (0, 1)]
    assert sorted(halves[0] + halves[1]) == sorted((0, i) for i in range(12))

    seeded = EpochSeeded(dataset, seed=7)
    torch.manual_seed(0)
    first = [seeded[(epoch, 5)][0] for epoch in range(8)]
    after = torch.rand(3)
    torch.manual_seed(0)
    assert torch.equal(torch.rand(3), after)  # the caller's generator did not move
    torch.manual_seed(123)
    again = [seeded[(epoch, 5)][0] for epoch in reversed(range(8))][::-1]
    for a, b in zip(first, again, strict=True):
        assert torch.equal(a, b)
    assert len({tuple(x.flatten()[:64].tolist()) for x in first}) > 1  # epochs flip differently
    # A batch read at once, as the DataLoader reads it: the same samples, and the caller's torch,
    # NumPy and Python generators where they were.
    torch.manual_seed(0), np.random.seed(1), random.seed(2)
    batch = seeded.__getitems__([(epoch, 5) for epoch in range(8)])
    assert torch.equal(torch.rand(3), after)
    assert np.random.random_sample() == np.random.RandomState(1).random_sample()
    assert random.random() == random.Random(2).random()
    for a, b in zip(batch, first, strict=True):
        assert torch.equal(a[0], b)
    with pytest.raises(TypeError, match=r"reads \(epoch, index\) keys from an EpochSampler"):
        seeded[5]

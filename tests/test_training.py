"""train.py / eval.py end to end on tiny synthetic data: configs, resume, checkpoints, errors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from hydra.utils import get_object
from omegaconf import DictConfig, OmegaConf, open_dict

from backbones import create
from zootrain.build import build_datamodule, build_model, build_module
from zootrain.checkpoints import load_checkpoint
from zootrain.checks import check_config
from zootrain.errors import CheckpointError, ConfigError, NonFiniteLossError
from zootrain.evaluate import evaluate
from zootrain.report import quiet_lightning
from zootrain.run import train
from zootrain.runs import MOVED_TARGETS
from zootrain.tasks import IGNORE_INDEX, Classification

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
TINY = [
    "data.image_size=32",
    "data.num_train=128",
    "data.num_val=64",
    "data.num_test=64",
    "data.batch_size=32",
    "callbacks=none",
    "logger=csv",
    "trainer.accelerator=cpu",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
    "trainer.log_every_n_steps=1",
    "trainer.num_sanity_val_steps=0",
    "test_after_fit=false",
    "pictures=false",  # tests/test_predictions.py checks them
]


# An easy two-class task with 16 optimiser steps per epoch: the training loss falls within
# two tiny epochs. (Validation accuracy needs a few hundred steps to move on shapes; the
# make train run measures that, not the unit tests.)
LEARNABLE = [
    "data.classes=[circle,cross]",
    "data.max_shapes=1",
    "data.num_train=256",
    "data.batch_size=16",
    "optim.lr=1e-3",
    "scheduler=none",
]


def config(tmp_path: Path, *overrides: str, name: str = "train", run: str = "run") -> DictConfig:
    """Composed like `python <name>.py overrides`, run directory `<tmp>/outputs/<run_name>/<run>`."""
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose(config_name=name, overrides=list(overrides))
    with open_dict(cfg):
        cfg.paths.outputs = str(tmp_path / "outputs")
        cfg.paths.multirun = str(tmp_path / "multirun")
        cfg.paths.output_dir = str(tmp_path / "outputs" / cfg.run_name / run)
    return cfg


def untrained_scores(cfg: DictConfig) -> dict[str, float]:
    """Validation metrics of the model `train(cfg)` starts from (same seed, same data)."""
    quiet_lightning()
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    datamodule = build_datamodule(cfg)
    return L.Trainer(
        accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False
    ).validate(build_module(cfg, datamodule), datamodule=datamodule, verbose=False)[0]


@torch.no_grad()
def hand_scores(
    module: L.LightningModule, datamodule: L.LightningDataModule
) -> tuple[float, float]:
    """Mean loss and (pixel) accuracy over the validation set, from the model in eval mode."""
    model = module.model.eval()
    loss_sum, correct, counted = 0.0, 0, 0
    for batch in datamodule.val_dataloader():
        x, y = module.on_after_batch_transfer(batch, 0)  # uint8 images normalised
        logits = model(x)
        loss_sum += F.cross_entropy(logits, y, ignore_index=IGNORE_INDEX).item() * len(x)
        valid = y != IGNORE_INDEX
        correct += (logits.argmax(1) == y)[valid].sum().item()
        counted += valid.sum().item()
    return loss_sum / len(datamodule.val_dataloader().dataset), correct / counted


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIGS / group).glob("*.yaml") if not p.stem.startswith("_"))


def family_backbones() -> list[str]:
    """The backbone options that are family aliases (resnet, vgg, ...): one per family; every
    registered name is composed and built in test_backbone_configs.py."""
    files = {b: OmegaConf.load(CONFIGS / "backbone" / f"{b}.yaml") for b in options("backbone")}
    return [b for b, cfg in files.items() if "name" not in cfg]


def heads(*tasks: str) -> list[str]:
    """The head configs of these tasks."""
    return [
        h for h in options("head") if OmegaConf.load(CONFIGS / "head" / f"{h}.yaml").task in tasks
    ]


# Detection heads are built and run in test_detection_training.py.
@pytest.mark.parametrize("head", heads("classification", "segmentation"))
@pytest.mark.parametrize("backbone", family_backbones())
def test_every_backbone_and_head_config_builds(backbone: str, head: str, tmp_path: Path) -> None:
    cfg = config(tmp_path, f"backbone={backbone}", f"head={head}")
    datamodule = build_datamodule(cfg)
    with torch.device("meta"):  # wiring and shapes only: no weight init cost
        model = build_model(cfg, datamodule.num_classes)
    x = torch.empty(2, 3, 64, 64, device="meta")
    out = model(x)
    if cfg.head.task == "classification":
        assert out.shape == (2, datamodule.num_classes)
    else:
        assert out.shape == (2, datamodule.num_classes, 64, 64)
    assert list(model.backbone.channels) == list(cfg.head.out_features)


def test_config_choices_are_documented_errors(tmp_path: Path) -> None:
    with pytest.raises(Exception, match="Could not find 'backbone/nope'"):
        config(tmp_path, "backbone=nope")
    cfg = config(tmp_path)
    with open_dict(cfg):
        cfg.head.task = "depth"
    with pytest.raises(ValueError, match="unknown task 'depth'"):
        build_datamodule(cfg)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[DictConfig, dict]:
    """Two epochs of resnet18 classification on tiny shapes, from an untrained baseline."""
    tmp_path = tmp_path_factory.mktemp("trained")
    cfg = config(tmp_path, *TINY, *LEARNABLE, "trainer.max_epochs=2", "test_after_fit=true")
    return cfg, train(cfg)


def test_training_run_writes_its_artifacts(trained: tuple[DictConfig, dict]) -> None:
    _, result = trained
    run = Path(result.output_dir)
    for name in ("config.yaml", "metrics.csv", "metrics.png", "checkpoints/last.ckpt"):
        assert (run / name).is_file(), name
    assert Path(result.best_model_path) == run / "checkpoints" / "best.ckpt"
    assert {"val/acc", "val/f1", "test/acc", "test/f1"} <= set(result.metrics)
    assert not list(run.rglob("*.tmp")), "temporary files left behind"
    last = load_checkpoint(run / "checkpoints" / "last.ckpt")
    assert (last["global_step"], last["epoch"]) == (32, 1)  # refreshed every epoch
    history = last["callbacks"]["MetricsPlot"]["history"]
    for key in ("train/loss", "val/loss", "val/acc"):
        assert [epoch for epoch, _ in history[key]] == [0, 1], key
    # The model learns: the second epoch's mean training loss is below the first's.
    (_, first), (_, second) = history["train/loss"]
    assert second < first


def test_the_seed_determines_the_run(tmp_path: Path) -> None:
    """The same seed ends on the same weights and metrics, another seed elsewhere: the seed is
    what decides (initial weights, data order, augmentations, dropout), not a constant of the
    code nor the generators' state before the run."""
    overrides = [
        *TINY,
        "data.num_train=32",
        "data.num_val=16",
        "data.batch_size=16",  # 2 steps an epoch
        "data.augment=true",
        "head.model.dropout=0.5",
        "trainer.max_epochs=2",
    ]
    ends = {}
    for run, seed in (("first", 42), ("again", 42), ("other", 7)):
        torch.manual_seed(len(ends))  # the process's generators differ before every run
        result = train(config(tmp_path, *overrides, f"seed={seed}", run=run))
        last = load_checkpoint(Path(result.output_dir) / "checkpoints" / "last.ckpt")
        ends[run] = result.metrics, last["state_dict"]
    assert ends["again"][0] == ends["first"][0]
    torch.testing.assert_close(ends["again"][1], ends["first"][1], rtol=0, atol=0)
    assert ends["other"][0]["val/loss"] != ends["first"][0]["val/loss"]
    weights = "model.backbone.stem.conv.weight"
    assert not torch.equal(ends["other"][1][weights], ends["first"][1][weights])


def test_checkpoint_loads_safely_and_eval_reproduces_it(
    trained: tuple[DictConfig, dict], tmp_path: Path
) -> None:
    _, result = trained
    checkpoint = torch.load(result.best_model_path, map_location="cpu", weights_only=True)
    assert checkpoint["hyper_parameters"]["config"]["backbone"]["name"] == "resnet18"
    eval_cfg = config(
        tmp_path, f"ckpt_path={result.best_model_path}", "trainer.accelerator=cpu", name="eval"
    )
    scores = evaluate(eval_cfg).metrics
    # The reference: a hand loop over the checkpoint's weights, not Lightning nor torchmetrics.
    stored = OmegaConf.create(checkpoint["hyper_parameters"]["config"])
    datamodule = build_datamodule(stored)
    datamodule.setup("validate")
    module = build_module(stored, datamodule)
    module.load_state_dict(checkpoint["state_dict"])
    loss, accuracy = hand_scores(module, datamodule)
    assert scores["val/acc"] == pytest.approx(accuracy, abs=1e-6)
    assert scores["val/loss"] == pytest.approx(loss, rel=1e-5)
    assert result.best_score == pytest.approx(accuracy, abs=1e-6)


def test_checkpoint_of_an_older_version_evaluates(
    trained: tuple[DictConfig, dict], tmp_path: Path
) -> None:
    """A checkpoint whose stored config names the `_target_`s from before they moved (the
    package was `training` until issue 30)."""
    _, result = trained
    checkpoint = torch.load(result.best_model_path, map_location="cpu", weights_only=True)
    stored = checkpoint["hyper_parameters"]["config"]
    assert stored["data"]["_target_"] == "zootrain.data.shapes.ShapesDataModule"
    text = json.dumps(stored).replace('"zootrain.', '"training.')
    assert '"training.loggers.CSVLogger"' in text  # and the run's other targets
    stored = checkpoint["hyper_parameters"]["config"] = json.loads(text)
    stored["data"]["_target_"] = "training.data.ShapesDataModule"
    stored["head"]["model"]["_target_"] = "training.build.classifier"
    old = tmp_path / "old.ckpt"
    torch.save(checkpoint, old)
    eval_cfg = config(tmp_path, f"ckpt_path={old}", "trainer.accelerator=cpu", name="eval")
    scores = evaluate(eval_cfg).metrics
    assert scores["val/acc"] == pytest.approx(result.best_score, abs=1e-6)


@pytest.mark.parametrize("old, new", MOVED_TARGETS.items(), ids=list(MOVED_TARGETS))
def test_moved_targets_name_what_exists_now(old: str, new: str) -> None:
    assert callable(get_object(new))
    with pytest.raises(ImportError):
        get_object(old)


def test_load_checkpoint_updates_moved_targets_anywhere_in_the_config(tmp_path: Path) -> None:
    stored = {
        "data": {"_target_": "training.datasets.VOCSegmentationDataModule", "root": "voc"},
        "head": {"model": {"_target_": "training.build.classifier", "_partial_": True}},
        "optim": {"_target_": "torch.optim.AdamW", "lr": 0.001},
        "callbacks": {"bar": {"_target_": "training.callbacks.ProgressBar"}},
        "extra": [{"_target_": "training.data.ShapesDataModule"}, "training.build.classifier"],
    }
    path = tmp_path / "old.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"config": stored}}, path)
    assert load_checkpoint(path)["hyper_parameters"]["config"] == {
        "data": {"_target_": "zootrain.data.voc.VOCSegmentationDataModule", "root": "voc"},
        "head": {"model": {"_target_": "heads.build_classifier", "_partial_": True}},
        "optim": {"_target_": "torch.optim.AdamW", "lr": 0.001},
        "callbacks": {"bar": {"_target_": "zootrain.callbacks.ProgressBar"}},
        "extra": [
            {"_target_": "zootrain.data.shapes.ShapesDataModule"},
            "training.build.classifier",
        ],
    }


def test_exported_backbone_loads_with_create(trained: tuple[DictConfig, dict]) -> None:
    _, result = trained
    backbone = create("resnet18", pretrained=result.backbone_weights, out_features=("C5",))
    state = load_checkpoint(result.best_model_path)["state_dict"]
    for key, value in backbone.state_dict().items():
        assert torch.equal(value, state[f"model.backbone.{key}"]), key


def test_two_epochs_improve_the_metric_over_the_untrained_model(tmp_path: Path) -> None:
    """Segmentation: per-pixel labels move val/miou within 32 tiny steps (val/acc needs more)."""
    cfg = config(tmp_path, *TINY, *LEARNABLE, "head=fpn", "trainer.max_epochs=2")
    untrained = untrained_scores(cfg)
    trained = train(cfg).metrics
    assert trained["val/miou"] > untrained["val/miou"] + 0.1, (untrained, trained)
    assert trained["val/pixel_acc"] > untrained["val/pixel_acc"] + 0.2, (untrained, trained)


def test_early_stopping_ends_a_run_whose_metric_stalls(tmp_path: Path) -> None:
    """lr 0: val/acc never improves after epoch 0, so patience 1 stops the run after epoch 1."""
    cfg = config(
        tmp_path,
        *TINY,
        "callbacks=early_stopping",
        "callbacks.early_stopping.patience=1",
        "callbacks.progress_bar=null",
        "optim.lr=0",
        "scheduler=none",
        "trainer.max_epochs=5",
    )
    result = train(cfg)
    last = load_checkpoint(Path(result.output_dir) / "checkpoints/last.ckpt")
    assert (last["epoch"], last["global_step"]) == (1, 2 * 128 // 32)  # 2 of 5 epochs ran
    stopper = [k for k in last["callbacks"] if k.startswith("EarlyStopping")]
    assert stopper and last["callbacks"][stopper[0]]["stopped_epoch"] == 1


@pytest.mark.parametrize(
    "overrides",
    [
        ("head=fpn",),
        ("head=fpn", "backbone=mobilenetv3", "channels_last=true"),
        ("head=classification", "head.out_features=[C3,C4,C5]", "head.model.pool=catavgmax"),
    ],
    ids=["segmentation", "segmentation-channels_last", "multiscale"],
)
def test_fast_dev_run(overrides: tuple[str, ...], tmp_path: Path) -> None:
    cfg = config(tmp_path, *TINY, *overrides, "trainer.fast_dev_run=true")
    result = train(cfg)
    assert result.metrics, "no metric was logged"
    assert all(math.isfinite(v) for v in result.metrics.values())


@pytest.mark.slow
def test_compile_trains_end_to_end(tmp_path: Path) -> None:
    cfg = config(tmp_path, *TINY, "compile=true", "trainer.max_epochs=1")
    result = train(cfg)
    assert all(math.isfinite(v) for v in result.metrics.values())
    assert result.compile_warmup_seconds >= 0  # reported (the first step compiled)
    # Compiled in place: the checkpoint keys are the plain model's (no `_orig_mod.`).
    keys = load_checkpoint(result.best_model_path)["state_dict"].keys()
    assert set(keys) == set(build_module(cfg, build_datamodule(cfg)).state_dict())


def _all_finite(checkpoint: dict) -> bool:
    return all(
        torch.isfinite(v).all() for v in checkpoint["state_dict"].values() if v.is_floating_point()
    )


# Every step, or every 3 steps: a later check still names the first non-finite step.
@pytest.mark.parametrize("every", [1, 3])
def test_non_finite_loss_stops_with_the_step(
    every: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = {"n": 0}
    loss = Classification.loss

    def poisoned(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        calls["n"] += 1
        value = loss(self, output, target)
        return value * float("nan") if calls["n"] > 6 else value  # 4 train + 2 val batches

    monkeypatch.setattr(Classification, "loss", poisoned)
    cfg = config(tmp_path, *TINY, "trainer.max_epochs=3", f"trainer.log_every_n_steps={every}")
    with pytest.raises(
        NonFiniteLossError,
        match=r"became nan at step 4 \(epoch 1, batch 0\); .*last good checkpoint is .*last.ckpt",
    ):
        train(cfg)
    last = load_checkpoint(Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt")
    assert last["global_step"] == 4
    assert _all_finite(last)


class PoisonWeights(L.Callback):
    """After optimiser step `step`, a NaN weight: what a diverging update leaves behind."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, *args) -> None:
        if trainer.global_step == self.step:
            with torch.no_grad():
                next(module.parameters())[0] = float("nan")


def test_non_finite_weights_are_never_saved_or_called_good(tmp_path: Path) -> None:
    # Steps 1-4 are epoch 0, 5-8 epoch 1; the checks run at steps 3 and 6 and before each
    # validation. The weights break at the last step of epoch 1, after the step-6 check.
    cfg = config(tmp_path, *TINY, "trainer.max_epochs=3", "trainer.log_every_n_steps=3")
    first = next(iter(build_module(cfg, build_datamodule(cfg)).named_parameters()))[0]
    with pytest.raises(
        NonFiniteLossError,
        match=rf"weights are no longer finite at step 8 \(finite at step 6\): {first}; .*"
        r"the last good checkpoint is .*last.ckpt",
    ):
        train(cfg, extra_callbacks=[PoisonWeights(step=8)])
    checkpoints = Path(cfg.paths.output_dir) / "checkpoints"
    for name in ("last.ckpt", "best.ckpt"):  # both from epoch 0: epoch 1 was never saved
        checkpoint = load_checkpoint(checkpoints / name)
        assert checkpoint["global_step"] == 4 and _all_finite(checkpoint), name


def test_no_checkpoint_is_written_with_non_finite_weights(tmp_path: Path) -> None:
    cfg = config(tmp_path, *TINY)
    module = build_module(cfg, build_datamodule(cfg))
    with torch.no_grad():
        module.model.backbone.stem.norm.running_var[3] = float("inf")  # buffers count too
    with pytest.raises(NonFiniteLossError, match=r"no longer finite .*: model\.backbone\.stem"):
        module.on_save_checkpoint({})


def test_bad_checkpoints(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.ckpt")
    truncated = tmp_path / "bad.ckpt"
    truncated.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="not a PyTorch checkpoint"):
        load_checkpoint(truncated)
    foreign = tmp_path / "weights.ckpt"
    torch.save({"state_dict": {}}, foreign)
    with pytest.raises(CheckpointError, match="no stored run config"):
        load_checkpoint(foreign)
    cfg = config(tmp_path, *TINY, "ckpt_path=last")
    with pytest.raises(CheckpointError, match="no run of 'resnet18-classification' to resume"):
        train(cfg)


def _one_step(cfg: DictConfig) -> tuple[dict, dict, list[dict]]:
    """Parameter groups and the state dict before and after one optimiser step."""
    datamodule = build_datamodule(cfg)
    module = build_module(cfg, datamodule)
    optimizer = module.configure_optimizers()["optimizer"]
    before = {k: v.clone() for k, v in module.state_dict().items()}
    module.train()
    x, y = module.on_after_batch_transfer(next(iter(datamodule.train_dataloader())), 0)
    module.task.loss(module(x), y).backward()
    optimizer.step()
    return before, module.state_dict(), optimizer.param_groups


def test_backbone_lr_multiplier(tmp_path: Path) -> None:
    cfg = config(tmp_path, *TINY, "scheduler=none", "backbone_lr_mult=0.1", "optim.lr=0.01")
    _, _, groups = _one_step(cfg)
    lrs = sorted({round(g["lr"], 9) for g in groups})
    assert lrs == [0.001, 0.01]
    assert {g["weight_decay"] for g in groups} == {0.0, cfg.optim.weight_decay}


def test_linear_probe_trains_only_the_head(tmp_path: Path) -> None:
    cfg = config(tmp_path, *TINY, "linear_probe=true", "scheduler=none")
    before, after, _ = _one_step(cfg)
    backbone = [k for k in before if k.startswith("model.backbone.")]
    assert backbone and all(torch.equal(before[k], after[k]) for k in backbone)  # BN stats too
    assert not torch.equal(before["model.head.fc.weight"], after["model.head.fc.weight"])


def test_bn_momentum_overrides_every_batchnorm(tmp_path: Path) -> None:
    def momenta(*overrides: str) -> set[float]:
        cfg = config(tmp_path, "backbone=mobilenetv3", "head=fpn", *overrides)
        with torch.device("meta"):
            model = build_model(cfg, num_classes=7)
        return {m.momentum for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)}

    assert momenta() == {0.1}  # the training default
    assert momenta("bn_momentum=null") == {0.01}  # MobileNetV3's own
    with pytest.raises(
        ConfigError, match=r"bn_momentum=0 cannot work: .* a number in \(0, 1\] or null"
    ):
        check_config(config(tmp_path, "bn_momentum=0"))

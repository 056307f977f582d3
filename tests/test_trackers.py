"""zootrain/trackers.py: logger=mlflow and logger=wandb record a run, and a resume continues it.

Read back with each tracker's own means: MLflow's `MlflowClient` on the local SQLite store; W&B's
offline transaction log (`<run dir>/wandb/offline-run-*/run-<id>.wandb`), whose records are
W&B's own protobuf messages. wandb >= 0.2x (its Go core) writes no `files/config.yaml` or
`files/wandb-summary.json` for an offline run: the log is what `wandb sync` uploads.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from hydra.errors import InstantiationException
from hydra.utils import instantiate

from zootrain.checks import check_config
from zootrain.errors import ConfigError
from zootrain.report import user_message
from zootrain.run import train
from zootrain.runs import TRACKERS

from .test_training import ROOT, TINY, config

BOTH = [*TINY, "logger=[mlflow,wandb]", "scheduler=none", "export_backbone=true"]
BOTH += ["data.num_train=64", "data.num_val=32"]  # 2 steps an epoch


@pytest.fixture()
def offline_wandb(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No W&B login, nothing written outside `tmp_path`."""
    for variable in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_PROJECT", "MLFLOW_TRACKING_URI"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    for variable, folder in (
        ("WANDB_DATA_DIR", "data"),
        ("WANDB_CACHE_DIR", "cache"),
        ("WANDB_CONFIG_DIR", "config"),
    ):
        monkeypatch.setenv(variable, str(tmp_path / "wandb-home" / folder))
    monkeypatch.setenv("WANDB_SILENT", "true")


def wandb_records(path: Path) -> list[Any]:
    """The records of a W&B transaction log: protobuf `Record`s in LevelDB's log format (a
    7-byte file header, then 32 KiB blocks of chunks, each behind a 7-byte header: CRC, length,
    type 1 full / 2 first / 3 middle / 4 last; a block's last < 7 bytes are padding)."""
    from wandb.proto.wandb_internal_pb2 import Record

    data = path.read_bytes()
    assert data[:4] == b":W&B", path
    records, parts, position, block = [], b"", 7, 32 * 1024
    while position + 7 <= len(data):
        if block - position % block < 7:
            position += block - position % block
            continue
        _, length, kind = struct.unpack("<IHB", data[position : position + 7])
        parts += data[position + 7 : position + 7 + length]
        position += 7 + length
        if kind in (1, 4):
            record = Record()
            record.ParseFromString(parts)
            records.append(record)
            parts = b""
    return records


def items(records: list[Any], kind: str) -> dict[tuple[str, ...], Any]:
    """The (last) value of every key of the `kind` records ("config", "summary", "history")."""
    values = {}
    for record in records:
        if record.WhichOneof("record_type") != kind:
            continue
        message = getattr(record, kind)
        for item in message.item if kind == "history" else message.update:
            key = tuple(item.nested_key) or (item.key,)
            values[key] = json.loads(item.value_json)
    return values


@pytest.mark.slow
def test_both_trackers_record_a_run_and_its_resume(tmp_path: Path, offline_wandb: None) -> None:
    """1 epoch, then resumed to 2 in its directory: one MLflow run and one W&B run hold both
    epochs, the config, the final metrics, the exported backbone and the pictures."""
    first = train(config(tmp_path, *BOTH, "trainer.max_epochs=1"))
    run = Path(first.output_dir)
    ids = json.loads((run / TRACKERS).read_text())
    resumed = config(tmp_path, *BOTH, "trainer.max_epochs=2", f"ckpt_path={run}")
    result = train(resumed)
    assert json.loads((run / TRACKERS).read_text()) == ids  # the same tracker runs

    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path}/outputs/mlflow.db")
    experiment = client.get_experiment_by_name("resnet18-classification")
    (found,) = client.search_runs([experiment.experiment_id])  # one run, resumed
    assert found.info.run_id == ids["mlflow"]["run_id"]
    assert found.info.status == "FINISHED"
    params = found.data.params
    assert (params["config/backbone/name"], params["config/optim/lr"]) == ("resnet18", "0.002")
    assert params["config/data/image_size"] == "32" and params["task"] == "classification"
    epochs = client.get_metric_history(found.info.run_id, "epoch")
    assert {m.value for m in epochs} == {0, 1} and max(m.step for m in epochs) == 3
    val_acc = client.get_metric_history(found.info.run_id, "val/acc")
    assert len(val_acc) == 2  # epoch 0 (first fit) and 1 (resumed)
    steps = client.get_metric_history(found.info.run_id, "train/loss_step")
    assert [m.step for m in steps] == [0, 1, 2, 3]  # every step, of both fits
    metrics = found.data.metrics
    assert metrics["best/val/acc"] == pytest.approx(result.best_score)
    assert metrics["final/val/acc"] == pytest.approx(result.metrics["val/acc"])
    assert metrics["best_epoch"] == result.best_epoch
    artifacts = {a.path for a in client.list_artifacts(found.info.run_id)}
    assert "metrics.png" in artifacts and "checkpoints" in artifacts
    (weights,) = client.list_artifacts(found.info.run_id, "checkpoints")
    assert weights.path == "checkpoints/backbone.safetensors"
    assert weights.file_size == Path(result.backbone_weights).stat().st_size

    wandb_id = ids["wandb"]["id"]
    logs = sorted(run.glob(f"wandb/offline-run-*-{wandb_id}/run-{wandb_id}.wandb"))
    assert len(logs) == 2  # the first fit and the resumed one, under the same run id
    first_log, resumed_log = (wandb_records(log) for log in logs)
    (head,) = [r.run for r in first_log if r.WhichOneof("record_type") == "run"][:1]
    assert (head.project, head.run_group) == ("backbone-zoo", "resnet18-classification")
    saved = items(first_log, "config")
    assert saved[("config",)]["backbone"]["name"] == "resnet18"
    epochs = [
        items([r], "history").get(("epoch",))
        for r in first_log + resumed_log
        if r.WhichOneof("record_type") == "history"
    ]
    assert {0, 1} <= set(epochs)
    summary = items(resumed_log, "summary")
    assert summary[("best/val/acc",)] == pytest.approx(result.best_score)
    assert summary[("final/val/acc",)] == pytest.approx(result.metrics["val/acc"])
    assert summary[("pictures/metrics", "_type")] == "image-file"
    (artifact,) = [r.artifact for r in resumed_log if r.WhichOneof("record_type") == "artifact"]
    assert (artifact.name, artifact.type) == (f"backbone-{wandb_id}", "model")
    assert [entry.path for entry in artifact.manifest.contents] == [
        "checkpoints/backbone.safetensors"
    ]


@pytest.mark.parametrize(("option", "package"), [("mlflow", "mlflow"), ("wandb", "wandb")])
def test_a_tracker_without_its_package_names_the_extra(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, option: str, package: str
) -> None:
    """At start-up (train.py's checks, before torch is imported), and where the logger is built."""
    monkeypatch.setitem(sys.modules, package, None)  # `import <package>` raises ImportError
    cfg = config(tmp_path, f"logger={option}")
    expected = (
        f"logger={option} needs the {package} package, which is not installed: "
        f"pip install 'backbone-zoo[{option}]'"
    )
    with pytest.raises(ConfigError) as early:
        check_config(cfg)
    assert str(early.value) == expected
    with pytest.raises(InstantiationException) as error:
        instantiate(cfg.logger[option])
    assert user_message(error.value) == f"logger.{option}: {expected}"


def test_the_command_says_it_in_one_line(tmp_path: Path) -> None:
    """`python train.py logger=mlflow` without MLflow: one line, the extra's brackets intact."""
    code = (
        "import runpy, sys\n"
        "sys.modules['mlflow'] = None\n"
        f"sys.argv = ['train.py', 'logger=mlflow', 'paths.outputs={tmp_path}']\n"
        f"runpy.run_path({str(ROOT / 'train.py')!r}, run_name='__main__')\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert done.returncode == 1
    assert done.stderr == (
        "error: logger=mlflow needs the mlflow package, which is not installed: "
        "pip install 'backbone-zoo[mlflow]'\n"
    )

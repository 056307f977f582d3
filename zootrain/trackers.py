"""Experiment trackers, `logger=mlflow` and `logger=wandb`: one tracker run per run directory.

Lightning's `MLFlowLogger` and `WandbLogger` log the step and epoch metrics and the module's
hyperparameters (the resolved run config). The subclasses here add what a run of train.py needs:

- The tracker run belongs to the run directory, as everything else of the run does: its id is
  kept in `<run dir>/trackers.json`, and a fit in that directory again (`ckpt_path=<run dir>`,
  a requeued SLURM job) continues that tracker run instead of starting another.
- The jobs of a sweep are grouped: MLflow's experiment and W&B's group are the sweep's name
  (`${sweep_name:...}` in configs/logger/), single runs are grouped by `run_name`.
- `log_run_end` (train() calls it last): the final metrics, the best checkpoint's backbone
  (`checkpoints/backbone.safetensors`) and the pictures (`<run dir>/*.png`), then the tracker
  run is closed.

Both packages are optional extras: without one, its logger fails at start-up in one line that
names the extra to install. `trackers.json` holds ids, which are only ever used as ids.
"""

from __future__ import annotations

import importlib
import json
import logging
import netrc
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

from lightning.fabric.utilities.logger import _convert_params, _flatten_dict
from lightning.pytorch.loggers import Logger
from lightning.pytorch.loggers import mlflow as mlflow_logs
from lightning.pytorch.loggers import wandb as wandb_logs
from lightning.pytorch.loggers.logger import rank_zero_experiment
from lightning.pytorch.utilities import rank_zero_only

from backbones.files import atomic_path

from .checks import missing_tracker
from .cli import sweep_name
from .errors import ConfigError
from .result import RunResult
from .runs import CHECKPOINTS, SQLITE, TRACKERS, sqlite_store

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from wandb.wandb_run import Run

log = logging.getLogger(__name__)


def log_run_end(loggers: Sequence[Logger], result: RunResult, run_dir: str | Path) -> None:
    """Give each tracker among `loggers` the end of the run: the final metrics, the exported
    backbone and the pictures, and close its run. Rank 0 only."""
    if rank_zero_only.rank != 0:
        return
    for logger in loggers:
        if isinstance(logger, MLFlowLogger | WandbLogger):
            logger.log_run_end(result, Path(run_dir))


def final_metrics(result: RunResult) -> dict[str, float]:
    """The run's last metrics (`final/<name>`: validation after fit, test), its best score
    (`best/<monitor>`) and epoch, its training time and speed."""
    metrics = {f"final/{name}": value for name, value in result.metrics.items()}
    if result.best_score is not None:
        metrics[f"best/{result.monitor}"] = result.best_score
    if result.best_epoch is not None:
        metrics["best_epoch"] = result.best_epoch
    for key in ("fit_seconds", "train_images_per_second"):
        if getattr(result, key) is not None:
            metrics[key] = getattr(result, key)
    return {name: float(value) for name, value in metrics.items()}


def run_files(result: RunResult, run_dir: Path) -> list[tuple[Path, str | None]]:
    """(file, folder among the artifacts) of what a tracker keeps of the run: the exported
    backbone (in `checkpoints/`, as in the run directory) and the pictures."""
    files: list[tuple[Path, str | None]] = []
    if result.backbone_weights:
        files.append((Path(result.backbone_weights), CHECKPOINTS))
    files += [(picture, None) for picture in sorted(run_dir.glob("*.png"))]
    return files


def require(package: str, extra: str) -> None:
    """A tracker's package, or one line naming the extra that installs it (train.py says so
    before anything is built: `zootrain.checks.check_trackers`)."""
    try:
        importlib.import_module(package)
    except ImportError:
        raise ConfigError(missing_tracker(package, extra)) from None


def recall(run_dir: Path, tracker: str) -> dict[str, Any] | None:
    """What `remember` kept of the run directory's `tracker` run, or None."""
    try:
        entry = _known(run_dir).get(tracker)
    except ValueError as error:
        log.warning("%s: a new %s run starts", error, tracker)
        return None
    return entry if isinstance(entry, dict) else None


def remember(run_dir: Path, tracker: str, identity: dict[str, Any]) -> None:
    """Keep `identity` (ids, where the run lives) of the run directory's `tracker` run."""
    path = run_dir / TRACKERS
    try:
        known = _known(run_dir)
    except ValueError:  # written anew
        known = {}
    known[tracker] = identity
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(known, indent=1) + "\n")


def _known(run_dir: Path) -> dict[str, Any]:
    """The run directory's trackers.json ({} when there is none); a ValueError names a file
    that cannot be read as a mapping."""
    path = run_dir / TRACKERS
    if not path.is_file():
        return {}
    try:
        known = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise ValueError(f"{path} is unreadable ({error})") from None
    if not isinstance(known, dict):
        raise ValueError(f"{path} holds no mapping of trackers")
    return known


def display_name(run_dir: Path) -> str:
    """A run's name in a tracker: `<job>-<run_name>` in a sweep, else `<run_name>/<time>`."""
    if sweep_name("") != "":
        return run_dir.name
    return f"{run_dir.parent.name}/{run_dir.name}"


class MLFlowLogger(mlflow_logs.MLFlowLogger):
    """Lightning's `MLFlowLogger`, continuing its run directory's MLflow run.

    Args:
        run_dir: the run directory (its `trackers.json` keeps the MLflow run's id).
        experiment_name: where new runs go (configs/logger/mlflow.yaml: the sweep's name).
        tracking_uri: any MLflow tracking URI; a relative SQLite path is made absolute.
        artifact_location: where a new experiment keeps its artifacts; None with a SQLite store
            means `mlflow-artifacts/` beside its database, else the server's choice.
        run_name: the run's name in MLflow; None: `display_name`.
    """

    def __init__(
        self,
        run_dir: str | Path,
        experiment_name: str,
        tracking_uri: str,
        artifact_location: str | None = None,
        run_name: str | None = None,
        tags: dict[str, Any] | None = None,
    ) -> None:
        require("mlflow", "mlflow")
        self.run_dir = Path(run_dir)
        tracking_uri = sqlite_store(tracking_uri)
        if artifact_location is None and tracking_uri.startswith(SQLITE):
            database = Path(tracking_uri.removeprefix(SQLITE))
            artifact_location = (database.parent / "mlflow-artifacts").as_uri()
        stored = recall(self.run_dir, "mlflow")
        # The same store only: a run resumed against another store starts a run there.
        self.resumed = stored is not None and stored.get("tracking_uri") == tracking_uri
        super().__init__(
            experiment_name=experiment_name,
            run_name=run_name or display_name(self.run_dir),
            tracking_uri=tracking_uri,
            tags={"run_dir": str(self.run_dir), **(tags or {})},
            artifact_location=artifact_location,
            run_id=stored["run_id"] if self.resumed and stored else None,
        )

    @property
    @rank_zero_experiment
    def experiment(self) -> MlflowClient:
        new = not self._initialized
        client = super().experiment
        if new:
            if self.resumed:  # a killed run was left RUNNING, a stopped one FAILED
                client.update_run(self._run_id, status="RUNNING")
            identity = {"run_id": self._run_id, "experiment_id": self._experiment_id}
            remember(self.run_dir, "mlflow", {**identity, "tracking_uri": self._tracking_uri})
        return client

    @rank_zero_only
    def log_hyperparams(self, params: Any) -> None:
        if self.resumed:  # MLflow keeps a run's params as first logged: add the new ones only
            logged = self.experiment.get_run(self.run_id).data.params
            flat = _flatten_dict(_convert_params(params))
            params = {key: value for key, value in flat.items() if key not in logged}
        super().log_hyperparams(params)

    def log_run_end(self, result: RunResult, run_dir: Path) -> None:
        from mlflow.entities import Metric

        client, run_id = self.experiment, self.run_id
        now = int(time.time() * 1000)
        metrics = [Metric(k, v, now, 0) for k, v in final_metrics(result).items()]
        client.log_batch(run_id, metrics=metrics)
        for path, folder in run_files(result, run_dir):
            client.log_artifact(run_id, str(path), artifact_path=folder)
        client.set_terminated(run_id, "FINISHED")


def wandb_mode(mode: str | None) -> str | None:
    """`mode` if given (or $WANDB_MODE, which W&B reads itself); else online when logged in
    (`wandb login` writes ~/.netrc, or WANDB_API_KEY is set), offline otherwise."""
    if mode is not None or os.environ.get("WANDB_MODE"):
        return mode
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    try:
        logged_in = netrc.netrc(os.environ.get("NETRC")).authenticators(host or "") is not None
    except (OSError, netrc.NetrcParseError):
        logged_in = False
    return "online" if logged_in else "offline"


class WandbLogger(wandb_logs.WandbLogger):
    """Lightning's `WandbLogger`, continuing its run directory's W&B run.

    Args:
        run_dir: the run directory: W&B writes `<run dir>/wandb/`, `trackers.json` keeps its id.
        project: the W&B project.
        group: the run's group (configs/logger/wandb.yaml: the sweep's name).
        mode: "online", "offline" or "disabled"; None: `wandb_mode`.
        name: the run's name in W&B; None: `display_name`.
        entity: the W&B team or user; None: W&B's default.
    """

    def __init__(
        self,
        run_dir: str | Path,
        project: str,
        group: str,
        mode: str | None = None,
        name: str | None = None,
        entity: str | None = None,
        tags: list[str] | None = None,
    ) -> None:
        require("wandb", "wandb")
        self.run_dir = Path(run_dir)
        stored = recall(self.run_dir, "wandb")
        self.resumed = stored is not None and stored.get("project") == project
        super().__init__(
            name=name or display_name(self.run_dir),
            save_dir=str(self.run_dir),
            id=stored["id"] if self.resumed and stored else None,  # resume="allow" (Lightning's)
            project=project,
            group=group,
            mode=wandb_mode(mode),
            entity=entity,
            tags=tags,
            job_type="train",
        )
        # Lightning passes W&B `anonymous=None` always, which W&B warns has no effect.
        self._wandb_init.pop("anonymous", None)

    @property
    @rank_zero_experiment
    def experiment(self) -> Run:
        new = self._experiment is None
        run = super().experiment
        if new:
            remember(self.run_dir, "wandb", {"id": run.id, "project": run.project})
        return run

    def finalize(self, status: str) -> None:
        super().finalize(status)
        if status != "success" and self._experiment is not None:
            # The run ends here, failed; in a sweep's process the next job starts its own run
            # (Lightning's logger would otherwise attach to this one, still open).
            self._experiment.finish(exit_code=1)

    def log_run_end(self, result: RunResult, run_dir: Path) -> None:
        import wandb

        run = self.experiment
        run.summary.update(final_metrics(result))
        files = run_files(result, run_dir)
        weights = [path for path, folder in files if folder is not None]
        if weights:
            artifact = wandb.Artifact(f"backbone-{run.id}", type="model")
            for path in weights:
                artifact.add_file(str(path), name=f"{CHECKPOINTS}/{path.name}")
            run.log_artifact(artifact, aliases=["best"])
        pictures = {f"pictures/{path.stem}": wandb.Image(str(path)) for path, f in files if not f}
        if pictures:
            run.log(pictures)
        run.finish()

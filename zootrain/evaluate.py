"""Score a checkpoint: rebuild its model and data from the run config stored in it.

The validation split reproduces the metric the checkpoint was selected by. Nothing in the
stored config is built unless it names one of the allow-listed targets
(`zootrain.runs.ALLOWED_TARGETS`).
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from .build import build_datamodule, build_module
from .checkpoints import load_checkpoint
from .checks import check_eval_config, check_finite_weights, writable_dir
from .plots import run_title
from .predictions import write_pictures
from .report import quiet_lightning, route_lightning_logs
from .result import RunResult
from .runs import check_fits, eval_pictures_dir, find_best


def evaluate(cfg: DictConfig) -> RunResult:
    """Rebuild the checkpoint's model and data, run the chosen split, return its metrics."""
    check_eval_config(cfg)
    path = Path(cfg.ckpt_path)
    if path.is_dir():  # a run directory, as train.py's ckpt_path takes
        path = find_best(path)
    directory = Path(cfg.output_dir or eval_pictures_dir(path, cfg.split))
    if cfg.pictures:  # before the metrics are computed: they would be lost with the pictures
        writable_dir(directory, "output_dir")
    route_lightning_logs()  # under Hydra: into <run dir>/eval.log too
    quiet_lightning()
    checkpoint = load_checkpoint(path)
    check_finite_weights(checkpoint["state_dict"], path)
    run_cfg = OmegaConf.create(checkpoint["hyper_parameters"]["config"])
    run_cfg.backbone.pretrained = None  # the checkpoint holds every weight
    if cfg.batch_size is not None:
        run_cfg.data.batch_size = cfg.batch_size
    datamodule = build_datamodule(run_cfg)
    module = build_module(run_cfg, datamodule)
    check_fits(checkpoint, path, module)  # e.g. a state dict of another task's head
    module.load_state_dict(checkpoint["state_dict"])
    trainer: L.Trainer = instantiate(cfg.trainer, logger=False, callbacks=[], max_epochs=1)
    run = trainer.validate if cfg.split == "val" else trainer.test
    scores = run(module, datamodule=datamodule, verbose=False)[0]
    result = RunResult(
        metrics={k: float(v) for k, v in scores.items()},
        monitor=module.task.monitor,
        mode=module.task.mode,
        best_model_path=str(path),
    )
    if cfg.pictures:
        title = f"{run_title(run_cfg)}\n{Path(*path.parts[-3:])}"  # run/dir/file
        written = write_pictures(trainer, module, datamodule, directory, title, cfg.split)
        result.pictures = [str(p) for p in written]
    return result

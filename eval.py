"""Score a checkpoint: `python eval.py ckpt_path=<run dir or .ckpt file> [split=test]`.

The model, data and task are rebuilt from the run config stored in the checkpoint, so the
validation split reproduces the metric the checkpoint was selected by. Nothing in that config
is built unless it names one of the project's allow-listed targets
(`zootrain.checkpoints.ALLOWED_TARGETS`).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import hydra
from omegaconf import DictConfig, OmegaConf

import zootrain.cli  # noqa: F401  (what composing the config needs; light, so --help is fast)

if TYPE_CHECKING:
    import lightning as L


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Rebuild the checkpoint's model and data, run the chosen split, return its metrics."""
    from hydra.utils import instantiate

    from zootrain.build import build_datamodule, build_module
    from zootrain.checkpoints import find_best, load_checkpoint
    from zootrain.errors import ConfigError
    from zootrain.plots import run_title
    from zootrain.predictions import eval_pictures_dir, write_pictures
    from zootrain.report import quiet_lightning, route_lightning_logs

    if OmegaConf.is_missing(cfg, "ckpt_path") or cfg.ckpt_path is None:
        raise ConfigError(
            "eval.py needs a checkpoint: ckpt_path=<run dir> (scores its checkpoints/best.ckpt) "
            "or ckpt_path=<file>.ckpt"
        )
    if cfg.split not in ("val", "test"):
        raise ConfigError(f"split must be val or test, got {cfg.split!r}")
    path = Path(cfg.ckpt_path)
    if path.is_dir():  # a run directory, as train.py's ckpt_path takes
        path = find_best(path)
    route_lightning_logs()  # under Hydra: into <run dir>/eval.log too
    quiet_lightning()
    checkpoint = load_checkpoint(path)
    run_cfg = OmegaConf.create(checkpoint["hyper_parameters"]["config"])
    run_cfg.backbone.pretrained = None  # the checkpoint holds every weight
    if cfg.batch_size is not None:
        run_cfg.data.batch_size = cfg.batch_size
    datamodule = build_datamodule(run_cfg)
    module = build_module(run_cfg, datamodule)
    module.load_state_dict(checkpoint["state_dict"])
    trainer: L.Trainer = instantiate(cfg.trainer, logger=False, callbacks=[], max_epochs=1)
    run = trainer.validate if cfg.split == "val" else trainer.test
    scores = run(module, datamodule=datamodule, verbose=False)[0]
    result = {
        "metrics": {k: float(v) for k, v in scores.items()},
        "monitor": module.task.monitor,
        "best_score": None,
        "best_model_path": str(path),
    }
    if cfg.pictures:
        directory = Path(cfg.output_dir or eval_pictures_dir(path, cfg.split))
        title = f"{run_title(run_cfg)}\n{Path(*path.parts[-3:])}"  # run/dir/file
        written = write_pictures(trainer, module, datamodule, directory, title, cfg.split)
        result["pictures"] = [str(p) for p in written]
    return result


@hydra.main(version_base="1.3", config_path="configs", config_name="eval")
def main(cfg: DictConfig) -> None:
    from zootrain.report import print_summary, user_errors

    with user_errors():
        print_summary(evaluate(cfg))


if __name__ == "__main__":
    main()

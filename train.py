"""Train a backbone + head: `python train.py backbone=mobilenetv3 head=fpn trainer.max_epochs=3`.

The run is `zootrain.run.train(cfg)`; this is its Hydra entry point. Configs live in `configs/`
(`python train.py --help` lists them).
"""

import hydra
from omegaconf import DictConfig

from zootrain.cli import train_command  # light: --help and tab completion wait for no torch


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
def main(cfg: DictConfig) -> float | None:
    return train_command(cfg)  # the best score: what Hydra's sweepers (Optuna) optimise


if __name__ == "__main__":
    main()

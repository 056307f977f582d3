"""Score a checkpoint: `python eval.py ckpt_path=<run dir or .ckpt file> [split=test]`.

The run is `zootrain.evaluate.evaluate(cfg)`; this is its Hydra entry point.
"""

import hydra
from omegaconf import DictConfig

from zootrain.cli import eval_command  # light: --help and tab completion wait for no torch


@hydra.main(version_base="1.3", config_path="configs", config_name="eval")
def main(cfg: DictConfig) -> None:
    eval_command(cfg)


if __name__ == "__main__":
    main()

"""Every data config against every head config; input statistics for every backbone."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra.utils import get_class

from backbones import IMAGENET_MEAN, IMAGENET_STD, input_normalization, list_backbones
from zootrain.build import build_datamodule
from zootrain.tasks import get_task

from .helpers import config, options


def test_every_backbone_has_input_normalization() -> None:
    for name in list_backbones():
        mean, std = input_normalization(name)
        assert len(mean) == len(std) == 3, name
        assert all(0 < v < 1 for v in (*mean, *std)), name
    assert input_normalization("resnet18") == (IMAGENET_MEAN, IMAGENET_STD)
    with pytest.raises(ValueError, match="unknown backbone 'resnet19'"):
        input_normalization("resnet19")


@pytest.mark.parametrize("data", options("data"))
def test_every_data_config_composes_with_its_heads(data: str, tmp_path: Path) -> None:
    """Each data config builds (without touching its root) for every head of a task it serves,
    and refuses the others by naming the tasks it serves."""
    heads = {head: config(tmp_path, f"data={data}", f"head={head}") for head in options("head")}
    targets = get_class(next(iter(heads.values())).data._target_).targets
    served = [head for head, cfg in heads.items() if get_task(cfg.head.task).target in targets]
    assert served, f"no head config serves {data}'s targets {targets}"  # every task has a head
    for head, cfg in heads.items():
        if head in served:
            datamodule = build_datamodule(cfg)
            assert datamodule.task is get_task(cfg.head.task)
            if hasattr(datamodule, "mean"):  # real data: the backbone's statistics
                assert (datamodule.mean, datamodule.std) == input_normalization("resnet18")
        else:
            with pytest.raises(Exception, match=r"serves the tasks"):
                build_datamodule(cfg)

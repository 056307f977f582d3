"""configs/backbone/: every registered name selectable as backbone=<name> and backbone.name=<name>."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf

from backbones import Backbone, get_entry, list_backbones
from backbones.layers import DropPath
from backbones.registry import family_arguments
from zootrain.build import build_model

ROOT = Path(__file__).resolve().parents[1]
BACKBONES = ROOT / "configs" / "backbone"
# Family aliases: backbone=<alias> is backbone=<name>; --help states each.
ALIASES = {
    "convnext": "convnext_tiny",
    "densenet": "densenet121",
    "efficientnet": "efficientnet_b0",
    "mobilenetv2": "mobilenet_v2",
    "mobilenetv3": "mobilenet_v3_large",
    "mobilenetv3_small": "mobilenet_v3_small",
    "resnet": "resnet50",
    "resnext50": "resnext50_32x4d",
    "vgg": "vgg16_bn",
    "wide_resnet50": "wide_resnet50_2",
}


def backbone_config(*overrides: str) -> DictConfig:
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        return compose("train", overrides=["head=classification", *overrides])


def test_config_files_and_registry_agree() -> None:
    """One file per registered name, holding that name; the rest are aliases of one."""
    files = {p.stem: OmegaConf.load(p) for p in BACKBONES.glob("*.yaml")}
    named = {stem: cfg.name for stem, cfg in files.items() if "name" in cfg}
    assert named == {name: name for name in list_backbones()}
    aliases = {stem: list(cfg.defaults) for stem, cfg in files.items() if "name" not in cfg}
    assert aliases == {alias: [name] for alias, name in ALIASES.items()}


@pytest.mark.parametrize("name", list_backbones())
def test_every_registered_name_builds_both_ways(name: str) -> None:
    """`backbone=<name>` and the default config with `backbone.name=<name>` compose to the same
    backbone (the default's drop_path_rate, null, is not passed), which builds."""
    by_option = backbone_config(f"backbone={name}")
    by_name = backbone_config(f"backbone.name={name}")
    for cfg in (by_option, by_name):
        assert cfg.run_name == f"{name}-classification"
    assert passed_options(by_option) == passed_options(by_name)
    with torch.device("meta"):  # arguments and wiring only: no weights are made
        model = build_model(by_name, num_classes=3)
    assert isinstance(model.backbone, Backbone) and model.head.fc.out_features == 3


def passed_options(cfg: DictConfig) -> dict:
    """The backbone options `build_model` passes to `create` (null means not passed)."""
    return {k: v for k, v in OmegaConf.to_container(cfg.backbone).items() if v is not None}


@pytest.mark.parametrize("alias, name", ALIASES.items())
def test_family_alias_is_its_name(alias: str, name: str) -> None:
    assert (
        backbone_config(f"backbone={alias}").backbone
        == backbone_config(f"backbone={name}").backbone
    )


def test_drop_path_rate_reaches_the_families_that_have_it() -> None:
    cfg = backbone_config("backbone.name=convnext_tiny", "backbone.drop_path_rate=0.2")
    with torch.device("meta"):
        model = build_model(cfg, num_classes=3)
    rates = [m.p for m in model.modules() if isinstance(m, DropPath)]
    assert rates and max(rates) == pytest.approx(0.2)
    # VGG has no stochastic depth: asking for it is an error naming the families that have it
    cfg = backbone_config("backbone=vgg16", "+backbone.drop_path_rate=0.2")
    with pytest.raises(Exception, match="'drop_path_rate' is an argument of ConvNeXt"):
        build_model(cfg, num_classes=3)


@pytest.mark.parametrize("name", list_backbones())
def test_a_config_offers_drop_path_rate_where_the_family_has_it(name: str) -> None:
    """What Optuna searches (`backbone.drop_path_rate` where the config has it) follows the code."""
    options = OmegaConf.load(BACKBONES / f"{name}.yaml")
    has_it = "drop_path_rate" in family_arguments(get_entry(name).family)
    assert ("drop_path_rate" in options) == has_it


def test_help_lists_the_options_and_aliases_without_base() -> None:
    done = subprocess.run(
        [sys.executable, "train.py", "--help"], cwd=ROOT, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    groups = next(line for line in done.stdout.splitlines() if line.startswith("backbone: "))
    options = groups.removeprefix("backbone: ").split(", ")
    assert sorted(options) == sorted([*list_backbones(), *ALIASES])  # no _base
    text = " ".join(done.stdout.split()).replace(" ==", ",")
    for alias, name in ALIASES.items():
        assert f"{alias} = {name}," in text, alias

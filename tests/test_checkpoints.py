"""zootrain/checkpoints.py: nothing in a checkpoint's stored config is built unless allow-listed.

A `.ckpt` loads with `weights_only=True`, but `eval.py` rebuilds model and data from the run
config stored inside it: a `_target_` there is code the file's author chooses. The payloads
below would each create the file `marker` if anything ran them.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
from omegaconf import OmegaConf

from zootrain.build import plain_config
from zootrain.checkpoints import load_checkpoint
from zootrain.errors import CheckpointError
from zootrain.evaluate import evaluate
from zootrain.run import train
from zootrain.runs import _target_problem, config_targets, find_best

from .test_training import CONFIGS, TINY, config


@pytest.fixture(scope="module")
def stored(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The run config train.py stores in its checkpoints (tiny shapes, resnet18)."""
    return plain_config(config(tmp_path_factory.mktemp("cfg"), *TINY))


def poison(stored: dict[str, Any], marker: Path) -> dict[str, dict[str, Any]]:
    """Stored configs that would run code (create `marker`) when rebuilt."""
    code = f"open({str(marker)!r}, 'w').close()"
    cases: dict[str, dict[str, Any]] = {}

    def case(name: str, path: str, value: Any) -> None:
        cfg = copy.deepcopy(stored)
        node = cfg
        *parents, last = path.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[last] = value
        cases[name] = cfg

    case("builtin", "data._target_", "builtins.exec")
    cases["builtin"]["data"]["_args_"] = [code]
    case("nested", "head.model.pool", {"_target_": "os.mknod", "_args_": [str(marker)]})
    case(
        "in a list",
        "callbacks.extra",
        [{"_target_": "pathlib.Path.touch", "_args_": [str(marker)]}],
    )
    # allowed packages, but the objects live elsewhere: reached through a module's imports
    case("re-export", "optim._target_", "torch.optim.optimizer.torch.load")
    case("dunder", "backbone._target_", "heads.classification.__builtins__.exec")
    case("private", "backbone._target_", "zootrain.data.cifar._CIFAR10")
    case(
        "lightning loader",
        "data._target_",
        "lightning.pytorch.LightningModule.load_from_checkpoint",
    )
    case("not a name", "backbone._target_", {"_target_": "builtins.exec"})
    return cases


def write(path: Path, config: dict[str, Any]) -> Path:
    torch.save({"state_dict": {}, "hyper_parameters": {"config": config}}, path)
    return path


@pytest.mark.parametrize(
    "case",
    [
        "builtin",
        "nested",
        "in a list",
        "re-export",
        "dunder",
        "private",
        "lightning loader",
        "not a name",
    ],
)
def test_eval_builds_nothing_off_the_allow_list(
    case: str, stored: dict[str, Any], tmp_path: Path
) -> None:
    marker = tmp_path / "pwned"
    ckpt = write(tmp_path / "sent.ckpt", poison(stored, marker)[case])
    cfg = config(tmp_path, f"ckpt_path={ckpt}", "trainer.accelerator=cpu", name="eval")
    with pytest.raises(CheckpointError, match="its stored run config names") as info:
        evaluate(cfg)
    assert "Nothing was built from it" in str(info.value)
    assert not marker.exists()


def test_the_error_names_the_key_and_the_target(stored: dict[str, Any], tmp_path: Path) -> None:
    cases = poison(stored, tmp_path / "pwned")
    messages = {}
    for case in ("nested", "in a list", "re-export"):
        with pytest.raises(CheckpointError) as info:
            load_checkpoint(write(tmp_path / f"{case}.ckpt", cases[case]))
        messages[case] = str(info.value)
    assert (
        "names 'os.mknod', which is not on the allow-list at head.model.pool._target_"
        in (messages["nested"])
    )
    assert (
        "names 'pathlib.Path.touch', which is not on the allow-list at callbacks.extra[0]"
        in (messages["in a list"])
    )
    assert (
        "names 'torch.optim.optimizer.torch.load', which is not on the allow-list (it is "
        "torch.serialization's, not torch.optim's) at optim._target_"
    ) in messages["re-export"]


def test_resume_reads_no_code_either(stored: dict[str, Any], tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    ckpt = write(tmp_path / "sent.ckpt", poison(stored, marker)["builtin"])
    with pytest.raises(CheckpointError, match=r"data\._target_"):
        train(config(tmp_path, *TINY, f"ckpt_path={ckpt}"))
    assert not marker.exists()


def test_a_resumed_run_may_name_its_own_targets(stored: dict[str, Any], tmp_path: Path) -> None:
    """A run with a callback of the user's own resumes: its command line names that target."""
    cfg = copy.deepcopy(stored)
    cfg["callbacks"]["mine"] = {"_target_": "mypackage.callbacks.Pause", "epoch": 1}
    ckpt = write(tmp_path / "own.ckpt", cfg)
    with pytest.raises(CheckpointError, match=r"names 'mypackage\.callbacks\.Pause', which is not"):
        load_checkpoint(ckpt)  # eval.py: off the allow-list
    assert load_checkpoint(ckpt, also_allowed={"mypackage.callbacks.Pause"})  # the same run
    with pytest.raises(CheckpointError, match=r"at callbacks\.mine\._target_"):
        load_checkpoint(ckpt, also_allowed={"mypackage.callbacks.Other"})
    assert config_targets(cfg) >= {"mypackage.callbacks.Pause", "backbones.create"}


def test_interpolations_are_not_resolved(stored: dict[str, Any], tmp_path: Path) -> None:
    """Stored resolved: a `${...}` left in could only read the environment or call resolvers."""
    cfg = copy.deepcopy(stored)
    cfg["data"]["root"] = "${oc.env:HOME}/data"
    with pytest.raises(
        CheckpointError,
        match=r"holds an interpolation \('\$\{oc\.env:HOME\}/data'\), which is not resolved at data\.root",
    ):
        load_checkpoint(write(tmp_path / "interpolated.ckpt", cfg))


def test_every_target_in_the_configs_is_allowed() -> None:
    """What configs/ can put in a stored config passes (hydra/ is not stored)."""
    targets = set()
    for path in CONFIGS.rglob("*.yaml"):
        if "hydra" not in path.relative_to(CONFIGS).parts:
            targets |= config_targets(OmegaConf.to_container(OmegaConf.load(path)))
    assert len(targets) > 15
    assert {t: _target_problem(t) for t in sorted(targets)} == {t: None for t in sorted(targets)}
    assert all(_target_problem(t) is None for t in ("lightning.Trainer", "backbones.create"))


def test_project_functions_that_write_files_are_not_allowed() -> None:
    """The allow-list is narrower than "the project's code": no writer of files passes."""
    assert _target_problem("backbones.files.save_safetensors") is not None  # writes files
    assert _target_problem("zootrain.build.write_config") is not None  # writes files
    assert _target_problem("heads.no_such_head") == (
        "names 'heads.no_such_head', which does not exist in this version"
    )


def test_find_best_of_a_run_directory(tmp_path: Path) -> None:
    with pytest.raises(
        CheckpointError, match=r"without checkpoints/best\.ckpt \(it holds last\.ckpt\)"
    ):
        (tmp_path / "checkpoints").mkdir()
        (tmp_path / "checkpoints" / "last.ckpt").write_bytes(b"")
        find_best(tmp_path)
    (tmp_path / "checkpoints" / "best.ckpt").write_bytes(b"")
    assert find_best(tmp_path) == tmp_path / "checkpoints" / "best.ckpt"

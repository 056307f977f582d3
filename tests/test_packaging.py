"""The package as users install it: the core wheel without the training stack, import names that
a user's own folders do not shadow."""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
CORE = ("torch", "torchvision", "safetensors")  # pyproject.toml's dependencies
TRAINING = ("lightning", "hydra", "omegaconf", "torchmetrics", "timm", "submitit", "optuna")


def closure(names: tuple[str, ...]) -> set[str]:
    """The installed distributions `names` need, theirs included (and the extras asked for)."""
    seen: set[tuple[str, str]] = set()
    todo = [(name, "") for name in names]
    while todo:
        name, extra = todo.pop()
        key = (name.lower().replace("_", "-"), extra)
        if key in seen:
            continue
        seen.add(key)
        for spec in importlib.metadata.distribution(name).requires or []:
            requirement = Requirement(spec)
            if requirement.marker is None or requirement.marker.evaluate({"extra": extra}):
                todo += [(requirement.name, e) for e in ("", *requirement.extras)]
    return {name for name, _ in seen}


def link_distributions(names: set[str], site: Path) -> None:
    """Make `names` installed in `site` by linking their files' top-level entries (the
    packages and their .dist-info): a virtual environment with these and nothing else."""
    for name in names:
        dist = importlib.metadata.distribution(name)
        for top in {Path(f).parts[0] for f in dist.files or [] if not str(f).startswith("..")}:
            source, target = Path(dist.locate_file(top)), site / top
            if source.exists() and not target.exists():
                target.symlink_to(source)


@pytest.mark.slow
def test_the_core_wheel_installs_and_runs_without_the_training_stack(tmp_path: Path) -> None:
    """pip installs the wheel offline into an environment that holds only torch, torchvision,
    safetensors and what they need: its requirements are those; then a backbone, an FPN and a
    torchvision detector on them work, and nothing of the training stack is importable."""
    built = subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", tmp_path, ROOT],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert built.returncode == 0, built.stderr[-3000:]
    (wheel,) = tmp_path.glob("backbone_zoo-*.whl")
    env = tmp_path / "core"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", env], check=True, timeout=120)
    (site,) = env.glob("lib/python*/site-packages")
    link_distributions(closure(CORE), site)
    python = env / "bin" / "python"
    installed = subprocess.run(
        [sys.executable, "-m", "pip", "--python", python, "install", "--no-index", wheel],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert installed.returncode == 0, installed.stdout[-2000:] + installed.stderr[-2000:]
    script = textwrap.dedent(
        f"""
        import importlib.util, torch
        from backbones import create
        from heads import FPN
        from heads.detection import Detector
        backbone = create("resnet18")
        features = backbone(torch.zeros(1, 3, 64, 64))
        pyramid = FPN(backbone.channels, out_channels=32)(features)
        detector = Detector(create("resnet18"), 3, "fcos", fpn_channels=64, min_size=128, max_size=128)
        detections = detector.eval()([torch.zeros(3, 128, 128)])
        print(sorted(pyramid), sorted(detections[0]))
        print([m for m in {TRAINING!r} if importlib.util.find_spec(m) is not None])
        """
    )
    done = subprocess.run(
        [python, "-c", script],
        cwd=tmp_path,  # not the checkout: the installed wheel is what imports
        capture_output=True,
        text=True,
        timeout=300,
        env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.splitlines() == ["['P3', 'P4', 'P5'] ['boxes', 'labels', 'scores']", "[]"]


def test_a_users_own_training_data_and_utils_packages_do_not_shadow_ours(tmp_path: Path) -> None:
    """Folders a user's repository often has, first on sys.path: ours import from our package,
    theirs from theirs."""
    for name in ("training", "data", "utils"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text(f"OWNER = 'user {name}'\n")
    script = textwrap.dedent(
        """
        import sys
        sys.path.insert(0, sys.argv[1])
        import training, data, utils
        from zootrain.data.shapes import ShapesDataModule
        from zootrain.run import train
        import backbones, heads, zootrain.data
        print(training.OWNER, data.OWNER, utils.OWNER, zootrain.data.__name__)
        print(ShapesDataModule(task="classification", num_train=4).num_classes)
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.splitlines() == ["user training user data user utils zootrain.data", "6"]
